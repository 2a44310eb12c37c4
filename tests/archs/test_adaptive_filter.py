"""FM-MSA's filters: the deformable filter's implementations, and every filter_type's own behaviour."""
import pytest
import torch
import torch.nn.functional as F

from tpdiff_plugin.archs.adaptive_filter import (FILTER_TYPES, FeatureDeformFilter, PlainFilter, PredictedFilter,
                                                 PriorDeformFilter, SeparableFilter, build_filter, deform_filter)


# (C_in, C_out, C_in per group, offset groups, kernel, dilation); 'gather' runs the depthwise one-group ones
# itself (the first and the last) and hands the others to grid_sample.
CONFIGS = [(6, 6, 1, 1, 3, 1), (6, 6, 1, 2, 3, 2), (4, 8, 2, 1, 3, 1), (4, 4, 4, 1, 5, 1), (5, 5, 1, 1, 5, 2)]
IMPLS = ['torchvision', 'grid_sample', 'gather']


def _random_inputs(c_in, c_out, cpg, groups, k, seed, h=7, w=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, h, w, generator=g)
    # offsets of up to a few pixels: many samples fall between pixels and some outside the image
    offset = torch.randn(2, 2 * k * k * groups, h, w, generator=g) * 2
    mask = torch.rand(2, k * k * groups, h, w, generator=g)
    weight = torch.randn(c_out, cpg, k, k, generator=g)
    bias = torch.randn(c_out, generator=g)
    return [t.requires_grad_() for t in (x, offset, mask, weight, bias)]


@pytest.mark.parametrize('impl', ['grid_sample', 'gather'])
@pytest.mark.parametrize('c_in,c_out,cpg,groups,k,dil', CONFIGS)
def test_implementations_agree_in_values_and_gradients(c_in, c_out, cpg, groups, k, dil, impl):
    results = []
    for name in ('torchvision', impl):
        inputs = _random_inputs(c_in, c_out, cpg, groups, k, seed=k + groups + cpg)
        out = deform_filter(*inputs[:4], bias=inputs[4], dilation=dil, impl=name)
        loss = (out * torch.cos(out)).sum()  # a non-linear loss: gradients differ per element
        results.append((out, torch.autograd.grad(loss, inputs)))
    (out_tv, grads_tv), (out_impl, grads_impl) = results
    assert out_tv.shape == (2, c_out, 7, 9)
    torch.testing.assert_close(out_impl, out_tv, atol=1e-4, rtol=1e-4)
    for name, a, b in zip(('x', 'offset', 'mask', 'weight', 'bias'), grads_impl, grads_tv):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f'gradient wrt {name} differs')


