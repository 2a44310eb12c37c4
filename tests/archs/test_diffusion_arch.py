"""PriorDiffusion: schedule, T deterministic reverse steps (x0-parameterisation), training vs sampling."""
import numpy as np
import pytest
import torch

from conftest import tiny_net
from tpdiff_plugin.archs.diffusion_arch import PriorDiffusion, sqrt_linear_betas



def _tiny(timesteps=4, prior_scale=4, **kw):
    torch.manual_seed(0)
    return PriorDiffusion(in_ch=3, prior_ch=6, prior_scale=prior_scale, feat_ch=8, num_blocks=2, timesteps=timesteps,
                          num_cond_blocks=1, **kw)


def _count_denoiser_calls(dm):
    calls = []
    dm.denoiser.register_forward_hook(lambda m, i, o: calls.append(int(i[2][0])))
    return calls


def test_schedule_is_linear_in_sqrt_beta_with_beta_from_0_1_to_0_99():
    dm = PriorDiffusion(timesteps=8)
    expected_sqrt = np.linspace(0.1 ** 0.5, 0.99 ** 0.5, 8)
    np.testing.assert_allclose(dm.betas.sqrt().numpy(), expected_sqrt, rtol=1e-6)
    np.testing.assert_allclose(dm.betas[[0, -1]].numpy(), [0.1, 0.99], rtol=1e-6)
    np.testing.assert_allclose(dm.alphas_cumprod.numpy(), np.cumprod(1 - expected_sqrt ** 2), rtol=1e-5)
    torch.testing.assert_close(sqrt_linear_betas(3, 0.04, 0.16).sqrt(), torch.tensor([0.2, 0.3, 0.4], dtype=torch.float64))
    # the schedule is derived, not stored: checkpoints do not carry it
    assert not any('beta' in k or 'cumprod' in k or 'coef' in k for k in dm.state_dict())


