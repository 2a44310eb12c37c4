"""FM-MSA: Filter-Modulated Multi-head Self-Attention (TP-Diff, Sec. "TTformer").

The texture prior z drives a filter of the features F (by default a k×k modulated deformable filter whose
offsets Δp and modulation Δm are predicted per pixel, Δp, Δm = Convs(z)); the filtered features F̃ encode a
spatially varying, prior-driven filtering of each region. Queries come from F, keys and values from F̃, and
the attention is Restormer's transposed (channel) attention: q and k are L2-normalised over the pixels,
each head has a learnable temperature and builds a C_h×C_h map.

Shapes: ``FMMSA(x [B, C, H, W], z [B, prior_ch, H, W]) -> [B, C, H, W]``; z must already be at the
features' resolution (the TTformer U-Net resizes it per level).

The filter is chosen by ``filter_type`` (the paper's filter comparison: modulated deformable from z, per-pixel
weights from z, deformable from F, plain, separable, none); the filters, their design choices and the
deformable filter's two implementations (``deform_impl``) live in ``adaptive_filter.py``.
"""
import torch
import torch.nn.functional as F
from torch import nn

from tpdiff_plugin.archs.adaptive_filter import build_filter, check_deform_impl, check_filter_type
from tpdiff_plugin.archs.arch_util import is_channels_last


class FMMSA(nn.Module):
    """Filter-Modulated transposed Multi-head Self-Attention.

    ``forward(x [B, C, H, W], z [B, prior_ch, H, W] or None) -> [B, C, H, W]``.
    Q = dw3x3(1x1(F)); K, V = dw3x3(1x1(F̃)) with F̃ = filter(F, z), the filter of ``filter_type``
    (``adaptive_filter.FILTER_TYPES``; default the prior-driven modulated deformable filter). With
    ``use_filter=False`` or ``filter_type='none'`` (the ``fm_msa: false`` ablation, or a block without a
    prior) it is plain Restormer MDTA: Q, K, V all from F and z is ignored. Filters that do not read z
    (``plain``, ``separable``, ``feature_deform``) accept ``z=None``.
    """

    def __init__(self, dim, num_heads, bias=False, prior_ch=64, use_filter=True, filter_kernel=3,
                 offset_groups=1, prior_hidden=16, deform_impl='auto', filter_type='modulated_deform'):
        super().__init__()
        check_deform_impl(deform_impl)
        check_filter_type(filter_type)
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.num_heads = num_heads
        self.use_filter = use_filter and filter_type != 'none'
        self.filter_type = filter_type if self.use_filter else 'none'
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        if self.use_filter:
            self.filter = build_filter(filter_type, dim, prior_ch=prior_ch, kernel_size=filter_kernel,
                                       offset_groups=offset_groups, prior_hidden=prior_hidden, bias=bias,
                                       deform_impl=deform_impl)
            self.q = nn.Sequential(nn.Conv2d(dim, dim, 1, bias=bias),
                                   nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=bias))
            self.kv = nn.Sequential(nn.Conv2d(dim, dim * 2, 1, bias=bias),
                                    nn.Conv2d(dim * 2, dim * 2, 3, padding=1, groups=dim * 2, bias=bias))
        else:
            self.filter = None
            self.qkv = nn.Sequential(nn.Conv2d(dim, dim * 3, 1, bias=bias),
                                     nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=bias))
        self.project_out = nn.Conv2d(dim, dim, 1, bias=bias)

    def forward(self, x, z=None):
        b, c, h, w = x.shape
        if self.use_filter:
            if z is None and self.filter.uses_prior:
                raise ValueError(f'FMMSA with filter_type {self.filter_type!r} needs the prior z')
            q = self.q(x)
            k, v = self.kv(self.filter(x, z)).chunk(2, dim=1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=1)
        heads = self.num_heads
        q = q.reshape(b, heads, c // heads, h * w)
        k = k.reshape(b, heads, c // heads, h * w)
        v = v.reshape(b, heads, c // heads, h * w)
        # normalize(q) @ normalize(k)ᵀ (L2 over the pixels, F.normalize's eps), with the division done on
        # the [C_h, C_h] map rather than on q and k: two passes over [B, C, H·W] fewer.
        q_norm = torch.linalg.vector_norm(q, dim=-1, keepdim=True).clamp_min(1e-12)
        k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)
        attn = q @ k.transpose(-2, -1) / (q_norm * k_norm.transpose(-2, -1))
        attn = (attn * self.temperature).softmax(dim=-1)  # [B, heads, C_h, C_h]
        if is_channels_last(x):
            # (attn @ v)ᵀ = vᵀ @ attnᵀ is laid out pixel-major: channels_last, which project_out then reads
            # without a conversion (a view for one head; a copy of the head-major result for more)
            out = (v.transpose(-2, -1) @ attn.transpose(-2, -1)).transpose(1, 2).reshape(b, h, w, c)
            out = out.permute(0, 3, 1, 2)
        else:
            out = (attn @ v).reshape(b, c, h, w)
        return self.project_out(out)
