"""Reblurring network RN of TP-Diff's cycle (paper: "the reblurring network uses a standard UNet").

RN maps a sharp image to a blurry one (s -> b~, and DN(b) -> b in the blur cycle). A plain 4-level
UNet: two 3x3 conv + LeakyReLU per level, stride-2 conv down, bilinear up + 1x1 conv, skip concat, and
a global residual (output = input + UNet(input)). With ``identity_init`` (default) the output conv starts
at zero, so an untrained RN is exactly the identity map (``arch_util.zero_init_``).

``kernel_size`` k > 0 (ours, not the paper's; off by default) turns RN into a kernel-predicting network:
the UNet's last conv predicts, per pixel, k x k logits whose softmax is a blur kernel (non-negative, summing
to one, shared by the colour channels), and the output is the input filtered with it (``F.unfold``). RN can
then only blur, by construction, instead of fooling D_B with colour shifts or textures (measured on the
demo data: the residual UNet changed colours and left the sharpness of s untouched). It starts with the
centre tap at ``1 - init_blur`` and the rest spread evenly over the other taps (zero last-conv weights, a
centre bias).

Shapes: [B, in_ch, H, W] -> [B, out_ch, H, W] for any H, W: the input is padded (replicate) to a
multiple of 2**(num_levels-1) and the output cropped back.
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY

from tpdiff_plugin.archs.arch_util import pad_to_multiple, zero_init_


def _double_conv(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(cout, cout, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True))


@ARCH_REGISTRY.register()
class ReblurUNet(nn.Module):
    """Standard UNet, sharp -> blurry, with a global residual.

    Args:
        in_ch (int): input channels.
        out_ch (int): output channels (the residual is used only when equal to in_ch).
        base_ch (int): channels at full resolution; doubled per level.
        num_levels (int): resolution levels including the bottom one (4: three downsamplings).
        residual (bool): add the input to the output.
        identity_init (bool): zero the output conv, so that with the residual the untrained net is the
            identity map.
        kernel_size (int): 0 (default): the UNet's output (plus the residual) is the image. k > 0 (odd):
            a per-pixel k x k blur kernel predicted by the UNet is applied to the input (see above).
        init_blur (float): kernel mode: the weight off the centre tap at initialisation.
    """

    def __init__(self, in_ch=3, out_ch=3, base_ch=32, num_levels=4, residual=True, identity_init=True,
                 kernel_size=0, init_blur=0.1):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f'ReblurUNet: num_levels must be >= 1, got {num_levels}')
        if kernel_size and (kernel_size % 2 == 0 or kernel_size < 3 or out_ch != in_ch):
            raise ValueError(f'ReblurUNet: kernel_size must be 0 or odd >= 3 (with out_ch == in_ch), got {kernel_size}')
        if kernel_size and not 0 < init_blur < 1:
            raise ValueError(f'ReblurUNet: init_blur must be in (0, 1), got {init_blur}')
        self.kernel_size = kernel_size
        self.residual = residual and in_ch == out_ch
        self.factor = 2**(num_levels - 1)
        chs = [base_ch * 2**i for i in range(num_levels)]
        self.encoders = nn.ModuleList([_double_conv(in_ch, chs[0])] +
                                      [_double_conv(chs[i], chs[i]) for i in range(1, num_levels)])
        self.downs = nn.ModuleList([nn.Conv2d(chs[i], chs[i + 1], 3, 2, 1) for i in range(num_levels - 1)])
        self.ups = nn.ModuleList([nn.Conv2d(chs[i + 1], chs[i], 1) for i in range(num_levels - 1)])
        self.decoders = nn.ModuleList([_double_conv(2 * chs[i], chs[i]) for i in range(num_levels - 1)])
        self.out_conv = nn.Conv2d(chs[0], kernel_size * kernel_size if kernel_size else out_ch, 3, 1, 1)
        if kernel_size:
            zero_init_(self.out_conv)
            with torch.no_grad():  # softmax: centre 1 - init_blur, the others init_blur / (k^2 - 1) each
                taps = kernel_size * kernel_size
                self.out_conv.bias[taps // 2] = math.log((1 - init_blur) * (taps - 1) / init_blur)
        elif identity_init:
            zero_init_(self.out_conv)

    def forward(self, x):
        h, w = x.shape[-2:]
        feat = pad_to_multiple(x, self.factor, mode='replicate')
        skips = []
        for i, enc in enumerate(self.encoders):
            feat = enc(feat)
            if i < len(self.downs):
                skips.append(feat)
                feat = self.downs[i](feat)
        for i in reversed(range(len(self.decoders))):
            feat = F.interpolate(feat, scale_factor=2, mode='bilinear', align_corners=False)
            feat = self.decoders[i](torch.cat([self.ups[i](feat), skips[i]], dim=1))
        out = self.out_conv(feat)[..., :h, :w]
        if self.kernel_size:
            return self.apply_kernels(x, out.softmax(dim=1))
        return x + out if self.residual else out

    def apply_kernels(self, x, kernels):
        """Filter ``x [B, C, H, W]`` with per-pixel kernels ``[B, k*k, H, W]`` (replicate padding)."""
        b, c, h, w = x.shape
        k = self.kernel_size
        patches = F.unfold(F.pad(x, (k // 2,) * 4, mode='replicate'), k)  # [B, C*k*k, H*W]
        return (patches.view(b, c, k * k, h, w) * kernels.unsqueeze(1)).sum(dim=2)
