"""Importing tpdiff_plugin registers every plugin module with BasicSR and mirrors archs into mmengine."""
import inspect
import subprocess
import sys
from pathlib import Path

import tpdiff_plugin
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY

PKG = Path(tpdiff_plugin.__file__).parent
FOLDERS = {'archs': ('_arch.py', ARCH_REGISTRY), 'losses': ('_loss.py', LOSS_REGISTRY),
           'models': ('_model.py', MODEL_REGISTRY), 'data': ('_dataset.py', DATASET_REGISTRY)}


def _registered_from(module_name, registry):
    return [name for name, obj in registry._obj_map.items() if getattr(obj, '__module__', None) == module_name]


def test_every_suffixed_file_is_imported_and_registers_something():
    for folder, (suffix, registry) in FOLDERS.items():
        files = sorted(p.stem for p in (PKG / folder).glob(f'*{suffix}'))
        for stem in files:
            module = f'tpdiff_plugin.{folder}.{stem}'
            assert module in sys.modules, f'{module} was not auto-imported'
            assert _registered_from(module, registry), f'{module} registers nothing in {registry._name}'


def test_archs_are_mirrored_into_mmengine_scope():
    from mmengine.registry import MODELS
    from tpdiff_plugin.registry import mmengine_models
    plugin_archs = [n for n, c in ARCH_REGISTRY._obj_map.items() if c.__module__.startswith('tpdiff_plugin.')]
    assert sorted(tpdiff_plugin.MMENGINE_NAMES) == sorted(plugin_archs)
    child = mmengine_models()
    assert MODELS.children['tpdiff'] is child
    for name in plugin_archs:
        assert MODELS.get(f'tpdiff.{name}') is ARCH_REGISTRY.get(name)
        assert inspect.isclass(MODELS.get(f'tpdiff.{name}'))


def test_import_is_idempotent_in_a_fresh_process():
    code = ('import importlib, tpdiff_plugin; from tpdiff_plugin import compat, registry; '
            'compat.apply(); registry.register_archs_with_mmengine(tpdiff_plugin.archs._modules); '
            'importlib.reload(tpdiff_plugin); print("ok")')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == 'ok', res.stderr
