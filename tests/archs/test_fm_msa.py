"""FM-MSA: the deformable filter implementations, the attention, and the prior's spatial control."""
import pytest
import torch
import torch.nn.functional as F

from tpdiff_plugin.archs.fm_msa import FMMSA, PriorDeformFilter, deform_filter


# (C_in, C_out, C_in per group, offset groups, kernel, dilation)
CONFIGS = [(6, 6, 1, 1, 3, 1), (6, 6, 1, 2, 3, 2), (4, 8, 2, 1, 3, 1), (4, 4, 4, 1, 5, 1)]


def _random_inputs(c_in, c_out, cpg, groups, k, seed, h=7, w=9):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, h, w, generator=g)
    # offsets of up to a few pixels: many samples fall between pixels and some outside the image
    offset = torch.randn(2, 2 * k * k * groups, h, w, generator=g) * 2
    mask = torch.rand(2, k * k * groups, h, w, generator=g)
    weight = torch.randn(c_out, cpg, k, k, generator=g)
    bias = torch.randn(c_out, generator=g)
    return [t.requires_grad_() for t in (x, offset, mask, weight, bias)]


@pytest.mark.parametrize('c_in,c_out,cpg,groups,k,dil', CONFIGS)
def test_implementations_agree_in_values_and_gradients(c_in, c_out, cpg, groups, k, dil):
    results = []
    for impl in ('torchvision', 'grid_sample'):
        inputs = _random_inputs(c_in, c_out, cpg, groups, k, seed=k + groups + cpg)
        out = deform_filter(*inputs[:4], bias=inputs[4], dilation=dil, impl=impl)
        loss = (out * torch.cos(out)).sum()  # a non-linear loss: gradients differ per element
        results.append((out, torch.autograd.grad(loss, inputs)))
    (out_tv, grads_tv), (out_gs, grads_gs) = results
    assert out_tv.shape == (2, c_out, 7, 9)
    torch.testing.assert_close(out_gs, out_tv, atol=1e-4, rtol=1e-4)
    for name, a, b in zip(('x', 'offset', 'mask', 'weight', 'bias'), grads_gs, grads_tv):
        assert b.abs().sum() > 0, name
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f'gradient wrt {name} differs')


