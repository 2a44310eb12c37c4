"""Reblurring network RN of TP-Diff's cycle (paper: "the reblurring network uses a standard UNet").

RN maps a sharp image to a blurry one (s -> b~, and DN(b) -> b in the blur cycle). A plain 4-level
UNet: two 3x3 conv + LeakyReLU per level, stride-2 conv down, bilinear up + 1x1 conv, skip concat, and
a global residual (output = input + UNet(input)) so that it starts near the identity mapping.

Shapes: [B, in_ch, H, W] -> [B, out_ch, H, W] for any H, W: the input is padded (replicate) to a
multiple of 2**(num_levels-1) and the output cropped back.
"""
import torch
from torch import nn
from torch.nn import functional as F

from basicsr.utils.registry import ARCH_REGISTRY


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
    """

    def __init__(self, in_ch=3, out_ch=3, base_ch=32, num_levels=4, residual=True):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f'ReblurUNet: num_levels must be >= 1, got {num_levels}')
        self.residual = residual and in_ch == out_ch
        self.factor = 2**(num_levels - 1)
        chs = [base_ch * 2**i for i in range(num_levels)]
        self.encoders = nn.ModuleList([_double_conv(in_ch, chs[0])] +
                                      [_double_conv(chs[i], chs[i]) for i in range(1, num_levels)])
        self.downs = nn.ModuleList([nn.Conv2d(chs[i], chs[i + 1], 3, 2, 1) for i in range(num_levels - 1)])
        self.ups = nn.ModuleList([nn.Conv2d(chs[i + 1], chs[i], 1) for i in range(num_levels - 1)])
        self.decoders = nn.ModuleList([_double_conv(2 * chs[i], chs[i]) for i in range(num_levels - 1)])
        self.out_conv = nn.Conv2d(chs[0], out_ch, 3, 1, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.factor, (-w) % self.factor
        feat = F.pad(x, (0, pad_w, 0, pad_h), mode='replicate') if pad_h or pad_w else x
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
        return x + out if self.residual else out
