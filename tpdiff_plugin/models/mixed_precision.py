"""Mixed precision of the training step (``train.amp``; see ``options/README.md``).

``none`` (default): everything in fp32, as without the option. ``bf16``: the forward passes and losses of
``optimize_parameters`` (G step and D step) run under ``torch.autocast(<device type>, dtype=torch.bfloat16)``.
Weights, optimizer states, gradients and the backward passes stay fp32 (autocast casts the fp32 weights per
op; the backward runs outside the context). bf16 has fp32's exponent range, so gradients do not underflow and
no ``GradScaler`` is needed (that is fp16's remedy). The loss terms are handed back (and logged) as fp32.

A few pieces run in fp32 inside the context (:meth:`MixedPrecision.fp32`), because bf16 (8-bit mantissa,
about 3 significant digits) would spoil them:
- the R1 penalty (``UnpairedCycleModel.r1_penalty``): its input gradient would come from the backward of bf16
  convolutions, then be squared, summed and differentiated again (double backward), compounding the rounding
  in a term whose gradient is itself the training signal. It costs one D forward + double backward per
  weighted D, a fraction of the D step.
- the fixed filters whose outputs are small differences of large values: the wavelet detail bands D_W sees
  (``wave_bands``) and ``train.fine_change_opt``'s image minus its blur. Rounding a [0, 1] image to bf16
  moves pixels by up to ~1/512, the size of the fine detail these measure. Cheap (one depthwise conv each);
  the networks that read the bands still run in bf16.
The fakes kept for the D step and the history pools are stored as fp32. A non-finite loss under bf16 goes
through the same numerical guard as in fp32 (``numerical_guard.py``): the terms are checked after the fp32 cast.
"""
import contextlib
from collections import OrderedDict

import torch

from tpdiff_plugin.utils.errors import UserError

AMP_CHOICES = ('none', 'bf16')


def parse_amp(value):
    """``train.amp`` checked: one of :data:`AMP_CHOICES` (None: the default ``none``)."""
    if value is None:
        return 'none'
    if not isinstance(value, str) or value not in AMP_CHOICES:
        raise UserError(f'train.amp: must be one of {", ".join(AMP_CHOICES)}, got {value!r}')
    return value


class MixedPrecision:
    """Mixin for a basicsr model (uses ``self.device``): ``train.amp`` for its training step."""

    amp = 'none'  # models built for inference (no train options) never autocast

    def init_mixed_precision(self, train_opt):
        self.amp = parse_amp(train_opt.get('amp'))

    def autocast(self):
        """The context of the training forward passes and losses: bf16 autocast with ``train.amp: bf16``."""
        if self.amp == 'none':
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def amp_losses(self, losses_fn):
        """``losses_fn()`` -> ``(total, OrderedDict of terms)`` run under :meth:`autocast`, the terms as fp32."""
        with self.autocast():
            total, losses = losses_fn()
        if self.amp == 'none':
            return total, losses
        return total.float(), OrderedDict((k, v.float()) for k, v in losses.items())

    def fp32(self, fn):
        """``fn`` wrapped to run in fp32 (autocast off, tensor arguments cast to fp32) inside :meth:`autocast`;
        ``fn`` itself with ``train.amp: none``."""
        if self.amp == 'none':
            return fn

        def run(*args, **kwargs):
            args = [a.float() if torch.is_tensor(a) else a for a in args]
            with torch.autocast(self.device.type, enabled=False):
                return fn(*args, **kwargs)
        return run