@pytest.mark.parametrize('impl', ['torchvision', 'grid_sample'])
def test_zero_offsets_and_unit_mask_is_an_ordinary_conv(impl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 8, 10, generator=g)
    weight = torch.randn(6, 2, 3, 3, generator=g)  # 3 groups
    offset = torch.zeros(1, 18, 8, 10)
    mask = torch.ones(1, 9, 8, 10)
    expected = F.conv2d(x, weight, padding=1, groups=3)
    torch.testing.assert_close(deform_filter(x, offset, mask, weight, impl=impl), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('impl', ['torchvision', 'grid_sample'])
def test_integer_offset_shifts_the_image(impl):
    """A 1x1 filter with offset (dy, dx) = (1, -2) reads x[i + 1, j - 2] (zero outside)."""
    x = torch.arange(30.).view(1, 1, 5, 6)
    offset = torch.tensor([1., -2.]).view(1, 2, 1, 1).expand(1, 2, 5, 6).contiguous()
    out = deform_filter(x, offset, None, torch.ones(1, 1, 1, 1), impl=impl)
    expected = torch.zeros(1, 1, 5, 6)
    expected[..., :4, 2:] = x[..., 1:, :4]
    torch.testing.assert_close(out, expected)


def test_auto_is_grid_sample_on_cpu_and_bad_impl_raises():
    inputs = [t.detach() for t in _random_inputs(4, 4, 1, 1, 3, seed=1)]
    auto = deform_filter(*inputs[:4], impl='auto')
    assert torch.equal(auto, deform_filter(*inputs[:4], impl='grid_sample'))
    with pytest.raises(ValueError, match='deform_impl'):
        deform_filter(*inputs[:4], impl='cuda')
    with pytest.raises(ValueError, match='deform_impl'):
        FMMSA(8, 2, prior_ch=4, deform_impl='nope')


def test_fmmsa_shapes_gradients_and_prior_dependence():
    torch.manual_seed(0)
    attn = FMMSA(8, 2, prior_ch=4, prior_hidden=4)
    x = torch.randn(2, 8, 11, 13)
    z = torch.randn(2, 4, 11, 13, requires_grad=True)
    out = attn(x, z)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert z.grad.abs().sum() > 0
    assert not torch.allclose(attn(x, z + 1), out)
    with pytest.raises(ValueError, match='prior'):
        attn(x, None)


def test_plain_attention_ignores_prior_has_fewer_params_and_is_restormer_mdta():
    torch.manual_seed(0)
    plain = FMMSA(8, 2, prior_ch=4, use_filter=False)
    full = FMMSA(8, 2, prior_ch=4, use_filter=True)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert plain.filter is None and n(plain) < n(full)
    with torch.no_grad():
        plain.temperature.copy_(torch.tensor([0.5, 2.0]).view(2, 1, 1))
    x = torch.randn(1, 8, 6, 7)
    out = plain(x)
    assert torch.equal(out, plain(x, torch.randn(1, 4, 6, 7)))
    # Reference: per head h, A_h = softmax(T_h · q̂_h k̂_hᵀ) over channels (C_h x C_h), out_h = A_h v_h.
    q, k, v = plain.qkv(x).chunk(3, dim=1)
    outs = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        qh = q[0, sl].flatten(1)
        kh = k[0, sl].flatten(1)
        qh, kh = qh / qh.norm(dim=1, keepdim=True), kh / kh.norm(dim=1, keepdim=True)
        a = torch.softmax(plain.temperature[h, 0, 0] * qh @ kh.t(), dim=1)
        assert a.shape == (4, 4)
        outs.append(a @ v[0, sl].flatten(1))
    ref = plain.project_out(torch.cat(outs).view(1, 8, 6, 7))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_keys_and_values_come_from_the_filtered_features():
    """With the deformable filter replaced by identity-like sampling, FM-MSA equals Q, K, V from F."""
    torch.manual_seed(0)
    attn = FMMSA(4, 1, prior_ch=2, prior_hidden=2)
    with torch.no_grad():
        attn.filter.prior_convs[-1].weight.zero_()
        attn.filter.prior_convs[-1].bias.zero_()
        attn.filter.prior_convs[-1].bias[18:] = 30.0  # mask = sigmoid(30) = 1, offsets 0
        attn.filter.weight.zero_()
        attn.filter.weight[:, :, 1, 1] = 1.0  # centre tap only: F̃ = F
    x = torch.randn(1, 4, 5, 6)
    z = torch.randn(1, 2, 5, 6)
    plain = FMMSA(4, 1, use_filter=False)
    with torch.no_grad():
        plain.qkv[0].weight.copy_(torch.cat([attn.q[0].weight, attn.kv[0].weight]))
        plain.qkv[1].weight.copy_(torch.cat([attn.q[1].weight, attn.kv[1].weight]))
        plain.project_out.weight.copy_(attn.project_out.weight)
    torch.testing.assert_close(attn(x, z), plain(x), atol=1e-5, rtol=1e-5)
    # ... and a shifted filter (F̃ = F moved by one pixel) changes K, V and so the output
    with torch.no_grad():
        attn.filter.weight.zero_()
        attn.filter.weight[:, :, 1, 2] = 1.0
    assert not torch.allclose(attn(x, z), plain(x), atol=1e-3)


@pytest.mark.parametrize('impl', ['grid_sample', 'torchvision'])
def test_prior_change_in_a_region_changes_output_mostly_there(impl):
    """Spatial adaptivity: the prior steers the filter per pixel, so a local change of z acts locally."""
    torch.manual_seed(0)
    attn = FMMSA(8, 2, prior_ch=4, prior_hidden=8, deform_impl=impl)
    with torch.no_grad():  # a trained-looking prior path: offsets of about a pixel
        attn.filter.prior_convs[-1].weight.mul_(10)
    x = torch.randn(1, 8, 48, 48)
    z = torch.randn(1, 4, 48, 48)
    z2 = z.clone()
    z2[..., 20:28, 16:24] += 3 * torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        delta = (attn(x, z2) - attn(x, z)).pow(2).sum(dim=1)[0]
    region = torch.zeros(48, 48, dtype=torch.bool)
    margin = 4  # 3x3 prior conv (1) + sampling offsets (~2) + 3x3 depthwise conv on K, V (1)
    region[20 - margin:28 + margin, 16 - margin:24 + margin] = True
    assert delta.sum() > 0
    inside = delta[region].sum() / delta.sum()
    assert inside > 0.95, f'only {inside:.3f} of the change lies in the region (+{margin} px)'


def test_prior_deform_filter_shape_and_groups():
    filt = PriorDeformFilter(8, prior_ch=4, kernel_size=3, offset_groups=2, prior_hidden=4)
    assert filt.prior_convs[-1].out_channels == 3 * 9 * 2
    assert filt(torch.randn(2, 8, 5, 7), torch.randn(2, 4, 5, 7)).shape == (2, 8, 5, 7)
    with pytest.raises(ValueError, match='offset_groups'):
        PriorDeformFilter(6, offset_groups=4)
