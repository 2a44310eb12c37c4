"""TM-FFN: a GDFN whose gated hidden features are modulated by the prior, h·(1+γ)+φ."""
import pytest
import torch
import torch.nn.functional as F

from tpdiff_plugin.archs.tm_ffn import TMFFN


def _gdfn_reference(ffn, x, gamma=None, phi=None, before_dwconv=False):
    """Restormer's GDFN written out, with the modulation applied to the gated hidden features (or, with
    ``before_dwconv``, to the expanded features the depthwise conv aggregates)."""
    y = F.conv2d(x, ffn.project_in.weight, ffn.project_in.bias)
    if gamma is not None and before_dwconv:
        y = y * (1 + gamma) + phi
    y = F.conv2d(y, ffn.dwconv.weight, ffn.dwconv.bias, padding=1, groups=y.shape[1])
    h = F.gelu(y[:, :ffn.hidden]) * y[:, ffn.hidden:]
    if gamma is not None and not before_dwconv:
        h = h * (1 + gamma) + phi
    return F.conv2d(h, ffn.project_out.weight, ffn.project_out.bias)


def test_shape_hidden_width_and_gradients():
    torch.manual_seed(0)
    ffn = TMFFN(8, ffn_expansion_factor=2.66, prior_ch=4, prior_hidden=4)
    assert ffn.hidden == 21 and ffn.prior_convs[-1].out_channels == 42
    x = torch.randn(2, 8, 9, 11)
    z = torch.randn(2, 4, 9, 11, requires_grad=True)
    out = ffn(x, z)
    assert out.shape == x.shape
    (out * torch.randn_like(out)).sum().backward()
    for name, p in ffn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='prior'):
        ffn(x, None)


def test_modulation_formula():
    torch.manual_seed(0)
    ffn = TMFFN(6, ffn_expansion_factor=2, prior_ch=3, prior_hidden=4)
    x = torch.randn(1, 6, 5, 7)
    z = torch.randn(1, 3, 5, 7)
    gamma, phi = ffn.prior_convs(z).chunk(2, dim=1)
    torch.testing.assert_close(ffn(x, z), _gdfn_reference(ffn, x, gamma, phi), atol=1e-5, rtol=1e-5)
    # γ = φ = 0 (zero last prior layer): exactly the unmodulated GDFN
    with torch.no_grad():
        ffn.prior_convs[-1].weight.zero_()
        ffn.prior_convs[-1].bias.zero_()
    torch.testing.assert_close(ffn(x, z), _gdfn_reference(ffn, x), atol=1e-6, rtol=1e-6)
    # γ = 1, φ = 0 doubles the hidden features, so the (linear, bias-free) output doubles
    with torch.no_grad():
        ffn.prior_convs[-1].bias[:ffn.hidden] = 1.0
    torch.testing.assert_close(ffn(x, z), 2 * _gdfn_reference(ffn, x), atol=1e-5, rtol=1e-5)


def test_without_prior_is_plain_gdfn_with_fewer_params():
    plain = TMFFN(8, prior_ch=4, use_prior=False)
    full = TMFFN(8, prior_ch=4, use_prior=True)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert plain.prior_convs is None and n(plain) < n(full)
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(plain(x), _gdfn_reference(plain, x))
    assert torch.equal(plain(x, torch.randn(1, 4, 6, 6)), plain(x))


def _local_prior_change_delta(**kwargs):
    """Per-pixel output change of a TMFFN(8, prior_ch=4) when z changes by +2 in rows 4:8, columns 9:13."""
    torch.manual_seed(0)
    ffn = TMFFN(8, prior_ch=4, prior_hidden=4, **kwargs)
    x = torch.randn(1, 8, 16, 16)
    z = torch.randn(1, 4, 16, 16)
    z2 = z.clone()
    z2[..., 4:8, 9:13] += 2.0
    with torch.no_grad():
        return (ffn(x, z2) - ffn(x, z)).abs().sum(dim=1)[0]


