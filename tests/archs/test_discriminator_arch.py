"""PatchDiscriminator: the 70x70 receptive field, output shapes, norms, the high-pass input and input checks."""
import pytest
import torch
from torch import nn

from basicsr.archs import build_network
from conftest import d_separation_loss
from tpdiff_plugin.archs.arch_util import gaussian_lowpass
from tpdiff_plugin.archs.discriminator_arch import PatchDiscriminator


def _receptive_field(net, size=160):
    """Height/width of the input region that one central logit depends on (from its gradient)."""
    x = torch.rand(1, 3, size, size, requires_grad=True)
    out = net(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    support = x.grad.abs().sum(dim=(0, 1)) > 0
    rows = support.any(dim=1).nonzero()
    cols = support.any(dim=0).nonzero()
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_70x70_receptive_field():
    torch.manual_seed(0)
    net = PatchDiscriminator(in_ch=3, base_ch=4, num_layers=3, norm='none')
    assert _receptive_field(net) == (70, 70)


@pytest.mark.parametrize('num_layers,size,expected', [(3, 256, 30), (3, 64, 6), (3, 24, 1), (2, 32, 6)])
def test_output_shape(num_layers, size, expected):
    net = PatchDiscriminator(in_ch=9, base_ch=4, num_layers=num_layers)
    assert net(torch.rand(2, 9, size, size)).shape == (2, 1, expected, expected)


def test_strided_convs_are_4x4_stride_2_with_leaky_relu():
    net = PatchDiscriminator(base_ch=4, num_layers=3, norm='none')
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 3 + [(1, 1)] * 2
    assert all(c.kernel_size == (4, 4) for c in convs)
    assert [c.out_channels for c in convs] == [4, 8, 16, 32, 1]
    relus = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(relus) == 4 and all(r.negative_slope == 0.2 for r in relus)


def test_spectral_norm_bounds_each_conv():
    torch.manual_seed(0)
    net = build_network({'type': 'PatchDiscriminator', 'base_ch': 4, 'num_layers': 3, 'norm': 'spectral'})
    x = torch.rand(2, 3, 32, 32)
    for _ in range(30):  # power iterations run in training mode
        net(x)
    net.eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.05)
    assert not any(isinstance(m, nn.InstanceNorm2d) for m in net.modules())


def test_instance_norm_layers():
    net = PatchDiscriminator(base_ch=4, num_layers=3, norm='instance')
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert len(norms) == 3  # after conv 2, conv 3 and the stride-1 conv; not after the first or the last
    out = net(torch.rand(2, 3, 32, 32))
    assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    net = PatchDiscriminator(in_ch=9, base_ch=4, num_layers=2, norm='spectral')
    net(torch.rand(2, 9, 32, 32)).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_too_small_input_and_bad_options_raise():
    with pytest.raises(ValueError, match='at least 24x24'):
        PatchDiscriminator(base_ch=4, num_layers=3)(torch.rand(1, 3, 20, 32))
    with pytest.raises(ValueError, match='norm'):
        PatchDiscriminator(norm='batch')
    with pytest.raises(ValueError, match='num_layers'):
        PatchDiscriminator(num_layers=0)
    for bad in ({'highpass_gain': -1}, {'highpass_gain': 10, 'highpass_sigma': 0}):
        with pytest.raises(ValueError, match='highpass_gain must be >= 0 and highpass_sigma > 0'):
            PatchDiscriminator(**bad)


def test_highpass_input_is_the_image_and_its_gained_detail():
    """With highpass_gain the first conv reads [x, gain * (x - blur(x))]: the same net as a plain D over those 6
    channels, and on a constant image (no detail) the same as a plain D holding the first conv's image half."""
    torch.manual_seed(0)
    hp = PatchDiscriminator(base_ch=4, num_layers=2, norm='none', highpass_gain=10, highpass_sigma=1.5)
    assert hp.body[0].in_channels == 6 and PatchDiscriminator(num_layers=2).body[0].in_channels == 3
    plain6 = PatchDiscriminator(in_ch=6, base_ch=4, num_layers=2, norm='none')
    plain6.load_state_dict(hp.state_dict())
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(hp(x), plain6(torch.cat([x, 10 * (x - gaussian_lowpass(x, 1.5))], 1)))
    plain3 = PatchDiscriminator(base_ch=4, num_layers=2, norm='none')
    state = hp.state_dict()
    state['body.0.weight'] = state['body.0.weight'][:, :3]
    plain3.load_state_dict(state)
    flat = torch.full((2, 3, 32, 32), 0.3)
    torch.testing.assert_close(hp(flat), plain3(flat))
    assert (hp(x) - plain3(x)).abs().max() > 1e-3  # and the detail channels do reach the output


def _d_loss_after(gain):
    """The demo's D (spectral norm, no R1) after 60 steps on sharp textures against their blurred copies
    (``conftest.d_separation_loss``: 0.25 = chance)."""
    torch.manual_seed(0)
    return d_separation_loss(PatchDiscriminator(base_ch=8, num_layers=2, highpass_gain=gain))


def test_highpass_gain_lets_d_tell_blurry_from_sharp_early():
    """Round 8's finding, small: the plain D is near chance after 60 steps; with the detail at gain 10 it has
    learned to separate the two."""
    plain, gained = _d_loss_after(0), _d_loss_after(10)
    assert plain > 0.2 and gained < 0.15, (plain, gained)
