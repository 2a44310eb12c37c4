"""The filters of FM-MSA: F̃ = filter(F, z), the features its keys and values come from (TP-Diff, "TTformer").

The paper: "the texture prior z predicts the offset Δp and weight Δm of adaptive filters (Δp, Δm = Convs(z))",
and its analysis compares that adaptive filter with no filtering, a plain, a deformable and a separable filter.
``filter_type`` (``FILTER_TYPES``, an option of ``FMMSA`` / ``TPDiffNet``) picks one; ``build_filter`` builds it:

- ``'modulated_deform'`` (default, ``PriorDeformFilter``): the adaptive filter read as a modulated deformable
  filter (DCNv2) driven by z: per pixel and tap an offset Δp and a modulation Δm in (0, 1) (a sigmoid), times
  a static depthwise k×k kernel.
- ``'predicted'`` (``PredictedFilter``): the other reading: the k×k filter weights themselves, and the offsets,
  are predicted from z per pixel (no static kernel). The weights are shared by the channels of an offset
  group, as Δm is (k²·G numbers per pixel, not k²·C: per-channel kernels would cost k²·C outputs of
  Convs(z) in every block). They start as the centre tap, so the filter starts as F̃ ≈ F.
- ``'feature_deform'`` (``FeatureDeformFilter``): the paper's "deformable" comparison: the same DCNv2 with Δp
  and Δm predicted from the features F (the usual deformable conv), so the filter adapts to the content
  but not to the prior.
- ``'plain'`` (``PlainFilter``): a static depthwise k×k conv.
- ``'separable'`` (``SeparableFilter``): a static depthwise k×1 conv followed by a depthwise 1×k conv, i.e. a
  spatially separable (rank-1) k×k kernel per channel with 2k instead of k² weights **(ours)**: "separable"
  read as in signal processing; a depthwise-separable conv (depthwise + pointwise) would add channel
  mixing, which the q/k/v 1×1 projections already do.
- ``'none'``: no filter; ``FMMSA`` builds none and is plain transposed attention (Q, K, V all from F), the
  same network as ``fm_msa: false``.

Every filter is depthwise (channel mixing is left to the q/k/v projections, as in Restormer) and keeps the
size, ``[B, C, H, W] -> [B, C, H, W]``; k must be odd. ``uses_prior`` tells whether ``forward(x, z)`` reads z.
The predicting convs, ``1x1 (-> hidden) -> GELU -> 3x3 (-> 3·k²·G)``, start small (not zero), so that every
parameter gets gradient from the first step.

``deform_filter`` hides the implementation of the modulated deformable filter (``deform_impl``):
- ``'torchvision'``: ``torchvision.ops.deform_conv2d`` (the reference; the standard choice on CUDA);
- ``'grid_sample'``: the same operator written with one batched ``F.grid_sample`` call over all k²
  taps followed by a grouped 1×1 conv that applies the weights. torchvision's CPU kernel is 25-100×
  slower than an ordinary conv (docs/platform.md), and bilinear sampling measured 2.4-3.4× faster.
- ``'gather'``: the same operator as one ``F.embedding_bag`` call: every output pixel is a weighted sum of
  k²·4 rows (taps × bilinear corners) of a table of the features times each tap's weight, read in
  channels-last order. In inference it is 1.8-5× faster than ``'grid_sample'`` on CPU (bench/README.md,
  issue 10), because the per-pixel sampling weights are computed once for all channels and no
  ``[C·k², H, W]`` column tensor is written and read back; its backward (a sort and scatter inside
  embedding_bag) was slower than grid_sample's at 30 channels and faster at 60, so it is the inference
  form. Offset groups and non-depthwise weights fall back to ``'grid_sample'``.
- ``'auto'``: torchvision on CUDA tensors; on CPU, ``'gather'`` where no gradient is recorded
  (``torch.no_grad`` / ``inference_mode``, or no input requires grad) and ``'grid_sample'`` otherwise.
All use the same conventions (offset layout ``[group][tap][dy, dx]``, zero outside the image), so
they agree to float precision in values and gradients (tests/archs/test_adaptive_filter.py).
"""
import torch
import torch.nn.functional as F
from torch import nn

from tpdiff_plugin.archs.arch_util import is_channels_last, small_init_

DEFORM_IMPLS = ('auto', 'torchvision', 'grid_sample', 'gather')
FILTER_TYPES = ('modulated_deform', 'predicted', 'feature_deform', 'plain', 'separable', 'none')


def check_deform_impl(impl):
    """Raise ``ValueError`` unless ``impl`` is one of ``DEFORM_IMPLS`` (the ``deform_impl`` option)."""
    if impl not in DEFORM_IMPLS:
        raise ValueError(f'deform_impl must be one of {DEFORM_IMPLS}, got {impl!r}')


