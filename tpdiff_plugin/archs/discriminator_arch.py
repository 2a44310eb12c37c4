"""PatchGAN discriminator of TP-Diff's cycle (paper: D_S, D_B and the wavelet discriminator D_W).

A 70x70 PatchGAN (pix2pix / CycleGAN): ``num_layers`` 4x4 stride-2 convs with LeakyReLU(0.2), then one
4x4 stride-1 conv and a 4x4 stride-1 conv to one logit per patch. With ``num_layers=3`` each logit sees
a 70x70 input window. The same class judges sharp images (D_S, 3 channels), blurry images (D_B,
3 channels) and the wavelet detail bands (D_W, ``in_ch=9`` at half resolution).

``blur_pool`` (option, default off: the paper's PatchGAN) low-passes the input of every stride-2 conv with
``arch_util.BinomialBlur``. A plain strided conv is aliased, and its gradient with respect to the image,
which is what the generator learns from, has a period-2 structure that a generator copies into its output
as a checkerboard; the blur removes that structure.

``highpass_gain`` (option, default 0: off, the paper's PatchGAN) also feeds the first conv the input's detail,
``gain * (x - gaussian_lowpass(x, highpass_sigma))``, next to the input itself (2 x ``in_ch`` channels). Blurry and
sharp photos differ by a few hundredths in that detail; at gain 1 a spectrally normalised D needs hundreds of Adam
steps to amplify it and sits at chance meanwhile (bench/README.md, round 8), while at gain 10 it tells them apart
within tens of steps. R1 penalises the gradient with respect to the image, which the gain multiplies: scale
``train.r1_weight`` by about 1 / gain**2 to keep the same smoothness.

Shapes: [B, in_ch, H, W] -> [B, 1, H / 2**num_layers - 2, W / 2**num_layers - 2] (floored per stride);
the input needs H, W >= 3 * 2**num_layers (24 px for num_layers=3).
"""
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from basicsr.utils.registry import ARCH_REGISTRY

from tpdiff_plugin.archs.arch_util import BinomialBlur, gaussian_lowpass

_NORMS = ('spectral', 'instance', 'none')


@ARCH_REGISTRY.register()
class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN.

    Args:
        in_ch (int): input channels (3 for images, 9 for wavelet bands).
        base_ch (int): channels of the first conv; doubled per stride-2 conv, capped at 8x.
        num_layers (int): number of stride-2 convs (3 gives the 70x70 receptive field).
        norm (str): 'spectral' (spectral norm on every conv, no feature norm), 'instance'
            (InstanceNorm after every conv but the first and last, as CycleGAN) or 'none'.
        blur_pool (bool): blur before every stride-2 conv (anti-aliasing; see the module docstring).
        highpass_gain (float): > 0 adds ``highpass_gain * (x - gaussian_lowpass(x, highpass_sigma))`` as extra input
            channels (see the module docstring); 0 (default) is the plain PatchGAN.
        highpass_sigma (float): the Gaussian's sigma in px for ``highpass_gain``.
    """

    #: option names of earlier releases -> today's (``utils/networks.py`` names the new one in its error)
    RENAMED_OPTIONS = {'n_layers': 'num_layers'}

    def __init__(self, in_ch=3, base_ch=64, num_layers=3, norm='spectral', blur_pool=False, highpass_gain=0.,
                 highpass_sigma=1.):
        super().__init__()
        if highpass_gain < 0 or highpass_sigma <= 0:
            raise ValueError('PatchDiscriminator: highpass_gain must be >= 0 and highpass_sigma > 0, got '
                             f'{highpass_gain} and {highpass_sigma}')
        self.highpass_gain, self.highpass_sigma = float(highpass_gain), float(highpass_sigma)
        if norm not in _NORMS:
            raise ValueError(f'PatchDiscriminator: norm must be one of {_NORMS}, got "{norm}"')
        if num_layers < 1:
            raise ValueError(f'PatchDiscriminator: num_layers must be >= 1, got {num_layers}')
        self.num_layers = num_layers
        wrap = spectral_norm if norm == 'spectral' else (lambda m: m)

        def block(cin, cout, stride, feature_norm):
            layers = [BinomialBlur()] if blur_pool and stride == 2 else []
            layers.append(wrap(nn.Conv2d(cin, cout, 4, stride, 1)))
            if feature_norm and norm == 'instance':
                layers.append(nn.InstanceNorm2d(cout))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            return layers

        chs = [base_ch * min(2**i, 8) for i in range(num_layers + 1)]
        layers = block(in_ch * (2 if highpass_gain else 1), chs[0], 2, feature_norm=False)
        for i in range(1, num_layers):
            layers += block(chs[i - 1], chs[i], 2, feature_norm=True)
        layers += block(chs[num_layers - 1], chs[num_layers], 1, feature_norm=True)
        layers.append(wrap(nn.Conv2d(chs[num_layers], 1, 4, 1, 1)))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        min_size = 3 * 2**self.num_layers
        if min(x.shape[-2:]) < min_size:
            raise ValueError(f'PatchDiscriminator(num_layers={self.num_layers}) needs inputs of at least '
                             f'{min_size}x{min_size} px, got {tuple(x.shape[-2:])}; use a larger patch '
                             '(gt_size) or fewer num_layers')
        if self.highpass_gain:
            x = torch.cat([x, self.highpass_gain * (x - gaussian_lowpass(x, self.highpass_sigma))], dim=1)
        return self.body(x)
