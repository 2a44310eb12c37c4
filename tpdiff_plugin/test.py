"""``python -m tpdiff_plugin.test -opt X.yml [--launcher pytorch]``: ``basicsr test`` for torchrun."""
import sys

from tpdiff_plugin.cli import basicsr_main

if __name__ == '__main__':
    sys.exit(basicsr_main(['test'] + sys.argv[1:]))
