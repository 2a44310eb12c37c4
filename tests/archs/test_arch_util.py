"""Shared network helpers: zero init, ICNR, the binomial blur."""
import torch
from torch import nn

from tpdiff_plugin.archs.arch_util import BinomialBlur, icnr_, zero_init_


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
