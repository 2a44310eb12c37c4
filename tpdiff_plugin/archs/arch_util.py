"""Helpers shared by the plugin's networks (BasicSR keeps such things in ``archs/arch_util.py``).

Not auto-registered: the archs package imports only ``*_arch.py`` modules into the registry.
"""
import math

import torch
from torch import nn


def zero_init_(conv):
    """Zero a layer's weight and bias in place and return it.

    A residual network (``out = x + f(x)``) whose last layer is zero starts as the exact identity map, so
    training can only move it away from "do no harm" for a reason (TP-Diff's DN and RN; the trick of
    ESRGAN's / NAFNet's residual branches). The zero layer still gets gradient from the first step
    (``d out / d W = features``), and the rest of the network from the second one on.
    """
    with torch.no_grad():
        nn.init.zeros_(conv.weight)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    return conv


class BinomialBlur(nn.Module):
    """The [1, 2, 1]/4 low-pass in both directions, per channel, reflect-padded: ``[B, C, H, W]`` kept.

    Placed before a stride-2 conv it anti-aliases the subsampling (Zhang 2019, "Making convolutional networks
    shift-invariant again"; StyleGAN2's discriminator). A Gaussian of sigma 1/sqrt(2 ln 2) sampled at three
    taps is exactly [1, 2, 1]/4, so torchvision's ``gaussian_blur`` computes it.
    """

    SIGMA = 1 / math.sqrt(2 * math.log(2))

    def forward(self, x):
        from torchvision.transforms.functional import gaussian_blur
        return gaussian_blur(x, kernel_size=[3, 3], sigma=[self.SIGMA, self.SIGMA])
