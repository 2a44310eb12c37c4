"""FM-MSA: Filter-Modulated Multi-head Self-Attention (TP-Diff, Sec. "TTformer").

The texture prior z predicts, per pixel, the offsets Δp and modulation Δm of a k×k modulated
deformable filter (Δp, Δm = Convs(z)). The filter applied to the features F gives F̃, which encodes
a spatially varying, prior-driven filtering of each region. Queries come from F, keys and values from
F̃, and the attention is Restormer's transposed (channel) attention: q and k are L2-normalised over
the pixels, each head has a learnable temperature and builds a C_h×C_h map.

Shapes: ``FMMSA(x [B, C, H, W], z [B, prior_ch, H, W]) -> [B, C, H, W]``; z must already be at the
features' resolution (the TTformer U-Net resizes it per level).

Design choices the paper leaves open (each an argument):
- The filter weight is depthwise (one k×k kernel per channel, ``[C, 1, k, k]``), and Δp / Δm are
  shared by all channels of an offset group (``offset_groups=1`` by default). Depthwise keeps the
  filter cheap and leaves channel mixing to the q/k/v projections, as in Restormer.
- Convs(z) is ``1x1 conv (prior_ch -> prior_hidden) -> GELU -> 3x3 conv (-> 3·k²·offset_groups)``;
  the 3x3 gives the offsets some spatial context. Its last layer starts small (not zero), so the
  prior path receives gradient from the first step.

``deform_filter`` hides the implementation of the modulated deformable filter:
- ``'torchvision'``: ``torchvision.ops.deform_conv2d`` (the reference; the standard choice on CUDA);
- ``'grid_sample'``: the same operator written with one batched ``F.grid_sample`` call over all k²
  taps followed by a grouped 1×1 conv that applies the weights. torchvision's CPU kernel is 25-100×
  slower than an ordinary conv (docs/platform.md), and bilinear sampling measured 2.4-3.4× faster.
- ``'auto'``: torchvision on CUDA tensors, grid_sample otherwise.
Both use the same conventions (offset layout ``[group][tap][dy, dx]``, zero outside the image), so
they agree to float precision in values and gradients (tests/archs/test_fm_msa.py).
"""
import torch
import torch.nn.functional as F
from torch import nn

from tpdiff_plugin.archs.arch_util import small_init_

DEFORM_IMPLS = ('auto', 'torchvision', 'grid_sample')


def check_deform_impl(impl):
    """Raise ``ValueError`` unless ``impl`` is one of ``DEFORM_IMPLS`` (the ``deform_impl`` option)."""
    if impl not in DEFORM_IMPLS:
        raise ValueError(f'deform_impl must be one of {DEFORM_IMPLS}, got {impl!r}')


