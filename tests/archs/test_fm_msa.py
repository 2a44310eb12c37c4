"""FM-MSA: the attention, its filters (filter_type) and the prior's spatial control."""
import pytest
import torch

from tpdiff_plugin.archs.adaptive_filter import FILTER_TYPES, PriorDeformFilter
from tpdiff_plugin.archs.fm_msa import FMMSA


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


@pytest.mark.parametrize('heads,filter_type', [(1, 'modulated_deform'), (2, 'modulated_deform'), (2, 'none')])
def test_channels_last_path_matches_nchw_in_values_gradients_and_layout(heads, filter_type):
    """In channels_last FM-MSA computes the attention output transposed (pixel-major): the same
    numbers and gradients as the NCHW path, and a channels_last output."""
    torch.manual_seed(0)
    attn = FMMSA(8, heads, prior_ch=4, prior_hidden=4, filter_type=filter_type, deform_impl='grid_sample')
    _trained_looking(attn)
    x, z = torch.randn(2, 8, 9, 11), torch.randn(2, 4, 9, 11)
    with torch.no_grad():
        attn.temperature.copy_(torch.linspace(0.5, 2.0, heads).view(heads, 1, 1))
    results = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        attn.zero_grad()
        out = attn(x.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt))
        assert out.is_contiguous(memory_format=fmt)
        (out * torch.cos(out)).sum().backward()
        results[fmt] = (out.detach(), {n: p.grad.clone() for n, p in attn.named_parameters()})
    (out_n, grads_n), (out_cl, grads_cl) = results.values()
    torch.testing.assert_close(out_cl, out_n, atol=1e-5, rtol=1e-5)
    for name, g in grads_n.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads_cl[name], g, atol=1e-5, rtol=1e-4, msg=name)


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


def _copy_shared(src, dst):
    """Load into ``dst`` every tensor of ``src`` it has under the same name and shape."""
    own = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape},
                        strict=False)


def _trained_looking(module):
    """Scale up the small-initialised last layers of the predicting convs (trained weights are not at init)."""
    with torch.no_grad():
        for name in ('prior_convs', 'feature_convs'):
            convs = getattr(module.filter, name, None) if module.filter is not None else None
            if convs is not None:
                convs[-1].weight.mul_(10)


@pytest.mark.parametrize('filter_type', FILTER_TYPES)
def test_every_filter_type_trains_and_changes_the_output(filter_type):
    torch.manual_seed(0)
    default = FMMSA(8, 2, prior_ch=4, prior_hidden=4)
    attn = FMMSA(8, 2, prior_ch=4, prior_hidden=4, filter_type=filter_type)
    _copy_shared(default, attn)  # q/k/v and output projections equal: only the filter differs
    _trained_looking(default)
    _trained_looking(attn)
    x = torch.randn(2, 8, 10, 12)
    z = torch.randn(2, 4, 10, 12, requires_grad=True)
    out = attn(x, z)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    uses_prior = attn.filter is not None and attn.filter.uses_prior
    assert (z.grad is not None and z.grad.abs().sum() > 0) == uses_prior
    if filter_type == 'modulated_deform':
        torch.testing.assert_close(out, default(x, z))
    else:
        assert not torch.allclose(out, default(x, z), atol=1e-4), filter_type
    if not uses_prior:  # filters that do not read z run without it
        assert torch.equal(attn(x, None), out)


def test_filter_type_none_is_plain_attention_and_bad_type_raises():
    torch.manual_seed(0)
    none = FMMSA(8, 2, prior_ch=4, filter_type='none')
    torch.manual_seed(0)
    plain = FMMSA(8, 2, prior_ch=4, use_filter=False)
    assert none.filter is None and not none.use_filter
    assert none.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(1, 8, 5, 6)
    assert torch.equal(none(x), plain(x))
    with pytest.raises(ValueError, match='filter_type'):
        FMMSA(8, 2, filter_type='deformable')
    with pytest.raises(ValueError, match='deform_impl'):
        FMMSA(8, 2, prior_ch=4, deform_impl='nope')
