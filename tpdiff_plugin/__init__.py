"""tpdiff-plugin: TP-Diff (ICCV 2025, arXiv 2507.13599) as a BasicSR plugin.

Importing this package mends basicsr 1.4.2 for current torchvision / CPU runs (``compat``), then
imports every ``*_arch.py``, ``*_loss.py``, ``*_model.py`` and ``*_dataset.py`` of the plugin so
that they register with BasicSR's registries, and mirrors the networks into mmengine's ``MODELS``
under the ``tpdiff`` scope.
"""
import os
import sys

if 'torch' not in sys.modules and 'GOMP_SPINCOUNT' not in os.environ:
    # On small shared CPU machines, OpenMP threads that spin while waiting made small conv nets up to
    # ~100x slower (bench/README.md). A user's setting wins: OMP_WAIT_POLICY, or GOMP_SPINCOUNT (a bounded
    # spin; on a machine of one's own the demo trains faster with it, docs/platform.md).
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from tpdiff_plugin import compat  # noqa: E402

compat.apply()

from tpdiff_plugin import archs, data, losses, models  # noqa: E402  (after the mends)
from tpdiff_plugin.registry import register_archs_with_mmengine  # noqa: E402
from tpdiff_plugin.version import __version__  # noqa: E402,F401

MMENGINE_NAMES = register_archs_with_mmengine(archs._modules)


def __getattr__(name):  # lazy: `from tpdiff_plugin import Deblurrer` imports tpdiff_plugin.inference on first use
    if name == 'Deblurrer':
        from tpdiff_plugin.inference import Deblurrer
        return Deblurrer
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