def _deform_filter_grid_sample(x, offset, mask, weight, bias, padding, dilation):
    """Modulated deformable conv (stride 1) as bilinear sampling + a grouped 1×1 conv.

    Written by hand because no library offers this operator in sampling form: one ``grid_sample``
    call gathers all k² taps at once (``[B·G, C/G, k²·H, W]``), the mask multiplies them, and a 1×1
    conv with ``groups`` equal to the weight's groups contracts (channel, tap) into the output channels.
    """
    b, c, h, w = x.shape
    c_out, c_per_group, kh, kw = weight.shape
    taps = kh * kw
    n_off_groups = offset.shape[1] // (2 * taps)
    h_out = h + 2 * padding[0] - dilation[0] * (kh - 1)
    w_out = w + 2 * padding[1] - dilation[1] * (kw - 1)
    dtype, device = x.dtype, x.device
    # Sampling positions in input pixels: output pixel (i, j), tap (a, b) -> (i - pad + a·dil + dy, ...).
    ys = torch.arange(h_out, device=device, dtype=dtype) - padding[0]
    xs = torch.arange(w_out, device=device, dtype=dtype) - padding[1]
    ty = (torch.arange(kh, device=device, dtype=dtype) * dilation[0]).repeat_interleave(kw)
    tx = (torch.arange(kw, device=device, dtype=dtype) * dilation[1]).repeat(kh)
    off = offset.view(b, n_off_groups, taps, 2, h_out, w_out)
    py = ys.view(1, 1, 1, h_out, 1) + ty.view(1, 1, taps, 1, 1) + off[:, :, :, 0]
    px = xs.view(1, 1, 1, 1, w_out) + tx.view(1, 1, taps, 1, 1) + off[:, :, :, 1]
    # align_corners=False: pixel p maps to (2p + 1) / size - 1; zero padding outside the image, as in
    # torchvision's kernel (corners outside count as zero). Valid for any size, 1 included.
    grid = torch.stack(((2 * px + 1) / w - 1, (2 * py + 1) / h - 1), dim=-1)
    grid = grid.view(b * n_off_groups, taps * h_out, w_out, 2)
    cols = F.grid_sample(x.reshape(b * n_off_groups, c // n_off_groups, h, w), grid, mode='bilinear',
                         padding_mode='zeros', align_corners=False)
    cols = cols.view(b, n_off_groups, c // n_off_groups, taps, h_out, w_out)
    if mask is not None:
        cols = cols * mask.view(b, n_off_groups, 1, taps, h_out, w_out)
    cols = cols.reshape(b, c * taps, h_out, w_out)  # channel order (cin, tap), matching weight.view below
    groups = c // c_per_group
    return F.conv2d(cols, weight.reshape(c_out, c_per_group * taps, 1, 1), bias, groups=groups)


def deform_filter(x, offset, mask, weight, bias=None, padding=None, dilation=1, impl='auto'):
    """Modulated deformable filtering (DCNv2), stride 1, behind one interface.

    Args:
        x: features ``[B, C, H, W]``.
        offset: ``[B, 2·k²·G, H, W]``, layout ``[group][tap][dy, dx]`` as torchvision's ``deform_conv2d``.
        mask: modulation ``[B, k²·G, H, W]`` (e.g. a sigmoid) or None.
        weight: ``[C_out, C/groups, k, k]`` (depthwise: ``[C, 1, k, k]``).
        bias: ``[C_out]`` or None.
        padding: defaults to ``dilation·(k-1)/2`` ("same" output size).
        impl: ``'torchvision'``, ``'grid_sample'`` or ``'auto'`` (torchvision on CUDA, grid_sample elsewhere).
    Returns:
        ``[B, C_out, H, W]``.
    """
    check_deform_impl(impl)
    kh, kw = weight.shape[-2:]
    dilation = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    if padding is None:
        padding = (dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2)
    elif isinstance(padding, int):
        padding = (padding, padding)
    if impl == 'auto':
        impl = 'torchvision' if x.is_cuda else 'grid_sample'
    if impl == 'torchvision':
        from torchvision.ops import deform_conv2d
        return deform_conv2d(x, offset, weight, bias, padding=padding, dilation=dilation, mask=mask)
    return _deform_filter_grid_sample(x, offset, mask, weight, bias, padding, dilation)


class PriorDeformFilter(nn.Module):
    """The prior-driven modulated deformable filter of FM-MSA: F̃ = DeformFilter(F; Δp, Δm = Convs(z)).

    ``x [B, C, H, W], z [B, prior_ch, H, W] -> [B, C, H, W]``. Depthwise k×k weight, Δp/Δm shared by
    the channels of each of ``offset_groups`` groups.
    """

    def __init__(self, dim, prior_ch=64, kernel_size=3, offset_groups=1, prior_hidden=16, bias=False,
                 deform_impl='auto'):
        super().__init__()
        check_deform_impl(deform_impl)
        if dim % offset_groups:
            raise ValueError(f'dim ({dim}) must be divisible by offset_groups ({offset_groups})')
        self.kernel_size = kernel_size
        self.offset_groups = offset_groups
        self.deform_impl = deform_impl
        taps = kernel_size * kernel_size
        self.prior_convs = nn.Sequential(
            nn.Conv2d(prior_ch, prior_hidden, 1), nn.GELU(),
            nn.Conv2d(prior_hidden, 3 * taps * offset_groups, 3, padding=1))
        small_init_(self.prior_convs[-1])  # start near a plain filter: offsets of a fraction of a pixel, mask near 0.5
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Conv2d's default init
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x, z):
        taps_g = self.kernel_size * self.kernel_size * self.offset_groups
        out = self.prior_convs(z)
        offset, mask = out[:, :2 * taps_g], torch.sigmoid(out[:, 2 * taps_g:])
        return deform_filter(x, offset, mask, self.weight, self.bias, impl=self.deform_impl)


class FMMSA(nn.Module):
    """Filter-Modulated transposed Multi-head Self-Attention.

    ``forward(x [B, C, H, W], z [B, prior_ch, H, W] or None) -> [B, C, H, W]``.
    Q = dw3x3(1x1(F)); K, V = dw3x3(1x1(F̃)) with F̃ the prior-driven deformable filtering of F.
    With ``use_filter=False`` (the ``fm_msa: false`` ablation, or a block without a prior) it is plain
    Restormer MDTA: Q, K, V all from F and z is ignored.
    """

    def __init__(self, dim, num_heads, bias=False, prior_ch=64, use_filter=True, filter_kernel=3,
                 offset_groups=1, prior_hidden=16, deform_impl='auto'):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'dim ({dim}) must be divisible by num_heads ({num_heads})')
        self.num_heads = num_heads
        self.use_filter = use_filter
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        if use_filter:
            self.filter = PriorDeformFilter(dim, prior_ch=prior_ch, kernel_size=filter_kernel,
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
            if z is None:
                raise ValueError('FMMSA built with use_filter=True needs the prior z')
            q = self.q(x)
            k, v = self.kv(self.filter(x, z)).chunk(2, dim=1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=1)
        heads = self.num_heads
        q = F.normalize(q.reshape(b, heads, c // heads, h * w), dim=-1)
        k = F.normalize(k.reshape(b, heads, c // heads, h * w), dim=-1)
        v = v.reshape(b, heads, c // heads, h * w)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # [B, heads, C_h, C_h]
        out = (attn @ v).reshape(b, c, h, w)
        return self.project_out(out)
