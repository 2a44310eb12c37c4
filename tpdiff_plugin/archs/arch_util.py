"""Helpers shared by the plugin's networks (BasicSR keeps such things in ``archs/arch_util.py``).

Not auto-registered: the archs package imports only ``*_arch.py`` modules into the registry.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur


def pad_to_multiple(x, multiple, mode='reflect', square=False):
    """Pad ``x [..., H, W]`` at the bottom/right up to multiples of ``multiple`` (and to a square if asked).

    Reflection needs the pad to be smaller than the side; tiny inputs fall back to replication.
    Returns ``x`` itself when nothing is to pad, else the padded tensor; crop with ``[..., :H, :W]``.
    Used by TPDiffNet (lcm(8, s)), the TPE (s), ReblurUNet (2**(levels-1), replicate) and the peers.
    """
    h, w = x.shape[-2:]
    th, tw = h + (-h) % multiple, w + (-w) % multiple
    if square:
        th = tw = max(th, tw)
    ph, pw = th - h, tw - w
    if ph == 0 and pw == 0:
        return x
    if mode == 'reflect' and (ph >= h or pw >= w):
        mode = 'replicate'
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def is_channels_last(x):
    """Whether ``x [B, C, H, W]`` is laid out channels_last and not also plain contiguous (as when C or H·W is 1):
    the test by which FM-MSA, TM-FFN and the gather filter pick their channels_last paths."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


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


def small_init_(conv, scale=0.1):
    """Scale a layer's weight by ``scale`` and zero its bias in place; return it.

    For the last layer of a prior branch (FM-MSA's offsets/mask, TM-FFN's γ/φ): the block starts near its
    prior-free form while, unlike a zero layer, every parameter of the branch gets gradient from the start.
    """
    with torch.no_grad():
        conv.weight.mul_(scale)
        conv.bias.zero_()
    return conv


def icnr_(weight, scale=2):
    """ICNR init in place of a conv weight ``[C·scale², C_in, k, k]`` that feeds ``PixelShuffle(scale)``: one
    kaiming-uniform filter per output channel, repeated for its scale² sub-pixel positions (PixelShuffle
    puts channel ``c·scale² + i`` at position i of output channel c). Hand-written: torch has no ICNR."""
    c_out = weight.shape[0] // (scale * scale)
    base = torch.empty(c_out, *weight.shape[1:])
    nn.init.kaiming_uniform_(base, a=5 ** 0.5)  # nn.Conv2d's default init
    with torch.no_grad():
        weight.copy_(base.repeat_interleave(scale * scale, dim=0))
    return weight


def gaussian_lowpass(x, sigma):
    """``x [B, C, H, W]`` blurred per channel by a Gaussian of ``sigma`` px (kernel 2·ceil(3 sigma)+1, reflect-padded).

    torchvision's ``gaussian_blur`` does the filtering; this only fixes the kernel size from ``sigma``. Used for
    TPDiffNet's ``residual_lowpass`` and for ``train.fine_change_opt``'s detail (``x - gaussian_lowpass(x)``).
    """
    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(x, kernel_size=[size, size], sigma=[float(sigma), float(sigma)])


def grid_notch(x):
    """``x [B, C, H, W]`` filtered per channel by [1, 2, 2, 2, 1]/8 in both directions (reflect-padded, shape kept).

    The shortest symmetric filter whose response is exactly zero at the 2- and 4-pixel periods (it is the 4-tap
    box, zero at both, convolved with [1, 1]/2 to centre it): the periods at which a U-Net's 2x and 4x sampling
    grids print checkerboards. Used for TPDiffNet's ``residual_notch``. Hand-written: torch and torchvision offer
    Gaussian and box blurs, but no centred filter with these zeros.
    """
    taps = x.new_tensor([1., 2., 2., 2., 1.]) / 8
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode='reflect')
    x = F.conv2d(x, taps.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, taps.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


class BinomialBlur(nn.Module):
    """The [1, 2, 1]/4 low-pass in both directions, per channel, reflect-padded: ``[B, C, H, W]`` kept.

    Placed before a stride-2 conv it anti-aliases the subsampling (Zhang 2019, "Making convolutional networks
    shift-invariant again"; StyleGAN2's discriminator). A Gaussian of sigma 1/sqrt(2 ln 2) sampled at three
    taps is exactly [1, 2, 1]/4, so torchvision's ``gaussian_blur`` computes it.
    """

    SIGMA = 1 / math.sqrt(2 * math.log(2))

    def forward(self, x):
        return gaussian_blur(x, kernel_size=[3, 3], sigma=[self.SIGMA, self.SIGMA])
