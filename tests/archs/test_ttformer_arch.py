"""TTformer block and TPDiffNet: shapes on any size, prior routing, gradients, ablation switches."""
import math

import pytest
import torch

from conftest import tiny_net
from tpdiff_plugin.archs.adaptive_filter import FILTER_TYPES, PriorDeformFilter
from tpdiff_plugin.archs.arch_util import gaussian_lowpass, grid_notch
from tpdiff_plugin.archs.tpe_arch import TexturePriorEncoder
from tpdiff_plugin.archs.ttformer_arch import LayerNorm2d, TPDiffNet, TTformerBlock, rescale_prior, resize_prior

# two heads at the coarse levels; prior_ch 6 and T = 3 are what the shapes and counts below spell out
TINY = dict(heads=[1, 1, 2, 2], prior_ch=6, dm_timesteps=3)


def _net(**kw):
    """A tiny net; identity_init off unless asked for, so that outputs depend on the weights."""
    return tiny_net(**{**TINY, **kw})


def _n(m):
    return sum(p.numel() for p in m.parameters())


def test_layernorm2d_normalises_channels_per_pixel():
    ln = LayerNorm2d(5)
    x = torch.randn(2, 5, 3, 4) * 3 + 1
    y = ln(x)
    torch.testing.assert_close(y.mean(1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(1, unbiased=False), torch.ones(2, 3, 4), atol=1e-3, rtol=0)


def test_ttformer_block_is_two_residual_branches():
    torch.manual_seed(0)
    block = TTformerBlock(8, 2, prior_ch=4, prior_hidden=4)
    x, z = torch.randn(1, 8, 6, 7), torch.randn(1, 4, 6, 7)
    y = x + block.attn(block.norm1(x), z)
    torch.testing.assert_close(block(x, z), y + block.ffn(block.norm2(y), z))
    plain = TTformerBlock(8, 2, prior_ch=4, use_prior=False)
    assert plain.attn.filter is None and plain.ffn.prior_convs is None
    assert plain(x).shape == x.shape


def test_resize_prior():
    z = torch.randn(1, 2, 4, 6)
    assert resize_prior(z, (4, 6)) is z
    torch.testing.assert_close(resize_prior(z, (2, 3)), torch.nn.functional.avg_pool2d(z, 2))  # area
    up = resize_prior(z, (16, 24))
    assert up.shape == (1, 2, 16, 24)
    torch.testing.assert_close(up.mean((2, 3)), z.mean((2, 3)), atol=0.05, rtol=0)


@pytest.mark.parametrize('prior_scale', [1, 2, 3, 4, 8])
def test_rescale_prior_by_a_constant_factor_equals_resize_by_size(prior_scale):
    """The U-Net's prior per level: a constant factor (traceable with dynamic sizes, for ``tpdiff export``) gives
    resize_prior's values exactly; scales that do not divide each other (3) resize by size."""
    h, w = 48, 96  # padded image sizes: multiples of lcm(8, prior_scale)
    z = torch.randn(1, 2, h // prior_scale, w // prior_scale)
    for k in range(4):
        size = (h >> k, w >> k)
        want = resize_prior(z, size)
        got = rescale_prior(z, prior_scale, 2 ** k, size)
        assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize('scale', [4, 1])
@pytest.mark.parametrize('use_dm', [True, False])
def test_any_size_batch_and_prior_shapes(scale, use_dm):
    net = _net(prior_scale=scale, use_dm=use_dm)
    lq = torch.randn(2, 3, 67, 93)
    out, prior = net(lq, return_prior=True)
    ph, pw = math.ceil(67 / scale), math.ceil(93 / scale)
    assert out.shape == lq.shape
    assert prior.shape == (2, 6, ph, pw) == net.prior_shape(lq)
    given = torch.randn(2, 6, ph, pw)
    out2, used = net(lq, prior=given, return_prior=True)
    assert used is given and out2.shape == lq.shape
    if use_dm:
        out3, p3 = net(lq, prior_target=given, return_prior=True)
        assert out3.shape == lq.shape and p3.shape == given.shape
    else:
        assert net.dm is None
        assert torch.all(prior == 0)
        torch.testing.assert_close(out, net(lq, prior=torch.zeros(2, 6, ph, pw)))


def test_tiny_inputs_work():
    net = _net()
    for h, w in [(1, 1), (3, 5), (9, 2)]:
        assert net(torch.randn(1, 3, h, w)).shape == (1, 3, h, w)


def test_global_residual_and_exact_crop():
    net = _net()
    with torch.no_grad():
        net.output.weight.zero_()
    lq = torch.randn(1, 3, 21, 30)
    assert torch.equal(net(lq), lq)


def test_internal_padding_equals_explicit_padding_then_crop():
    """A 60x60 input is reflect-padded to 64x64 (and its 15x15 prior replicate-padded to 16x16) inside."""
    net = _net(use_dm=False)
    lq = torch.randn(1, 3, 60, 60)
    prior = torch.randn(1, 6, 15, 15)
    out = net(lq, prior=prior)
    padded = torch.nn.functional.pad(lq, (0, 4, 0, 4), mode='reflect')
    padded_prior = torch.nn.functional.pad(prior, (0, 1, 0, 1), mode='replicate')
    torch.testing.assert_close(out, net(padded, prior=padded_prior)[..., :60, :60], atol=1e-5, rtol=1e-5)
    # the wrong prior shape is refused with a message naming it
    with pytest.raises(ValueError, match='prior'):
        net(lq, prior=torch.randn(1, 6, 60, 60))
    with pytest.raises(ValueError, match='prior_target'):
        _net()(lq, prior_target=torch.randn(1, 6, 14, 15))


def test_prior_bypasses_dm_and_steers_the_output():
    net = _net()
    calls = []
    net.dm.denoiser.register_forward_hook(lambda *a: calls.append(1))
    lq = torch.randn(1, 3, 32, 40)
    p1, p2 = torch.randn(1, 6, 8, 10), torch.randn(1, 6, 8, 10)
    a, b = net(lq, prior=p1), net(lq, prior=p2)
    assert calls == []
    assert not torch.allclose(a, b)
    net(lq)
    assert len(calls) == 3  # dm_timesteps reverse steps on the inference path


def test_sampling_reproducible_with_generator():
    net = _net()
    lq = torch.randn(1, 3, 32, 32)
    a = net(lq, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, net(lq, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, net(lq, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize('use_dm', [True, False])
def test_generate_prior_is_the_prior_forward_uses_without_running_the_unet(use_dm):
    net = _net(use_dm=use_dm)
    calls = []
    net.output.register_forward_hook(lambda *a: calls.append(1))
    lq = torch.randn(2, 3, 30, 37)  # not a multiple of the padding: the prior is cropped to the callers' shape
    z = net.generate_prior(lq, generator=torch.Generator().manual_seed(3))
    assert calls == [] and z.shape == net.prior_shape(lq)
    out, used = net(lq, generator=torch.Generator().manual_seed(3), return_prior=True)
    assert torch.equal(z, used)
    if not use_dm:
        assert torch.equal(z, torch.zeros_like(z))
        return
    assert z.abs().sum() > 0
    noise = torch.randn(*net.prior_shape(lq))
    torch.testing.assert_close(net(lq, prior=net.generate_prior(lq, noise=noise)), net(lq, noise=noise))
    # the training path: q-sampled from the target, with gradients into the DM only
    target = torch.randn(*net.prior_shape(lq))
    torch.manual_seed(0)
    z_train = net.generate_prior(lq, prior_target=target)
    torch.manual_seed(0)
    _, expected = net(lq, prior_target=target, return_prior=True)
    torch.testing.assert_close(z_train, expected)
    (z_train - target).abs().mean().backward()
    _assert_all_grads(net.dm)
    assert all(p.grad is None for n, p in net.named_parameters() if not n.startswith('dm.'))


def _assert_all_grads(module, skip=()):
    missing = [n for n, p in module.named_parameters()
               if not n.startswith(skip) and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, missing


@pytest.mark.parametrize('use_dm', [True, False])
def test_untrained_net_returns_its_input_exactly(use_dm):
    """identity_init (the default): the output conv starts at zero, so out = lq + 0 for any prior."""
    net = _net(identity_init=True, use_dm=use_dm)
    lq = torch.rand(2, 3, 37, 30)
    assert torch.equal(net(lq), lq)
    assert torch.equal(net(lq, prior=torch.randn(*net.prior_shape(lq))), lq)
    other = _net(use_dm=use_dm)
    assert (other(lq) - lq).abs().max() > 1e-3  # the option turns it off


def test_identity_start_learns_from_the_first_step():
    """At init only the zero output conv gets gradient; after one step every U-Net parameter does."""
    net = _net(identity_init=True)
    lq, target = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    prior = torch.randn(*net.prior_shape(lq))
    (net(lq, prior=prior) - target).abs().mean().backward()
    assert net.output.weight.grad.abs().sum() > 0
    assert net.encoder_level1.blocks[0].attn.project_out.weight.grad.abs().sum() == 0
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    net.zero_grad()
    (net(lq, prior=prior) - target).abs().mean().backward()
    _assert_all_grads(net, skip=('dm.',))


def test_every_parameter_gets_gradient_via_dm_training_path():
    net = _net()
    lq = torch.randn(2, 3, 35, 29)
    target = torch.randn(*net.prior_shape(lq))
    out, prior = net(lq, prior_target=target, return_prior=True)
    # a loss on the output only: the DM learns through the U-Net (joint training)
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_grads(net)


def test_every_unet_parameter_gets_gradient_via_given_prior():
    net = _net()
    lq = torch.randn(2, 3, 35, 29)
    prior = torch.randn(*net.prior_shape(lq), requires_grad=True)
    out = net(lq, prior=prior)
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_grads(net, skip=('dm.',))
    assert all(p.grad is None for p in net.dm.parameters())
    assert prior.grad.abs().sum() > 0


def test_detach_prior_cuts_joint_training_but_keeps_the_diffusion_loss():
    net = _net()
    lq = torch.randn(1, 3, 32, 32)
    target = torch.randn(*net.prior_shape(lq))
    out, prior = net(lq, prior_target=target, detach_prior=True, return_prior=True)
    out.sum().backward(retain_graph=True)
    assert all(p.grad is None for p in net.dm.parameters())
    (prior - target).abs().mean().backward()  # L_diff still trains the DM
    _assert_all_grads(net.dm)


def test_ablation_switches_build_run_and_shrink_the_network():
    full = _net()
    lq = torch.randn(1, 3, 24, 24)
    for kw in (dict(fm_msa=False), dict(multi_scale_prior=False), dict(use_dm=False)):
        net = _net(**kw)
        assert _n(net) < _n(full), kw
        assert net(lq).shape == lq.shape
    assert not any(isinstance(m, PriorDeformFilter) for m in _net(fm_msa=False).modules())
    single = _net(multi_scale_prior=False)
    for name in ('encoder_level2', 'encoder_level3', 'latent', 'decoder_level3', 'decoder_level2'):
        assert all(b.ffn.prior_convs is None and b.attn.filter is None for b in getattr(single, name).blocks), name
    for name in ('encoder_level1', 'decoder_level1', 'refinement'):
        assert all(b.ffn.prior_convs is not None for b in getattr(single, name).blocks), name
    with pytest.raises(ValueError, match='even'):
        _net(dim=5)
    with pytest.raises(ValueError, match='deform_impl'):
        _net(deform_impl='cuda')


def test_deform_implementations_give_the_same_network_output():
    lq = torch.randn(1, 3, 24, 40)
    prior = torch.randn(1, 6, 6, 10)
    a = _net(deform_impl='torchvision')(lq, prior=prior)
    net = _net(deform_impl='grid_sample')
    b = net(lq, prior=prior)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    net.set_deform_impl('torchvision')
    assert {m.deform_impl for m in net.modules() if isinstance(m, PriorDeformFilter)} == {'torchvision'}
    torch.testing.assert_close(net(lq, prior=prior), a)
    with pytest.raises(ValueError, match='deform_impl'):
        net.set_deform_impl('fast')


def test_paper_structure_at_defaults():
    net = TPDiffNet()
    depth = [len(getattr(net, n).blocks) for n in ('encoder_level1', 'encoder_level2', 'encoder_level3', 'latent',
                                                    'decoder_level3', 'decoder_level2', 'decoder_level1',
                                                    'refinement')]
    assert depth == [4, 6, 6, 8, 6, 6, 4, 4]
    heads = [net.encoder_level1.blocks[0].attn.num_heads, net.encoder_level2.blocks[0].attn.num_heads,
             net.encoder_level3.blocks[0].attn.num_heads, net.latent.blocks[0].attn.num_heads]
    assert heads == [1, 2, 4, 8]
    assert net.prior_scale == 4 and net.dm.timesteps == 8
    assert net.encoder_level1.blocks[0].attn.filter.kernel_size == 3


def test_grad_checkpoint_gives_the_same_output_and_gradients():
    x = torch.rand(2, 3, 32, 40)
    z = torch.randn(2, TINY['prior_ch'], 8, 10)
    results = []
    for flag in (False, True):
        net = _net(grad_checkpoint=flag)
        out = net(x, prior=z)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (out0, g0), (out1, g1) = results
    torch.testing.assert_close(out1, out0, atol=0, rtol=0)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # inference is untouched by the flag (on CPU it samples by 'gather': float-close)
        inferred = _net(grad_checkpoint=True)(x, prior=z)
        torch.testing.assert_close(_net(grad_checkpoint=False)(x, prior=z), inferred, atol=0, rtol=0)
    torch.testing.assert_close(inferred, out0, atol=1e-6, rtol=1e-5)


def _copy_shared(src, dst):
    """Load into ``dst`` every tensor of ``src`` it has under the same name and shape."""
    own = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape},
                        strict=False)


def _scale_prior_layers(net):
    """Trained-looking weights: scale up the small-initialised last layers of every Convs(z) / Convs(F)."""
    with torch.no_grad():
        for name, m in net.named_modules():
            if name.endswith(('prior_convs', 'feature_convs')):
                m[-1].weight.mul_(10)


VARIANTS = [dict(filter_type=t) for t in FILTER_TYPES if t != 'modulated_deform'] + \
    [dict(tm_ffn_modulation='before_dwconv')]


@pytest.mark.parametrize('variant', VARIANTS, ids=lambda v: next(iter(v.values())))
def test_network_variants_train_and_change_the_output(variant):
    """Each filter_type / tm_ffn_modulation: every parameter and the prior get gradient, and with the default
    network's weights wherever they fit, the output differs from the default network's."""
    default, net = _net(), _net(**variant)
    _copy_shared(default, net)
    _scale_prior_layers(default)
    _scale_prior_layers(net)
    lq = torch.randn(2, 3, 35, 29)
    prior = torch.randn(*net.prior_shape(lq), requires_grad=True)
    out = net(lq, prior=prior)
    assert out.shape == lq.shape
    (out * torch.randn_like(out)).sum().backward()
    _assert_all_grads(net, skip=('dm.',))
    assert prior.grad.abs().sum() > 0  # TM-FFN reads the prior whatever the filter
    with torch.no_grad():
        assert not torch.allclose(out, default(lq, prior=prior), atol=1e-4)
    assert net(lq).shape == lq.shape  # the inference path (DM sampling) too


def test_filter_and_modulation_options_reach_every_block():
    net = _net(filter_type='predicted', tm_ffn_modulation='before_dwconv')
    blocks = [m for m in net.modules() if isinstance(m, TTformerBlock)]
    assert len(blocks) == 8  # TINY: one block per level (4 encoder, 3 decoder) and one refinement block
    assert {b.attn.filter_type for b in blocks} == {'predicted'}
    assert {b.ffn.modulation for b in blocks} == {'before_dwconv'}
    net.set_deform_impl('torchvision')
    assert {b.attn.filter.deform_impl for b in blocks} == {'torchvision'}
    # fm_msa false is filter_type none: the same network
    a, b = _net(fm_msa=False), _net(filter_type='none')
    assert a.state_dict().keys() == b.state_dict().keys()
    lq = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(a(lq, prior=torch.zeros(1, 6, 4, 4)), b(lq, prior=torch.zeros(1, 6, 4, 4)))
    for bad in (dict(filter_type='deformable'), dict(filter_type='dcn', fm_msa=False)):
        with pytest.raises(ValueError, match='filter_type'):
            _net(**bad)
    with pytest.raises(ValueError, match='tm_ffn_modulation'):
        _net(tm_ffn_modulation='before_gate')


def test_prior_scale_1_end_to_end_with_the_tpe_and_the_dm():
    """prior_scale 1 (the paper's full-resolution prior): TPE -> DM training target -> U-Net, and sampling."""
    net = _net(prior_scale=1)
    tpe = TexturePriorEncoder(prior_ch=6, mem_slots=16, prior_scale=1, enc_ch=4)
    lq, sharp = torch.rand(2, 3, 21, 18), torch.rand(2, 3, 21, 18)
    z = tpe(lq, sharp)
    assert z.shape == net.prior_shape(lq) == (2, 6, 21, 18)
    out, z_hat = net(lq, prior_target=z.detach(), return_prior=True)  # stage 2's joint training path
    assert out.shape == lq.shape and z_hat.shape == z.shape
    ((out - sharp).abs().mean() + (z_hat - z.detach()).abs().mean()).backward()
    _assert_all_grads(net)
    with torch.no_grad():
        assert net(lq, prior=z).shape == lq.shape  # stage 1's path
        assert net(lq).shape == lq.shape  # inference: the DM samples a full-resolution prior


def test_residual_lowpass_blurs_only_the_change():
    """residual_lowpass sigma: out = lq + gaussian_lowpass(r, sigma), with the same weights (no new parameter)."""
    plain = _net()
    smooth = _net(residual_lowpass=1.5)
    assert set(smooth.state_dict()) - set(plain.state_dict()) == {'residual_lowpass_sigma'}
    assert not any(p is smooth.residual_lowpass_sigma for p in smooth.parameters())
    smooth.load_state_dict({**plain.state_dict(), 'residual_lowpass_sigma': torch.tensor(1.5)})
    lq = torch.rand(2, 3, 32, 40)  # a multiple of the pad, so the crop does not interfere
    prior = torch.randn(*plain.prior_shape(lq))
    change = plain(lq, prior=prior) - lq
    out = smooth(lq, prior=prior)
    torch.testing.assert_close(out - lq, gaussian_lowpass(change, 1.5), atol=1e-6, rtol=1e-5)
    assert (out - lq).abs().max() > 1e-3  # it does change the image
    # band-limited: its finest-scale (2 px period) energy is a small fraction of the plain net's
    fine = lambda d: (d[..., 1:, :] - d[..., :-1, :]).abs().mean()  # noqa: E731
    assert fine(out - lq) < 0.2 * fine(change)
    # an odd size (padded, then cropped) works too, and an untrained identity_init net stays exactly the identity
    odd = torch.rand(1, 3, 37, 30)
    assert smooth(odd).shape == odd.shape
    assert torch.equal(_net(identity_init=True, residual_lowpass=1.5)(odd), odd)


def test_residual_lowpass_gradients_reach_the_unet():
    net = _net(residual_lowpass=1.0)
    lq = torch.rand(1, 3, 32, 32)
    (net(lq, prior=torch.randn(*net.prior_shape(lq))) - torch.rand_like(lq)).abs().mean().backward()
    _assert_all_grads(net, skip=('dm.',))


def test_residual_lowpass_checkpoints_load_only_into_the_same_filter():
    """The sigma is stored (only when on), so a checkpoint cannot silently lose or change its filter."""
    smooth = _net(residual_lowpass=1.0)
    assert smooth.state_dict()['residual_lowpass_sigma'].item() == 1.0
    _net(residual_lowpass=1.0, seed=1).load_state_dict(smooth.state_dict())  # the same filter: loads
    with pytest.raises(RuntimeError, match='residual_lowpass: the checkpoint was trained with 1, this network '
                                           'filters with 1.5'):
        _net(residual_lowpass=1.5).load_state_dict(smooth.state_dict())
    with pytest.raises(RuntimeError, match='Unexpected key.*residual_lowpass_sigma'):
        _net().load_state_dict(smooth.state_dict())
    with pytest.raises(RuntimeError, match='Missing key.*residual_lowpass_sigma'):
        smooth.load_state_dict(_net().state_dict())


def test_residual_notch_filters_the_change_after_the_lowpass():
    """residual_notch: out = lq + grid_notch(gaussian_lowpass(r)); the flag is a buffer, as the sigma is."""
    plain = _net(residual_lowpass=1.0)
    notched = _net(residual_lowpass=1.0, residual_notch=True)
    assert set(notched.state_dict()) - set(plain.state_dict()) == {'residual_grid_notch'}
    notched.load_state_dict({**plain.state_dict(), 'residual_grid_notch': torch.tensor(1.0)})
    lq = torch.rand(2, 3, 32, 40)
    prior = torch.randn(*plain.prior_shape(lq))
    change = plain(lq, prior=prior) - lq
    torch.testing.assert_close(notched(lq, prior=prior) - lq, grid_notch(change), atol=1e-6, rtol=1e-5)
    assert change.abs().max() > 1e-3
    with pytest.raises(RuntimeError, match='Unexpected key.*residual_grid_notch'):
        plain.load_state_dict(notched.state_dict())
    with pytest.raises(RuntimeError, match='Missing key.*residual_grid_notch'):
        notched.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match='residual_notch must be true or false'):
        _net(residual_notch='yes')
    net = _net(residual_notch=True)  # gradients still reach the whole U-Net
    (net(lq, prior=prior) - torch.rand_like(lq)).abs().mean().backward()
    _assert_all_grads(net, skip=('dm.',))


@pytest.mark.parametrize('bad', [-1, 'wide', True, None])
def test_residual_lowpass_rejects_bad_values(bad):
    with pytest.raises(ValueError, match='residual_lowpass'):
        _net(residual_lowpass=bad)
