"""tpdiff-plugin: TP-Diff (ICCV 2025, arXiv 2507.13599) as a BasicSR plugin.

Importing this package mends basicsr 1.4.2 for current torchvision / CPU runs (``compat``), then
imports every ``*_arch.py``, ``*_loss.py``, ``*_model.py`` and ``*_dataset.py`` of the plugin so
that they register with BasicSR's registries, and mirrors the networks into mmengine's ``MODELS``
under the ``tpdiff`` scope.
"""
from tpdiff_plugin import compat

compat.apply()

from tpdiff_plugin import archs, data, losses, models  # noqa: E402  (after the mends)
from tpdiff_plugin.registry import register_archs_with_mmengine  # noqa: E402

__version__ = '0.1.0'
MMENGINE_NAMES = register_archs_with_mmengine(archs._modules)