def test_posterior_mean_of_a_noise_free_state_is_the_previous_noise_free_state():
    """q(z_{t-1} | z_t, z_0) with z_t = sqrt(ᾱ_t) z_0 has mean sqrt(ᾱ_{t-1}) z_0 (ᾱ_{-1} = 1)."""
    dm = PriorDiffusion(timesteps=8)
    ab = dm.alphas_cumprod.double()
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    mean = dm.posterior_mean_coef1.double() + dm.posterior_mean_coef2.double() * ab.sqrt()
    torch.testing.assert_close(mean, ab_prev.sqrt(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('timesteps', [1, 3, 8])
def test_T_reverse_steps_from_T_minus_1_down_to_0(timesteps):
    dm = _tiny(timesteps)
    calls = _count_denoiser_calls(dm)
    dm(torch.randn(1, 3, 16, 16))
    assert calls == list(range(timesteps - 1, -1, -1))
    calls.clear()
    dm(torch.randn(1, 3, 16, 16), z_target=torch.randn(1, 6, 4, 4))
    assert len(calls) == timesteps


@pytest.mark.parametrize('scale', [4, 1])
def test_shapes_and_errors(scale):
    dm = _tiny(prior_scale=scale)
    assert dm(torch.randn(2, 3, 24, 32)).shape == (2, 6, 24 // scale, 32 // scale)
    if scale > 1:
        with pytest.raises(ValueError, match='multiple of prior_scale'):
            dm(torch.randn(1, 3, 18, 32))
    with pytest.raises(ValueError, match='z_target'):
        dm(torch.randn(1, 3, 24, 32), z_target=torch.randn(1, 6, 3, 3))
    with pytest.raises(ValueError, match='timesteps'):
        PriorDiffusion(timesteps=0)


def test_sampling_is_deterministic_given_a_generator_and_differs_across_seeds():
    dm = _tiny()
    lq = torch.randn(2, 3, 16, 20)
    a = dm(lq, generator=torch.Generator().manual_seed(1))
    b = dm(lq, generator=torch.Generator().manual_seed(1))
    c = dm(lq, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the condition matters too
    assert not torch.allclose(a, dm(lq + 1, generator=torch.Generator().manual_seed(1)))


def test_training_path_depends_on_target_sampling_path_does_not():
    dm = _tiny()
    lq = torch.randn(1, 3, 16, 16)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    t1, t2 = torch.randn(1, 6, 4, 4), torch.randn(1, 6, 4, 4)
    out1 = dm(lq, z_target=t1, generator=gen())
    out2 = dm(lq, z_target=t2, generator=gen())
    assert (out1 - out2).abs().max() > 1e-6
    sample = dm(lq, generator=gen())
    # sampling starts from the same noise draw, unscaled; training starts from sqrt(ᾱ_T) t + sqrt(1-ᾱ_T) noise
    assert not torch.allclose(sample, out1)
    # the q-sample uses exactly the closed form: a perfect denoiser (returns the target) gives back the target
    dm.denoiser.forward = lambda z_t, c, t: t1.expand_as(z_t)
    torch.testing.assert_close(dm(lq, z_target=t1), t1)


def test_q_sample_at_step_T_is_the_closed_form():
    dm = _tiny(timesteps=5)
    seen = []
    dm.denoiser.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    target = torch.randn(1, 6, 4, 4)
    dm(torch.randn(1, 3, 16, 16), z_target=target, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 6, 4, 4, generator=torch.Generator().manual_seed(3))
    ab_T = float(np.prod(1 - np.linspace(0.1 ** 0.5, 0.99 ** 0.5, 5) ** 2))
    torch.testing.assert_close(seen[0], ab_T ** 0.5 * target + (1 - ab_T) ** 0.5 * noise, atol=1e-6, rtol=1e-5)


def test_training_path_backpropagates_through_all_steps_to_every_parameter():
    dm = _tiny(timesteps=3)
    target = torch.randn(2, 6, 4, 5, requires_grad=True)
    out = dm(torch.randn(2, 3, 16, 20), z_target=target)
    (out - target.detach()).abs().mean().backward()
    for name, p in dm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert target.grad.abs().sum() > 0  # the chain starts from the (noised) target


def test_l1_diffusion_loss_goes_down_on_a_small_problem():
    """A few Adam steps on |ẑ - z| for a fixed (lq, z) pair reduce the loss (the chain is trainable)."""
    dm = _tiny(timesteps=4)
    lq = torch.randn(2, 3, 16, 16)
    z = torch.tanh(torch.nn.functional.avg_pool2d(lq, 4)).repeat(1, 2, 1, 1)  # a prior that lq determines
    opt = torch.optim.Adam(dm.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss = (dm(lq, z_target=z, generator=torch.Generator().manual_seed(step)) - z).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])


def test_explicit_noise_replaces_the_draw_in_sampling_and_training():
    """``noise=`` is the Gaussian draw itself: the same tensor as the generator would draw gives the same z."""
    dm = _tiny()
    lq, target = torch.randn(2, 3, 16, 24), torch.randn(2, 6, 4, 6)
    noise = torch.randn(2, 6, 4, 6, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(dm(lq, noise=noise), dm(lq, generator=torch.Generator().manual_seed(7)),
                               rtol=0, atol=0)
    torch.testing.assert_close(dm(lq, z_target=target, noise=noise),
                               dm(lq, z_target=target, generator=torch.Generator().manual_seed(7)), rtol=0, atol=0)
    # the draw matters, and it is the first denoiser input when sampling
    seen = []
    dm.denoiser.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    other = dm(lq, noise=noise + 1)
    assert torch.equal(seen[0], noise + 1)
    assert not torch.allclose(other, dm(lq, noise=noise))
    with pytest.raises(ValueError, match='noise has shape'):
        dm(lq, noise=torch.randn(2, 6, 4, 5))


def test_tpdiffnet_passes_noise_to_the_dm_with_the_callers_prior_shape():
    net = tiny_net(prior_ch=6, dm_timesteps=2).eval()
    with torch.no_grad():
        lq = torch.rand(1, 3, 16, 24)  # a multiple of 8: no padding, the noise is used as given
        noise = torch.randn(1, 6, 4, 6, generator=torch.Generator().manual_seed(3))
        out, z = net(lq, noise=noise, return_prior=True)
        ref, z_ref = net(lq, generator=torch.Generator().manual_seed(3), return_prior=True)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
        assert not torch.allclose(z, net(lq, noise=-noise, return_prior=True)[1])
        # any size: the noise has the prior shape callers see, ceil(H/s) x ceil(W/s), padded inside
        lq = torch.rand(1, 3, 13, 21)
        assert net(lq, noise=torch.randn(net.prior_shape(lq))).shape == lq.shape
        with pytest.raises(ValueError, match='noise has shape'):
            net(lq, noise=torch.randn(1, 6, 3, 5))