def check_filter_type(filter_type):
    """Raise ``ValueError`` unless ``filter_type`` is one of ``FILTER_TYPES`` (the ``filter_type`` option)."""
    if filter_type not in FILTER_TYPES:
        raise ValueError(f'filter_type must be one of {FILTER_TYPES}, got {filter_type!r}')


def _undeformed_positions(h, w, kh, kw, padding, dilation, device, dtype):
    """Where stride-1 k×k filtering reads before any offset: output row i, tap t reads input row
    ``rows[i] + tap_dy[t]`` (then + the tap's Δp), and likewise for columns (i - pad + a·dil for tap row a).
    Shared by both sampling forms. Returns ``(H_out, W_out, rows [H_out], cols [W_out], tap_dy [k²],
    tap_dx [k²])``."""
    h_out = h + 2 * padding[0] - dilation[0] * (kh - 1)
    w_out = w + 2 * padding[1] - dilation[1] * (kw - 1)
    rows = torch.arange(h_out, device=device, dtype=dtype) - padding[0]
    cols = torch.arange(w_out, device=device, dtype=dtype) - padding[1]
    tap_dy = (torch.arange(kh, device=device, dtype=dtype) * dilation[0]).repeat_interleave(kw)
    tap_dx = (torch.arange(kw, device=device, dtype=dtype) * dilation[1]).repeat(kh)
    return h_out, w_out, rows, cols, tap_dy, tap_dx


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
    # Sampling positions in input pixels: output pixel (i, j), tap (a, b) -> (i - pad + a·dil + dy, ...).
    h_out, w_out, ys, xs, ty, tx = _undeformed_positions(h, w, kh, kw, padding, dilation, x.device, x.dtype)
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


# The gather form's table has a zero border this wide; sampling positions are clamped into [-1, size], so every
# bilinear corner lands in the table, and a corner outside the image reads a zero (as in grid_sample's zeros).
_GATHER_BORDER = 2


def _deform_filter_gather(x, offset, mask, weight, bias, padding, dilation):
    """Modulated deformable conv (stride 1, one offset group, depthwise weight) as one ``F.embedding_bag``.

    Written by hand because no library offers this operator on CPU at the speed of a gather:
    out[b, :, i, j] = Σ_tap Σ_corner m·β · (x · weight[:, tap])[b, :, corner], where β are the bilinear
    weights of the tap's sampling position. The table holds the features (zero-bordered, channels last)
    once per tap, scaled by that tap's depthwise weight, so the (tap, corner) weights are the same for
    every channel: one bag of k²·4 rows per output pixel. ``[B, C, H, W] -> [B, C, H_out, W_out]``,
    returned in channels_last memory when x is (``arch_util.is_channels_last``), contiguous otherwise.
    """
    b, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    taps = kh * kw
    device = x.device
    # Positions and bilinear weights in at least float32, whatever autocast made of x and the offsets: in
    # bfloat16 a position near 256 would be off by up to a pixel.
    dtype = torch.promote_types(torch.promote_types(x.dtype, offset.dtype), torch.float32)
    h_out, w_out, ys, xs, ty, tx = _undeformed_positions(h, w, kh, kw, padding, dilation, device, dtype)
    border = _GATHER_BORDER
    hp, wp = h + 2 * border, w + 2 * border
    # Everything per pixel is laid out [B, H_out, W_out, tap, ...] (contiguous), so the bag of pixel p is one row.
    off = offset.view(b, taps, 2, h_out, w_out).permute(0, 3, 4, 1, 2).contiguous()
    py = (ys.view(1, h_out, 1, 1) + ty + off[..., 0]).clamp(-1, h)
    px = (xs.view(1, 1, w_out, 1) + tx + off[..., 1]).clamp(-1, w)
    y0, x0 = py.floor(), px.floor()
    fy, fx = py - y0, px - x0
    wy = torch.stack((1 - fy, fy), dim=-1)
    if mask is not None:
        wy = wy * mask.view(b, taps, h_out, w_out).permute(0, 2, 3, 1).unsqueeze(-1)
    bag_weights = (wy.unsqueeze(-1) * torch.stack((1 - fx, fx), dim=-1).unsqueeze(-2)).view(-1, taps * 4)
    # Row of corner (y0, x0) of tap t in image b: (b·taps + t)·hp·wp + (y0 + border)·wp + x0 + border; int32
    # (half the index traffic of int64) unless the table has 2**31 rows or more.
    index_dtype = torch.int32 if b * taps * hp * wp < 2 ** 31 else torch.int64
    first = (torch.arange(b, device=device, dtype=index_dtype).view(b, 1, 1, 1) * taps
             + torch.arange(taps, device=device, dtype=index_dtype)) * (hp * wp)
    top_left = first + (y0.to(index_dtype) + border) * wp + (x0.to(index_dtype) + border)
    corners = torch.tensor([0, 1, wp, wp + 1], device=device, dtype=index_dtype)
    rows = (top_left.unsqueeze(-1) + corners).view(-1, taps * 4)
    feats = F.pad(x, (border, border, border, border)).permute(0, 2, 3, 1).contiguous().view(b, 1, hp * wp, c)
    # A contiguous [taps, C] weight, so the broadcast product is laid out [B, tap, pixel, C] (no copy on view).
    table = (feats * weight.view(c, taps).t().contiguous().view(1, taps, 1, c)).view(-1, c)
    out = F.embedding_bag(rows, table, mode='sum', per_sample_weights=bag_weights.to(table.dtype))
    if bias is not None:
        out = out + bias
    out = out.view(b, h_out, w_out, c).permute(0, 3, 1, 2)
    return out if is_channels_last(x) else out.contiguous()


