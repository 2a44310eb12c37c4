"""TM-FFN: the texture-modulated feed-forward network of the TTformer block (TP-Diff).

Restormer's gated depthwise-conv FFN (GDFN), modulated by the texture prior: ``h' = h·(1 + γ) + φ`` with
``γ, φ = Convs(z)``, so the prior "regulates the local feature aggregation" per pixel. Where ``modulation``
applies it, the paper leaving both readings open:
- ``'after_gate'`` (default): on the gated hidden features, after the depthwise conv and the gate
  (``h = GELU(x1)·x2``; γ, φ have ``hidden`` channels each);
- ``'before_dwconv'``: on the expanded features ``project_in(x)``, before the depthwise 3x3 conv that
  aggregates them locally (γ, φ have ``2·hidden`` channels each), so the aggregation reads modulated features.

Shapes: ``TMFFN(x [B, C, H, W], z [B, prior_ch, H, W] or None) -> [B, C, H, W]``, hidden width
``int(C·ffn_expansion_factor)``. Convs(z) is ``1x1 (prior_ch -> prior_hidden) -> GELU -> 1x1 (-> 2·hidden)``
(1x1 only: the FFN's own depthwise 3x3 does the spatial aggregation; this keeps the deep levels,
where hidden is large, affordable). Its last layer starts small so the block starts near a plain GDFN
while every prior parameter still gets gradient. ``use_prior=False`` gives the plain GDFN (z ignored).
"""
import torch
import torch.nn.functional as F
from torch import nn

from tpdiff_plugin.archs.arch_util import is_channels_last, small_init_

MODULATIONS = ('after_gate', 'before_dwconv')


class TMFFN(nn.Module):
    """Texture-modulated GDFN: ``(x [B, dim, H, W], z [B, prior_ch, H, W] or None) -> [B, dim, H, W]``."""

    def __init__(self, dim, ffn_expansion_factor=2.66, bias=False, prior_ch=64, use_prior=True, prior_hidden=16,
                 modulation='after_gate'):
        super().__init__()
        if modulation not in MODULATIONS:
            raise ValueError(f'tm_ffn_modulation must be one of {MODULATIONS}, got {modulation!r}')
        hidden = int(dim * ffn_expansion_factor)
        self.hidden = hidden
        self.use_prior = use_prior
        self.modulation = modulation
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)
        if use_prior:
            self.prior_convs = nn.Sequential(nn.Conv2d(prior_ch, prior_hidden, 1), nn.GELU(),
                                             nn.Conv2d(prior_hidden, 2 * self._modulated_width(), 1))
            small_init_(self.prior_convs[-1])
        else:
            self.prior_convs = None

    def _modulated_width(self):
        """Channels γ and φ each have: the gated ``hidden`` ones, or the ``2·hidden`` before the depthwise conv."""
        return self.hidden if self.modulation == 'after_gate' else 2 * self.hidden

    def modulation_terms(self, z, split=False):
        """``(1 + γ, φ)`` from Convs(z), each ``[B, width, H, W]``. The 1 is added to the last conv's bias
        (``width`` numbers) rather than to γ (``width·H·W``), which saves a pass over the largest tensors;
        ``split``: γ and φ by two convs, so each is contiguous in channels_last (see ``_conv_halves``)."""
        first, act, last = self.prior_convs
        width = self._modulated_width()
        one_plus = torch.cat((last.bias.new_ones(width), last.bias.new_zeros(width)))
        return _conv_halves(last, act(first(z)), split=split, bias_shift=one_plus)

    def forward(self, x, z=None):
        # In channels_last memory, each conv whose output is chunked runs as two convs (see _conv_halves).
        split = is_channels_last(x)
        scale = shift = None
        if self.use_prior:
            if z is None:
                raise ValueError('TMFFN built with use_prior=True needs the prior z')
            scale, shift = self.modulation_terms(z, split=split)
        before = scale is not None and self.modulation == 'before_dwconv'
        if split:
            y = _conv_halves(self.project_in, x, split=True)
            if before:  # y·(1 + γ) + φ, one pass per half
                y = [torch.addcmul(sh, yi, sc) for yi, sc, sh in zip(y, scale.chunk(2, dim=1), shift.chunk(2, dim=1))]
            x1, x2 = _conv_halves(self.dwconv, y, split=True)
        else:
            y = self.project_in(x)
            if before:
                y = torch.addcmul(shift, y, scale)
            x1, x2 = self.dwconv(y).chunk(2, dim=1)
        h = F.gelu(x1) * x2
        if scale is not None and self.modulation == 'after_gate':
            h = torch.addcmul(shift, h, scale)  # h·(1 + γ) + φ in one pass
        return self.project_out(h)


def _conv_halves(conv, x, split, bias_shift=None):
    """``conv(x)`` (its bias plus ``bias_shift``, if given) as its two channel halves.

    ``split=False``: one conv, then ``chunk``. ``split=True``: each half by its own conv, so each is a
    contiguous tensor: in channels_last memory chunk() gives channel-strided views, on which GELU and the
    products ran slower; a TM-FFN at [1, 60, 256, 256] ran 118 -> 95 ms with its convs split (NCHW: 114 ->
    133, so NCHW keeps one conv; bench/README.md, issue 10). For a depthwise conv, x is the pair of input
    halves when split (the tensor otherwise).
    """
    bias = conv.bias if bias_shift is None or conv.bias is None else conv.bias + bias_shift
    args = (conv.stride, conv.padding, conv.dilation)
    if not split:
        return F.conv2d(x, conv.weight, bias, *args, conv.groups).chunk(2, dim=1)
    n = conv.out_channels // 2
    depthwise = conv.groups > 1
    inputs = x if depthwise else (x, x)
    halves = ((slice(None, n), inputs[0]), (slice(n, None), inputs[1]))
    return tuple(F.conv2d(inp, conv.weight[sl], None if bias is None else bias[sl], *args,
                          conv.groups // 2 if depthwise else 1) for sl, inp in halves)
