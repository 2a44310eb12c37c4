"""ReblurUNet: shapes for any size, the global residual, gradients, and that it can learn a blur."""
import pytest
import torch
import torch.nn.functional as F

from basicsr.archs import build_network
from tpdiff_plugin.archs.reblur_arch import ReblurUNet


@pytest.mark.parametrize('size', [(32, 32), (37, 50), (9, 8), (1, 3)])
def test_any_size_keeps_shape(size):
    net = ReblurUNet(base_ch=4, num_levels=4)
    x = torch.rand(2, 3, *size)
    assert net(x).shape == x.shape


def test_untrained_net_is_the_identity_unless_turned_off():
    x = torch.rand(1, 3, 21, 19)
    assert torch.equal(ReblurUNet(base_ch=4, num_levels=3)(x), x)  # identity_init: zero output conv
    assert (ReblurUNet(base_ch=4, num_levels=3, identity_init=False)(x) - x).abs().max() > 1e-3


def test_global_residual_is_identity_when_the_unet_outputs_zero():
    net = ReblurUNet(base_ch=4, num_levels=3, identity_init=False)
    torch.nn.init.zeros_(net.out_conv.weight)
    torch.nn.init.zeros_(net.out_conv.bias)
    x = torch.rand(1, 3, 21, 19)
    assert torch.equal(net(x), x)
    net_no_res = ReblurUNet(base_ch=4, num_levels=3, residual=False)
    net_no_res.load_state_dict(net.state_dict())
    assert torch.equal(net_no_res(x), torch.zeros_like(x))


def test_out_ch_differs_disables_residual():
    net = ReblurUNet(in_ch=3, out_ch=1, base_ch=4, num_levels=2)
    assert net(torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)


def test_levels_and_gradients_reach_every_parameter():
    net = build_network({'type': 'ReblurUNet', 'base_ch': 4, 'num_levels': 4, 'identity_init': False})
    assert len(net.downs) == 3 and len(net.decoders) == 3
    # widths double per level: 4, 8, 16, 32
    assert [d.out_channels for d in net.downs] == [8, 16, 32]
    net(torch.rand(2, 3, 24, 24)).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_levels_raise():
    with pytest.raises(ValueError, match='num_levels'):
        ReblurUNet(num_levels=0)


def test_learns_a_fixed_blur():
    """Sharp -> blurry with one box kernel: the L1 error falls well below the identity's in 150 steps."""
    torch.manual_seed(0)
    net = ReblurUNet(base_ch=8, num_levels=3)
    kernel = torch.full((3, 1, 5, 5), 1 / 25)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def batch():
        sharp = F.interpolate(torch.rand(4, 3, 8, 8), size=32, mode='nearest')  # blocky, strong edges
        return sharp, F.conv2d(F.pad(sharp, (2, 2, 2, 2), mode='replicate'), kernel, groups=3)

    sharp, blurry = batch()
    identity_err = (sharp - blurry).abs().mean().item()
    for _ in range(150):
        s, b = batch()
        loss = (net(s) - b).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = (net(sharp) - blurry).abs().mean().item()
    assert err < 0.5 * identity_err


def test_kernel_mode_can_only_blur():
    """kernel_size > 0: every output pixel is a convex combination of its k x k neighbourhood (the same weights
    for every channel), so constants stay constant and values stay inside the local range."""
    torch.manual_seed(0)
    net = ReblurUNet(base_ch=4, num_levels=3, kernel_size=5, init_blur=0.3)
    with torch.no_grad():  # random kernels, far from the initial ones
        torch.nn.init.normal_(net.out_conv.weight, std=1.0)
    x = torch.rand(2, 3, 21, 18)
    y = net(x)
    assert y.shape == x.shape
    pad = F.pad(x, (2, 2, 2, 2), mode='replicate')
    local_max = F.max_pool2d(pad, 5, stride=1)
    local_min = -F.max_pool2d(-pad, 5, stride=1)
    assert torch.all(y <= local_max + 1e-6) and torch.all(y >= local_min - 1e-6)
    const = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(net(const), const)
    # the weights are shared by the channels: a grey image stays grey
    grey = torch.rand(1, 1, 16, 16).repeat(1, 3, 1, 1)
    out = net(grey)
    torch.testing.assert_close(out[:, 0], out[:, 2])


def test_kernel_mode_starts_as_a_light_blur_and_learns_a_heavier_one():
    torch.manual_seed(0)
    net = ReblurUNet(base_ch=8, num_levels=3, kernel_size=5, init_blur=0.1)
    x = torch.rand(1, 3, 16, 16)
    kernels = net.out_conv(torch.zeros(1, 8, 16, 16)).softmax(dim=1)  # zero weights: the bias alone
    assert kernels[0, 12].allclose(torch.tensor(0.9)) and kernels[0, 0].allclose(torch.tensor(0.1 / 24))
    assert 0 < (net(x) - x).abs().mean() < 0.1
    box = torch.full((3, 1, 5, 5), 1 / 25)
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    for _ in range(100):
        sharp = F.interpolate(torch.rand(4, 3, 8, 8), size=32, mode='nearest')
        target = F.conv2d(F.pad(sharp, (2, 2, 2, 2), mode='replicate'), box, groups=3)
        loss = (net(sharp) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * (sharp - target).abs().mean().item()
    with pytest.raises(ValueError, match='kernel_size'):
        ReblurUNet(kernel_size=4)
    with pytest.raises(ValueError, match='init_blur'):
        ReblurUNet(kernel_size=3, init_blur=0)