def _gather_applies(x, offset, weight):
    """Whether ``'gather'`` covers this call: one offset group and a depthwise weight (else grid_sample)."""
    c_out, c_per_group, kh, kw = weight.shape
    return offset.shape[1] == 2 * kh * kw and c_per_group == 1 and c_out == x.shape[1]


def deform_filter(x, offset, mask, weight, bias=None, padding=None, dilation=1, impl='auto'):
    """Modulated deformable filtering (DCNv2), stride 1, behind one interface.

    Args:
        x: features ``[B, C, H, W]``.
        offset: ``[B, 2·k²·G, H, W]``, layout ``[group][tap][dy, dx]`` as torchvision's ``deform_conv2d``.
        mask: modulation ``[B, k²·G, H, W]`` (e.g. a sigmoid) or None.
        weight: ``[C_out, C/groups, k, k]`` (depthwise: ``[C, 1, k, k]``).
        bias: ``[C_out]`` or None.
        padding: defaults to ``dilation·(k-1)/2`` ("same" output size).
        impl: ``'torchvision'``, ``'grid_sample'``, ``'gather'`` or ``'auto'`` (torchvision on CUDA; on CPU
            gather without autograd, grid_sample with it).
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
        if x.is_cuda:
            impl = 'torchvision'
        else:
            records_grad = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, offset, mask, weight, bias))
            impl = 'grid_sample' if records_grad else 'gather'
    if impl == 'torchvision':
        from torchvision.ops import deform_conv2d
        return deform_conv2d(x, offset, weight, bias, padding=padding, dilation=dilation, mask=mask)
    if impl == 'gather' and _gather_applies(x, offset, weight):
        return _deform_filter_gather(x, offset, mask, weight, bias, padding, dilation)
    return _deform_filter_grid_sample(x, offset, mask, weight, bias, padding, dilation)


def _tap_convs(in_ch, hidden, out_ch):
    """Convs(·) of the sampling filters: ``1x1 (in_ch -> hidden) -> GELU -> 3x3 (-> out_ch)``, last layer small."""
    convs = nn.Sequential(nn.Conv2d(in_ch, hidden, 1), nn.GELU(), nn.Conv2d(hidden, out_ch, 3, padding=1))
    small_init_(convs[-1])  # start near a fixed filter: offsets of a fraction of a pixel
    return convs


class DeformFilterBase(nn.Module):
    """What the filters sampling through ``deform_filter`` share: k, offset groups and ``deform_impl``
    (``TPDiffNet.set_deform_impl`` switches it on every instance)."""

    uses_prior = True

    def __init__(self, dim, kernel_size, offset_groups, deform_impl):
        super().__init__()
        check_deform_impl(deform_impl)
        if dim % offset_groups:
            raise ValueError(f'dim ({dim}) must be divisible by offset_groups ({offset_groups})')
        if kernel_size % 2 == 0:
            raise ValueError(f'filter_kernel must be odd (the filter keeps the size), got {kernel_size}')
        self.kernel_size = kernel_size
        self.offset_groups = offset_groups
        self.deform_impl = deform_impl

    def _split(self, out):
        """Convs' output ``[B, 3·k²·G, H, W]`` -> offsets ``[B, 2·k²·G, H, W]``, per-tap values ``[B, k²·G, H, W]``."""
        n = 2 * self.kernel_size * self.kernel_size * self.offset_groups
        return out[:, :n], out[:, n:]


class PriorDeformFilter(DeformFilterBase):
    """``'modulated_deform'``: F̃ = DCNv2(F; Δp, Δm = Convs(z)), a static depthwise k×k weight, Δp/Δm shared
    by the channels of each of ``offset_groups`` groups. ``x [B, C, H, W], z [B, prior_ch, H, W] -> [B, C, H, W]``."""

    def __init__(self, dim, prior_ch=64, kernel_size=3, offset_groups=1, prior_hidden=16, bias=False,
                 deform_impl='auto'):
        super().__init__(dim, kernel_size, offset_groups, deform_impl)
        self.prior_convs = _tap_convs(prior_ch, prior_hidden, 3 * kernel_size * kernel_size * offset_groups)
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Conv2d's default init
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x, z):
        offset, mask = self._split(self.prior_convs(z))
        return deform_filter(x, offset, torch.sigmoid(mask), self.weight, self.bias, impl=self.deform_impl)


