"""``python -m tpdiff_plugin.train -opt X.yml [--launcher pytorch] ...``: ``basicsr train`` for torchrun."""
import sys

from tpdiff_plugin.cli import basicsr_main

if __name__ == '__main__':
    sys.exit(basicsr_main(['train'] + sys.argv[1:]))
