"""Auto-imports every ``*_arch.py`` here, registering it with BasicSR (see utils/autoimport.py)."""
from tpdiff_plugin.utils.autoimport import import_modules

_modules = import_modules(__name__, __file__, '_arch.py')
