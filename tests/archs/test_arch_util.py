"""Shared network helpers: padding to a multiple, zero / small init, ICNR, the binomial blur, the Gaussian low-pass."""
import math

import pytest
import torch
from torch import nn

from tpdiff_plugin.archs.arch_util import (BinomialBlur, gaussian_lowpass, grid_notch, icnr_, pad_to_multiple,
                                           small_init_, zero_init_)
from tpdiff_plugin.archs.adaptive_filter import DEFORM_IMPLS, check_deform_impl


def test_pad_to_multiple_reflects_and_falls_back_to_replication():
    x = torch.arange(35.).view(1, 1, 5, 7)
    y = pad_to_multiple(x, 4)
    assert y.shape == (1, 1, 8, 8)
    assert torch.equal(y[..., :5, :7], x)
    assert torch.equal(y[..., 5, :7], x[..., 3, :])  # reflection of row 4 about row 4 -> row 3
    assert pad_to_multiple(x, 1) is x
    tiny = pad_to_multiple(torch.ones(1, 1, 2, 2), 8)  # pad larger than the side: replication
    assert torch.equal(tiny, torch.ones(1, 1, 8, 8))
    x = torch.arange(12.0).view(1, 1, 3, 4)
    p = pad_to_multiple(x, 8)  # pads of 5 and 4 exceed the sides: replication
    assert p.shape == (1, 1, 8, 8)
    torch.testing.assert_close(p[..., 7, :4], x[..., 2, :])


def test_pad_to_multiple_square_and_replicate_mode():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    assert pad_to_multiple(x, 1, square=True).shape == (1, 1, 4, 4)
    assert pad_to_multiple(x, 4, square=True).shape == (1, 1, 4, 4)
    assert pad_to_multiple(torch.rand(2, 3, 5, 9), 4, square=True).shape == (2, 3, 12, 12)
    p = pad_to_multiple(x, 2, mode='replicate')  # ReblurUNet's padding: small pads replicate too
    assert p.shape == (1, 1, 4, 4)
    torch.testing.assert_close(p[..., 3, :], x[..., 2, :])


def test_small_init_scales_the_weight_and_zeroes_the_bias():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 1)
    weight = conv.weight.detach().clone()
    assert small_init_(conv) is conv
    torch.testing.assert_close(conv.weight, weight * 0.1, atol=0, rtol=0)
    assert conv.bias.abs().sum() == 0 and conv.weight.requires_grad


def test_check_deform_impl():
    for impl in DEFORM_IMPLS:
        check_deform_impl(impl)
    with pytest.raises(ValueError, match="deform_impl must be one of .* got 'cuda'"):
        check_deform_impl('cuda')


def test_zero_init_zeroes_weight_and_bias():
    conv = zero_init_(nn.Conv2d(4, 3, 3))
    assert conv.weight.abs().sum() == 0 and conv.bias.abs().sum() == 0
    assert zero_init_(nn.Conv2d(4, 3, 3, bias=False)).bias is None


def test_icnr_makes_pixel_shuffle_a_nearest_neighbour_upsampling():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4 * 5, 3, padding=1, bias=False)
    icnr_(conv.weight, scale=2)
    x = torch.randn(2, 6, 7, 9)
    y = nn.PixelShuffle(2)(conv(x))
    nearest = torch.nn.functional.interpolate(y[..., ::2, ::2], scale_factor=2, mode='nearest')
    torch.testing.assert_close(y, nearest)
    assert conv.weight[0::4].std() > 0  # not a constant: each output channel has its own random filter
    plain = nn.PixelShuffle(2)(nn.Conv2d(6, 20, 3, padding=1, bias=False)(x))
    assert not torch.allclose(plain, torch.nn.functional.interpolate(plain[..., ::2, ::2], scale_factor=2))


def test_binomial_blur_impulse_response_and_constants():
    x = torch.zeros(1, 2, 7, 7)
    x[:, :, 3, 3] = 1
    y = BinomialBlur()(x)
    expected = torch.tensor([1., 2., 1.])[:, None] * torch.tensor([1., 2., 1.])[None] / 16
    torch.testing.assert_close(y[0, 1, 2:5, 2:5], expected)
    assert abs(y[0, 1].sum().item() - 1) < 1e-6
    const = torch.full((1, 3, 5, 6), 0.7)
    torch.testing.assert_close(BinomialBlur()(const), const)


@pytest.mark.parametrize('sigma', [0.7, 1.5])
def test_gaussian_lowpass_impulse_response_is_the_normalised_gaussian(sigma):
    x = torch.zeros(1, 2, 25, 25)
    x[:, :, 12, 12] = 1
    y = gaussian_lowpass(x, sigma)
    radius = math.ceil(3 * sigma)  # the kernel spans 2·ceil(3 sigma)+1 taps
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    expected = torch.zeros(25, 25)
    expected[12 - radius:13 + radius, 12 - radius:13 + radius] = g[:, None] * g[None]
    torch.testing.assert_close(y[0, 1], expected, atol=1e-7, rtol=1e-5)
    const = torch.full((1, 3, 9, 11), 0.3)
    torch.testing.assert_close(gaussian_lowpass(const, sigma), const)
    stripes = torch.tensor([1., -1.]).repeat(8)[None, None, None].expand(1, 1, 16, 16)  # 2 px period: filtered out
    assert gaussian_lowpass(stripes, sigma)[..., 4:-4, 4:-4].abs().max() < (0.3 if sigma < 1 else 1e-3)


def test_grid_notch_removes_the_2_and_4_pixel_periods_and_keeps_coarse_ones():
    """[1, 2, 2, 2, 1]/8 per axis: zero response at periods 2 and 4 (either axis), cos(pi/8)·|sin(pi/2)/(4 sin(pi/8))|
    at period 8, 1 for a constant, and the impulse response is the outer product of the taps."""
    n = 64
    t = torch.arange(n, dtype=torch.float32)

    def wave(period, axis):
        w = torch.cos(2 * math.pi * t / period)
        return (w[None, :] if axis else w[:, None]).expand(n, n)[None, None].repeat(1, 2, 1, 1)

    inner = (..., slice(8, -8), slice(8, -8))  # away from the reflect padding
    for axis in (0, 1):
        for period in (2, 4):
            assert grid_notch(wave(period, axis))[inner].abs().max() < 1e-5
        expected = math.cos(math.pi / 8) / (4 * math.sin(math.pi / 8))
        torch.testing.assert_close(grid_notch(wave(8, axis))[inner], expected * wave(8, axis)[inner], atol=1e-5,
                                   rtol=0)
    checker = wave(4, 0) * wave(8, 1)  # a grid: period 4 down, 8 across
    assert grid_notch(checker)[inner].abs().max() < 1e-5
    const = torch.full((1, 3, 9, 11), 0.4)
    torch.testing.assert_close(grid_notch(const), const)
    x = torch.zeros(1, 1, 11, 11)
    x[..., 5, 5] = 1
    taps = torch.tensor([1., 2., 2., 2., 1.]) / 8
    expected = torch.zeros(11, 11)
    expected[3:8, 3:8] = taps[:, None] * taps[None]
    torch.testing.assert_close(grid_notch(x)[0, 0], expected)
