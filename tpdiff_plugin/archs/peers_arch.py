"""Peer deblurring networks from spandrel, registered in BasicSR's ARCH_REGISTRY for comparisons.

TP-Diff is compared with published supervised deblurring networks (`tpdiff compare`, `bench/`).
spandrel (MIT) and spandrel-extra-arches carry faithful copies of their architectures, built with
random weights and no download; the weights are the user's to supply. This module registers each one
under a ``Peer*`` name (so nothing clashes with basicsr's own registry names):

================  ======================  =======================================  ============
registry name     spandrel class          published deblurring configuration        size multiple
================  ======================  =======================================  ============
PeerRestormer     Restormer (extra)       the class defaults (26.13M)               8
PeerNAFNet        NAFNet                  width 64, enc [1,1,1,28], middle 1,       2**len(enc)
                                          dec [1,1,1,1] (GoPro, 67.89M)
PeerMPRNet        MPRNet (extra)          the class defaults                        8
PeerFFTformer     FFTformer               the class defaults (16.56M)               32
PeerUformer       Uformer                 the class defaults (pads to a square)     128, square
================  ======================  =======================================  ============

Each class *is* the spandrel class (a subclass with the same parameters), so state dicts use the
upstream key names and official checkpoints load as they are. What the subclass adds, in ``forward``:
the input ``[B, 3, H, W]`` is padded (reflection, replication for tiny sides) at the bottom/right to
the size the architecture needs and the output is cropped back to ``[B, 3, H, W]``; multi-output
networks (MPRNet's three stages) return the final stage only.

spandrel is optional. Without it (or with a version that lacks a class) the names are still
registered, and building one raises ``UserError`` saying what to install, so an options file that
names a peer fails with one clear line instead of "no network named ...".
"""
import importlib
import warnings

from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from tpdiff_plugin.archs.arch_util import pad_to_multiple
from tpdiff_plugin.utils.errors import UserError

INSTALL_HINT = 'pip install spandrel==0.4.2 spandrel-extra-arches==0.2.0'

# registry name -> (module, class, size multiple (None: from the instance), pad to a square)
PEERS = {
    'PeerRestormer': ('spandrel_extra_arches.architectures.Restormer.__arch.restormer_arch', 'Restormer', 8, False),
    'PeerNAFNet': ('spandrel.architectures.NAFNet.__arch.NAFNet_arch', 'NAFNet', None, False),
    'PeerMPRNet': ('spandrel_extra_arches.architectures.MPRNet.__arch.MPRNet', 'MPRNet', 8, False),
    'PeerFFTformer': ('spandrel.architectures.FFTformer.__arch.fftformer_arch', 'FFTformer', 32, False),
    'PeerUformer': ('spandrel.architectures.Uformer.__arch.Uformer', 'Uformer', 128, True),
}

# The published deblurring configurations (docs/platform.md, "Peer restorers"), as network blocks for compare / bench.
PUBLISHED_CONFIGS = {
    'Restormer': {'type': 'PeerRestormer'},
    'NAFNet-GoPro': {'type': 'PeerNAFNet', 'width': 64, 'enc_blk_nums': [1, 1, 1, 28], 'middle_blk_num': 1,
                     'dec_blk_nums': [1, 1, 1, 1]},
    'MPRNet': {'type': 'PeerMPRNet'},
    'FFTformer': {'type': 'PeerFFTformer'},
    'Uformer': {'type': 'PeerUformer'},
}


class PeerAdapter(nn.Module):
    """Mixed in before the spandrel class: pad to the needed size, crop back, keep the final output only.

    ``forward(x [B, C, H, W]) -> [B, C_out, H, W]``.
    """

    size_multiple = 8
    pad_square = False

    def required_multiple(self):
        padder = getattr(self, 'padder_size', None)  # NAFNet: 2 ** number of encoder levels
        return int(padder) if padder else self.size_multiple

    def forward(self, x):
        h, w = x.shape[-2:]
        out = super().forward(pad_to_multiple(x, self.required_multiple(), square=self.pad_square))
        if isinstance(out, (list, tuple)):  # MPRNet: [stage 3, stage 2, stage 1]
            out = out[0]
        return out[..., :h, :w]


class MissingPeer(nn.Module):
    """Stands in for a peer whose spandrel class cannot be imported: building it raises ``UserError``."""

    reason = ''

    def __init__(self, *args, **kwargs):
        raise UserError(f'{type(self).__name__} needs spandrel and spandrel-extra-arches '
                        f'({self.reason}); install them with `{INSTALL_HINT}`')


def _import_class(module, name):
    """The spandrel class, or (None, reason). spandrel's import emits torch.jit deprecation warnings: muted."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return getattr(importlib.import_module(module), name), None
    except (ImportError, AttributeError) as e:
        return None, f'{type(e).__name__}: {e}'


def _register_peers():
    registered = {}
    for reg_name, (module, cls_name, multiple, square) in PEERS.items():
        base, reason = _import_class(module, cls_name)
        if base is None:
            attrs = {'__module__': __name__, 'reason': reason,
                     '__doc__': f'Placeholder for spandrel {cls_name} (not installed): building it raises UserError.'}
            cls = type(reg_name, (MissingPeer,), attrs)
        else:
            attrs = {'__module__': __name__, '__qualname__': reg_name, 'size_multiple': multiple or 8,
                     'pad_square': square,
                     '__doc__': f'spandrel {cls_name} with padding to its size multiple and crop-back '
                                '(see the module docstring); constructor arguments are upstream\'s.'}
            cls = type(reg_name, (PeerAdapter, base), attrs)
        ARCH_REGISTRY.register(cls)
        registered[reg_name] = cls
    return registered


REGISTERED = _register_peers()
globals().update(REGISTERED)