class FeatureDeformFilter(DeformFilterBase):
    """``'feature_deform'``: F̃ = DCNv2(F; Δp, Δm = Convs(F)), the usual deformable conv; z is not read."""

    uses_prior = False

    def __init__(self, dim, kernel_size=3, offset_groups=1, hidden=16, bias=False, deform_impl='auto'):
        super().__init__(dim, kernel_size, offset_groups, deform_impl)
        self.feature_convs = _tap_convs(dim, hidden, 3 * kernel_size * kernel_size * offset_groups)
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size, kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x, z=None):
        offset, mask = self._split(self.feature_convs(x))
        return deform_filter(x, offset, torch.sigmoid(mask), self.weight, self.bias, impl=self.deform_impl)


class PredictedFilter(DeformFilterBase):
    """``'predicted'``: F̃(p) = Σ_k W_k(p) · F(p + p_k + Δp_k(p)) with W, Δp = Convs(z): per-pixel k×k weights
    (one kernel per offset group, no static weight, not normalised) and offsets from the prior."""

    def __init__(self, dim, prior_ch=64, kernel_size=3, offset_groups=1, prior_hidden=16, bias=False,
                 deform_impl='auto'):
        super().__init__(dim, kernel_size, offset_groups, deform_impl)
        taps = kernel_size * kernel_size
        self.prior_convs = _tap_convs(prior_ch, prior_hidden, 3 * taps * offset_groups)
        with torch.no_grad():  # each group's kernel starts at its centre tap: F̃ ≈ F
            self.prior_convs[-1].bias[2 * taps * offset_groups + taps // 2::taps] = 1.0
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.dim = dim  # a constant channel count, so an exported graph sees the kernel's shape (tpdiff export)

    def forward(self, x, z):
        offset, weights = self._split(self.prior_convs(z))
        k = self.kernel_size
        ones = x.new_ones(self.dim, 1, k, k)  # depthwise identity: the per-pixel weights do all the weighting
        return deform_filter(x, offset, weights, ones, self.bias, impl=self.deform_impl)


class PlainFilter(nn.Conv2d):
    """``'plain'``: a static depthwise k×k conv; z is not read."""

    uses_prior = False

    def __init__(self, dim, kernel_size=3, bias=False):
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)

    def forward(self, x, z=None):
        return super().forward(x)


class SeparableFilter(nn.Module):
    """``'separable'``: a static depthwise k×1 conv, then a depthwise 1×k conv; z is not read."""

    uses_prior = False

    def __init__(self, dim, kernel_size=3, bias=False):
        super().__init__()
        self.vertical = nn.Conv2d(dim, dim, (kernel_size, 1), padding=(kernel_size // 2, 0), groups=dim, bias=False)
        self.horizontal = nn.Conv2d(dim, dim, (1, kernel_size), padding=(0, kernel_size // 2), groups=dim, bias=bias)

    def forward(self, x, z=None):
        return self.horizontal(self.vertical(x))


def build_filter(filter_type, dim, prior_ch=64, kernel_size=3, offset_groups=1, prior_hidden=16, bias=False,
                 deform_impl='auto'):
    """The filter of ``filter_type`` for ``dim`` channels (None for ``'none'``); ``prior_hidden`` is also the
    hidden width of ``'feature_deform'``'s Convs(F)."""
    check_filter_type(filter_type)
    check_deform_impl(deform_impl)
    if filter_type in ('plain', 'separable') and kernel_size % 2 == 0:
        raise ValueError(f'filter_kernel must be odd (the filter keeps the size), got {kernel_size}')
    sampling = dict(kernel_size=kernel_size, offset_groups=offset_groups, bias=bias, deform_impl=deform_impl)
    if filter_type == 'modulated_deform':
        return PriorDeformFilter(dim, prior_ch=prior_ch, prior_hidden=prior_hidden, **sampling)
    if filter_type == 'predicted':
        return PredictedFilter(dim, prior_ch=prior_ch, prior_hidden=prior_hidden, **sampling)
    if filter_type == 'feature_deform':
        return FeatureDeformFilter(dim, hidden=prior_hidden, **sampling)
    if filter_type == 'plain':
        return PlainFilter(dim, kernel_size=kernel_size, bias=bias)
    if filter_type == 'separable':
        return SeparableFilter(dim, kernel_size=kernel_size, bias=bias)
    return None
