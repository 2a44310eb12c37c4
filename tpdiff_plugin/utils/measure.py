"""Measuring networks: parameters, MACs and peak memory (used by ``tpdiff info``, ``tpdiff compare`` and bench/).

MACs are counted with mmengine's ``FlopAnalyzer`` (one fused multiply-add = 1; mmengine's convention,
which skips element-wise ops such as additions, activations and the deformable filter's mask product).
:func:`example_inputs` picks the input MACs are counted for:

- TPDiffNet: the inference path, lq -> DM sampling (all T denoiser calls) -> U-Net.
- TexturePriorEncoder: ``forward(blur, sharp)`` (write + read, its training-time use), both at the size.
- PriorDiffusion: ``forward(lq)`` (sampling); the size is rounded up to a multiple of ``prior_scale``.
- any other network: one image whose channel count comes from the block's ``*in*ch*`` option, the
  constructor's default for such an argument, or the first conv layer.

mmengine has no handle for ``torchvision::deform_conv2d``; :func:`deform_conv2d_flop_jit` counts what the
op computes, ``B·H·W·k²·C_in·4`` for the bilinear samples plus ``B·H·W·k²·(C_in/groups)·C_out`` for the
weighted sum, which is also what mmengine counts for the ``grid_sample`` implementation (4 per sample,
plus its 1x1 conv), so both FM-MSA implementations report the same MACs.
"""
import contextlib
import ctypes
import gc
import inspect
import re
import threading
import warnings

import torch
from torch import nn

from tpdiff_plugin.utils.errors import UserError

IN_CHANNEL_KEYS = ('inp_channels', 'in_ch', 'in_channels', 'num_in_ch', 'in_nc', 'input_nc')


def parse_size(text):
    """``(H, W)`` from ``'HxW'`` (e.g. ``'256x256'``); a :class:`UserError` naming ``--size`` otherwise."""
    m = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text or '')
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UserError(f'--size: expected HxW with positive integers, e.g. 256x256, got {text!r}')
    return int(m.group(1)), int(m.group(2))


# ---------------------------------------------------------------------------------------------- params, MACs
def count_params(module):
    return sum(p.numel() for p in module.parameters())


def components(net):
    """``[(name, params)]``: top-level children with parameters, then the module's own parameters."""
    rows = [(name, count_params(child)) for name, child in net.named_children() if child is not None]
    rows += [(name, p.numel()) for name, p in net.named_parameters(recurse=False)]
    return rows


def _flop_analyzer():
    """mmengine's ``FlopAnalyzer``, imported when MACs are counted: mmengine is an optional extra (``pip install
    tpdiff-plugin[mmengine]``), and everything else here works without it."""
    try:
        from mmengine.analysis import FlopAnalyzer
    except ImportError:
        raise UserError('counting MACs needs mmengine (or mmengine-lite): pip install "tpdiff_plugin[mmengine]"') \
            from None
    return FlopAnalyzer


def deform_conv2d_flop_jit(inputs, outputs):
    """mmengine handle for ``torchvision::deform_conv2d(input, weight, offset, mask, bias, ...)``."""
    from mmengine.analysis.jit_handles import get_shape  # called by mmengine only: it is there
    b, c_in = get_shape(inputs[0])[:2]
    c_out, c_per_group, kh, kw = get_shape(inputs[1])
    h_out, w_out = get_shape(outputs[0])[-2:]
    pixels = b * h_out * w_out
    return pixels * kh * kw * c_in * 4 + pixels * kh * kw * c_per_group * c_out


def example_inputs(net, block, size):
    """The inputs MACs are counted for, for one ``size`` (H, W) image (see the module docstring)."""
    h, w = size
    name = type(net).__name__
    if name == 'TexturePriorEncoder':
        return (torch.randn(1, net.enc_blur.body[0].in_channels, h, w),) * 2
    if name == 'PriorDiffusion':
        s = net.prior_scale
        c = net.condition.head[1].in_channels // (s * s)
        return (torch.randn(1, c, -(-h // s) * s, -(-w // s) * s),)
    if name == 'TPDiffNet':
        return (torch.randn(1, net.patch_embed.in_channels, h, w),)
    channels = next((block[k] for k in IN_CHANNEL_KEYS if isinstance(block.get(k), int)), None)
    if channels is None:  # the constructor's default for an input-channel argument
        params = inspect.signature(type(net).__init__).parameters
        channels = next((params[k].default for k in IN_CHANNEL_KEYS
                         if k in params and isinstance(params[k].default, int)), None)
    if channels is None:
        conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ValueError('cannot tell the input channels (no *in*ch* option, no conv layer)')
        channels = conv.in_channels
    return (torch.randn(1, channels, h, w),)


def count_macs(net, inputs):
    """``(total, {component: MACs}, unsupported op names)`` for ``net(*inputs)`` with mmengine's FlopAnalyzer."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # jit tracer warnings about Python values in shapes
        analyzer = _flop_analyzer()(net.eval(), inputs)
        analyzer.set_op_handle('torchvision::deform_conv2d', deform_conv2d_flop_jit)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        with torch.no_grad():
            total = analyzer.total()
            by_module = analyzer.by_module()
            unsupported = sorted(analyzer.unsupported_ops())
    return int(total), {k: int(v) for k, v in by_module.items()}, unsupported


# ---------------------------------------------------------------------------------------------- memory
def _proc_status_kib(field):
    """``field`` of ``/proc/self/status`` in KiB, or None where it cannot be read (not Linux)."""
    with contextlib.suppress(OSError):
        with open('/proc/self/status', encoding='ascii') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
    return None


def _malloc_trim():
    """Hand freed heap memory back to the OS (glibc only; a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)


class PeakMemory:
    """Peak memory added inside a ``with`` block on ``device``, in MiB (``.mib``; NaN if it cannot be read).

    On CUDA, ``torch.cuda.max_memory_allocated`` minus the memory allocated before. On CPU, the process's
    resident set high-water mark (``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``)
    minus the resident size before; freed memory is handed back to the OS first (``malloc_trim``) so that
    an earlier run's leftovers do not hide the next one's needs. (tracemalloc does not see torch's
    allocations.) It is a process-level figure: approximate, and it includes the allocator's slack.
    """

    def __init__(self, device):
        self.device = device
        self.mib = float('nan')

    def __enter__(self):
        gc.collect()
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _malloc_trim()
        self.poller = None
        try:
            with open('/proc/self/clear_refs', 'w', encoding='ascii') as f:
                f.write('5')  # reset VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.poller = _RssPoller()
        self.base = _proc_status_kib('VmRSS')
        if self.poller is not None:
            self.poller.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        elif self.base is not None:
            peak = self.poller.stop() if self.poller is not None else _proc_status_kib('VmHWM')
            if peak is not None:
                self.mib = max(0.0, (peak - self.base) / 1024)
        return False


class _RssPoller:
    """Fallback where clear_refs is not writable: sample VmRSS every 5 ms in a thread."""

    def __init__(self):
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self.done.is_set():
            self.peak = max(self.peak, _proc_status_kib('VmRSS') or 0)
            self.done.wait(0.005)

    def start(self):
        self.thread.start()

    def stop(self):
        self.done.set()
        self.thread.join()
        return max(self.peak, _proc_status_kib('VmRSS') or 0)