def test_prior_change_acts_only_where_it_happens():
    """The modulation is per pixel (1x1 convs on z, applied after the depthwise conv): a local change of z
    changes the output exactly in that region."""
    delta = _local_prior_change_delta()
    assert delta[4:8, 9:13].min() > 0
    delta[4:8, 9:13] = 0
    assert delta.max() == 0


def test_modulation_before_dwconv_formula_gradients_and_bad_value():
    torch.manual_seed(0)
    ffn = TMFFN(6, ffn_expansion_factor=2, prior_ch=3, prior_hidden=4, modulation='before_dwconv')
    assert ffn.prior_convs[-1].out_channels == 4 * ffn.hidden  # γ, φ for the 2·hidden expanded channels
    x = torch.randn(2, 6, 5, 7)
    z = torch.randn(2, 3, 5, 7, requires_grad=True)
    gamma, phi = ffn.prior_convs(z).chunk(2, dim=1)
    out = ffn(x, z)
    torch.testing.assert_close(out, _gdfn_reference(ffn, x, gamma, phi, before_dwconv=True), atol=1e-5, rtol=1e-5)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in ffn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='tm_ffn_modulation'):
        TMFFN(6, modulation='after_dwconv')


def test_modulation_before_dwconv_changes_the_output():
    """Same weights where shapes agree, trained-looking prior layers: the two placements give other outputs."""
    torch.manual_seed(0)
    after = TMFFN(8, prior_ch=4, prior_hidden=4)
    before = TMFFN(8, prior_ch=4, prior_hidden=4, modulation='before_dwconv')
    own = before.state_dict()
    before.load_state_dict({k: v for k, v in after.state_dict().items() if own[k].shape == v.shape}, strict=False)
    for ffn in (after, before):
        with torch.no_grad():
            ffn.prior_convs[-1].weight.mul_(10)
    x, z = torch.randn(1, 8, 9, 9), torch.randn(1, 4, 9, 9)
    assert not torch.allclose(after(x, z), before(x, z), atol=1e-3)


def test_modulation_before_dwconv_spreads_a_local_prior_change_by_the_dwconv_only():
    """Before the depthwise 3x3 conv, a local change of z reaches the region plus one pixel around it."""
    delta = _local_prior_change_delta(modulation='before_dwconv')
    assert delta[3:9, 8:14].min() > 0  # the ring around the region changes too (after_gate: it would not)
    delta[3:9, 8:14] = 0
    assert delta.max() == 0


@pytest.mark.parametrize('modulation', ['after_gate', 'before_dwconv'])
def test_channels_last_split_convs_match_the_reference_values_and_gradients(modulation):
    """In channels_last memory the chunked convs run as two convs each (contiguous halves); the output, the
    memory format and every gradient are those of the one-conv formula."""
    torch.manual_seed(0)
    ffn = TMFFN(6, ffn_expansion_factor=2, prior_ch=3, prior_hidden=4, bias=True, modulation=modulation)
    with torch.no_grad():
        ffn.prior_convs[-1].weight.mul_(10)  # a prior that matters
    x, z = torch.randn(2, 6, 5, 7), torch.randn(2, 3, 5, 7)
    gamma, phi = ffn.prior_convs(z).chunk(2, dim=1)
    expected = _gdfn_reference(ffn, x, gamma, phi, before_dwconv=modulation == 'before_dwconv')
    grads = {}
    for fmt in (torch.contiguous_format, torch.channels_last):
        ffn.zero_grad()
        xf, zf = x.contiguous(memory_format=fmt), z.contiguous(memory_format=fmt)
        out = ffn(xf, zf)
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        (out * torch.cos(out)).sum().backward()
        grads[fmt] = {n: p.grad.clone() for n, p in ffn.named_parameters()}
    for name, g in grads[torch.contiguous_format].items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(grads[torch.channels_last][name], g, atol=1e-5, rtol=1e-4, msg=name)
