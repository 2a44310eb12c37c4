"""TM-FFN: the texture-modulated feed-forward network of the TTformer block (TP-Diff).

Restormer's gated depthwise-conv FFN (GDFN), whose gated hidden features are modulated by the
texture prior: ``h' = h·(1 + γ) + φ`` with ``γ, φ = Convs(z)``, so the prior regulates the local
feature aggregation per pixel.

Shapes: ``TMFFN(x [B, C, H, W], z [B, prior_ch, H, W] or None) -> [B, C, H, W]``, hidden width
``int(C·ffn_expansion_factor)``. Convs(z) is ``1x1 (prior_ch -> prior_hidden) -> GELU -> 1x1 (-> 2·hidden)``
(1x1 only: the FFN's own depthwise 3x3 does the spatial aggregation; this keeps the deep levels,
where hidden is large, affordable). Its last layer starts small so the block starts near a plain GDFN
while every prior parameter still gets gradient. ``use_prior=False`` gives the plain GDFN (z ignored).
"""
import torch.nn.functional as F
from torch import nn

from tpdiff_plugin.archs.arch_util import small_init_


class TMFFN(nn.Module):
    """Texture-modulated GDFN: ``(x [B, dim, H, W], z [B, prior_ch, H, W] or None) -> [B, dim, H, W]``."""

    def __init__(self, dim, ffn_expansion_factor=2.66, bias=False, prior_ch=64, use_prior=True, prior_hidden=16):
        super().__init__()
        hidden = int(dim * ffn_expansion_factor)
        self.hidden = hidden
        self.use_prior = use_prior
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=bias)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2, bias=bias)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=bias)
        if use_prior:
            self.prior_convs = nn.Sequential(nn.Conv2d(prior_ch, prior_hidden, 1), nn.GELU(),
                                             nn.Conv2d(prior_hidden, hidden * 2, 1))
            small_init_(self.prior_convs[-1])
        else:
            self.prior_convs = None

    def forward(self, x, z=None):
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        h = F.gelu(x1) * x2
        if self.use_prior:
            if z is None:
                raise ValueError('TMFFN built with use_prior=True needs the prior z')
            gamma, phi = self.prior_convs(z).chunk(2, dim=1)
            h = h * (1 + gamma) + phi
        return self.project_out(h)
