"""BasicSR-style discovery: import every ``*_<suffix>.py`` module of a sub-package."""
import importlib
import os


def import_modules(package_name, package_file, suffix):
    """Import ``package_name.<stem>`` for every ``<stem>.py`` ending in ``suffix`` beside ``package_file``.

    Importing a module runs its ``@*_REGISTRY.register()`` decorators, exactly as BasicSR does for its
    own ``archs/``, ``losses/``, ``models/`` and ``data/`` folders. Sorted, so registration order is stable.
    """
    folder = os.path.dirname(os.path.abspath(package_file))
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(folder) if f.endswith(suffix))
    return [importlib.import_module(f'{package_name}.{stem}') for stem in stems]
