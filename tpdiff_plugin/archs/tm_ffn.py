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
import torch.nn.functional as F
from torch import nn

from tpdiff_plugin.archs.arch_util import small_init_

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

    def forward(self, x, z=None):
        gamma = phi = None
        if self.use_prior:
            if z is None:
                raise ValueError('TMFFN built with use_prior=True needs the prior z')
            gamma, phi = self.prior_convs(z).chunk(2, dim=1)
        y = self.project_in(x)
        if gamma is not None and self.modulation == 'before_dwconv':
            y = y * (1 + gamma) + phi
        x1, x2 = self.dwconv(y).chunk(2, dim=1)
        h = F.gelu(x1) * x2
        if gamma is not None and self.modulation == 'after_gate':
            h = h * (1 + gamma) + phi
        return self.project_out(h)