def test_gather_keeps_the_memory_format_and_matches_at_a_real_size():
    """channels_last in, channels_last out (no copy back to NCHW); NCHW in, contiguous NCHW out; both equal
    grid_sample's values on a feature map with offsets of several pixels, many reaching outside the image."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, 40, 56, generator=g)
    offset = torch.randn(2, 18, 40, 56, generator=g) * 4
    mask = torch.rand(2, 9, 40, 56, generator=g)
    weight = torch.randn(12, 1, 3, 3, generator=g)
    expected = deform_filter(x, offset, mask, weight, impl='grid_sample')
    out = deform_filter(x, offset, mask, weight, impl='gather')
    assert out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, offset, mask)]
    out_cl = deform_filter(*cl, weight, impl='gather')
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('impl', IMPLS)
def test_zero_offsets_and_unit_mask_is_an_ordinary_conv(impl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 8, 10, generator=g)
    weight = torch.randn(6, 2, 3, 3, generator=g)  # 3 groups
    offset = torch.zeros(1, 18, 8, 10)
    mask = torch.ones(1, 9, 8, 10)
    expected = F.conv2d(x, weight, padding=1, groups=3)
    torch.testing.assert_close(deform_filter(x, offset, mask, weight, impl=impl), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('impl', IMPLS)
def test_integer_offset_shifts_the_image(impl):
    """A 1x1 filter with offset (dy, dx) = (1, -2) reads x[i + 1, j - 2] (zero outside)."""
    x = torch.arange(30.).view(1, 1, 5, 6)
    offset = torch.tensor([1., -2.]).view(1, 2, 1, 1).expand(1, 2, 5, 6).contiguous()
    out = deform_filter(x, offset, None, torch.ones(1, 1, 1, 1), impl=impl)
    expected = torch.zeros(1, 1, 5, 6)
    expected[..., :4, 2:] = x[..., 1:, :4]
    torch.testing.assert_close(out, expected)


def test_auto_on_cpu_is_gather_without_autograd_and_grid_sample_with_it_and_bad_impl_raises():
    inputs = [t.detach() for t in _random_inputs(4, 4, 1, 1, 3, seed=1)]
    assert torch.equal(deform_filter(*inputs[:4], impl='auto'), deform_filter(*inputs[:4], impl='gather'))
    assert not torch.equal(deform_filter(*inputs[:4], impl='gather'), deform_filter(*inputs[:4], impl='grid_sample'))
    with torch.no_grad():  # parameters that require grad, but nothing is recorded
        weight = inputs[3].clone().requires_grad_()
        assert torch.equal(deform_filter(*inputs[:3], weight, impl='auto'), deform_filter(*inputs[:4], impl='gather'))
    weight = inputs[3].clone().requires_grad_()
    recorded = deform_filter(*inputs[:3], weight, impl='auto')
    assert recorded.requires_grad
    assert torch.equal(recorded.detach(), deform_filter(*inputs[:4], impl='grid_sample'))
    with pytest.raises(ValueError, match='deform_impl'):
        deform_filter(*inputs[:4], impl='cuda')
    with pytest.raises(ValueError, match='deform_impl'):
        build_filter('modulated_deform', 8, prior_ch=4, deform_impl='nope')


def test_prior_deform_filter_shape_and_groups():
    filt = PriorDeformFilter(8, prior_ch=4, kernel_size=3, offset_groups=2, prior_hidden=4)
    assert filt.prior_convs[-1].out_channels == 3 * 9 * 2
    assert filt(torch.randn(2, 8, 5, 7), torch.randn(2, 4, 5, 7)).shape == (2, 8, 5, 7)
    with pytest.raises(ValueError, match='offset_groups'):
        PriorDeformFilter(6, offset_groups=4)


@pytest.mark.parametrize('filter_type', [t for t in FILTER_TYPES if t != 'none'])
def test_every_filter_keeps_the_shape_and_trains_its_parameters_and_the_prior(filter_type):
    torch.manual_seed(0)
    filt = build_filter(filter_type, 8, prior_ch=4, prior_hidden=4, offset_groups=2)
    x = torch.randn(2, 8, 9, 11, requires_grad=True)
    z = torch.randn(2, 4, 9, 11, requires_grad=True)
    out = filt(x, z)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    for name, p in filt.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    if filt.uses_prior:
        assert z.grad.abs().sum() > 0
        assert not torch.allclose(filt(x, z + 1), out)
    else:
        assert z.grad is None and torch.equal(filt(x, None), out)


def test_build_filter_types_and_bad_values():
    kinds = {t: type(build_filter(t, 8, prior_ch=4)) for t in FILTER_TYPES}
    assert kinds == {'modulated_deform': PriorDeformFilter, 'predicted': PredictedFilter,
                     'feature_deform': FeatureDeformFilter, 'plain': PlainFilter, 'separable': SeparableFilter,
                     'none': type(None)}
    with pytest.raises(ValueError, match='filter_type'):
        build_filter('deformable', 8)
    for t in ('modulated_deform', 'plain', 'separable'):
        with pytest.raises(ValueError, match='odd'):
            build_filter(t, 8, kernel_size=4)


def test_predicted_filter_applies_the_per_pixel_kernels_it_predicts():
    """Zero offsets and a kernel W(p) predicted per pixel: F̃(p) = Σ_k W_k(p) F(p + p_k), the same for every channel."""
    torch.manual_seed(0)
    filt = PredictedFilter(4, prior_ch=3, prior_hidden=5, kernel_size=3)
    x = torch.randn(1, 4, 6, 7)
    z = torch.randn(1, 3, 6, 7)
    assert not hasattr(filt, 'weight')  # no static kernel
    last = filt.prior_convs[-1]
    with torch.no_grad():  # at initialisation without the small random part: the centre tap, F̃ = F
        last.weight.zero_()
    torch.testing.assert_close(filt(x, z), x)
    with torch.no_grad():  # offsets 0, weights = one linear function of the hidden features per tap
        last.weight[18:].normal_()
    weights = filt.prior_convs(z)[:, 18:]  # [1, 9, H, W]
    cols = F.unfold(x, 3, padding=1).view(1, 4, 9, 6, 7)
    torch.testing.assert_close(filt(x, z), (cols * weights.unsqueeze(1)).sum(2), atol=1e-5, rtol=1e-5)


def test_feature_deform_filter_reads_its_offsets_from_the_features():
    torch.manual_seed(0)
    filt = FeatureDeformFilter(6, kernel_size=3, hidden=4)
    with torch.no_grad():
        filt.feature_convs[-1].weight.mul_(10)
    x = torch.randn(1, 6, 8, 9)
    offset, mask = filt.feature_convs(x).split([18, 9], dim=1)
    expected = deform_filter(x, offset, torch.sigmoid(mask), filt.weight)
    torch.testing.assert_close(filt(x, torch.randn(1, 4, 8, 9)), expected)
    assert offset.abs().max() > 0.5  # a real deformation, not a plain conv
    assert not torch.allclose(expected, F.conv2d(x, filt.weight, padding=1, groups=6), atol=1e-3)


def test_plain_and_separable_filters_are_static_depthwise_convolutions():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 8)
    plain = PlainFilter(5, kernel_size=5)
    torch.testing.assert_close(plain(x), F.conv2d(x, plain.weight, padding=2, groups=5))
    sep = SeparableFilter(5, kernel_size=3)
    assert sum(p.numel() for p in sep.parameters()) == 5 * 2 * 3  # 2k weights per channel instead of k²
    rank1 = sep.vertical.weight * sep.horizontal.weight  # [5, 1, 3, 1] * [5, 1, 1, 3]: the outer product
    torch.testing.assert_close(sep(x), F.conv2d(x, rank1, padding=1, groups=5), atol=1e-5, rtol=1e-5)


def test_gather_reads_half_precision_offsets_at_full_position_precision():
    """Under CPU autocast the offsets, the mask (bf16 convs) and the features may be bf16: the gather form takes
    them at their values (positions computed in float32; a bf16 position near 40 would be off by up to 0.25 px)."""
    x, offset, mask, weight, _ = [t.detach() for t in _random_inputs(6, 6, 1, 1, 3, seed=4, h=40, w=48)]
    half_off, half_mask = offset.bfloat16(), mask.bfloat16()
    out = deform_filter(x, half_off, half_mask, weight, impl='gather')
    assert out.dtype == torch.float32
    expected = deform_filter(x, half_off.float(), half_mask.float(), weight, impl='grid_sample')
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # features in bf16 too (LayerNorm's output under autocast): the same numbers as float32 on the bf16 values
    out = deform_filter(x.bfloat16(), half_off, half_mask, weight, impl='gather')
    expected = deform_filter(x.bfloat16().float(), half_off.float(), half_mask.float(), weight, impl='grid_sample')
    torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=1e-5)
