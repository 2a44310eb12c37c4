"""TTformer (Texture Transfer Transformer) deblurring network of TP-Diff: ``TPDiffNet`` = DM + U-Net.

``TTformerBlock``: ``x = x + FM-MSA(LN x, z); x = x + TM-FFN(LN x, z)`` (``x [B, C, H, W]``, ``z
[B, prior_ch, H, W]`` at the block's resolution, or None for a prior-free block).

``TPDiffNet`` is Restormer-shaped: 3x3 patch embedding, a 4-level U-Net with [4, 6, 6, 8] blocks and
[1, 2, 4, 8] heads, pixel-unshuffle downsampling / pixel-shuffle upsampling, skip concatenation with a
1x1 channel reduction at levels 3 and 2 (level 1 keeps the concatenated 2·dim channels, as Restormer
does), 4 refinement blocks at 2·dim, a 3x3 output conv and the global residual ``out = lq + r``.

The prior (``[B, prior_ch, h, w]``, h = H/prior_scale) comes from the caller (``prior=``, e.g. the
TPE's z), else from the DM (``self.dm``), else it is zeros (``use_dm=False`` and no prior given). It
is resized to every level: bilinear up to full resolution / level 2, area (average) down for
levels coarser than the prior. With ``multi_scale_prior=False`` only the full-resolution stages use it
(encoder level 1, decoder level 1, refinement); the blocks of levels 2-4 are built prior-free
(plain transposed attention + plain GDFN), so the ablation also has fewer parameters.

Any input size works: the input is padded by reflection (replication for tiny sides) to a multiple
of lcm(8, prior_scale), the U-Net and the DM run on the padded image and the output is cropped back.
Prior tensors seen by callers (``prior``, ``prior_target``, the returned prior) always have the TPE's
shape on lq, ``[B, prior_ch, ceil(H/s), ceil(W/s)]``; internally they are padded by replication to the
padded image's prior grid.

The class defaults are the paper-size configuration (tests/archs/test_paper_size.py): dim 30, the DM
with 64 features and 5 denoiser blocks, and the TPE's defaults give TPDiffNet 11,756,808 (DM 684,544)
+ TexturePriorEncoder 128,000 = 11,884,808 parameters, against the paper's 11.89M. dim 32 would give
13.23M: the prior convolutions of every block (Convs(z) of FM-MSA and TM-FFN) cost about 10%.
"""
import math

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn
from torch.utils.checkpoint import checkpoint

from tpdiff_plugin.archs.arch_util import gaussian_lowpass, grid_notch, icnr_, pad_to_multiple, zero_init_
from tpdiff_plugin.archs.diffusion_arch import PriorDiffusion
from tpdiff_plugin.archs.adaptive_filter import DeformFilterBase, check_deform_impl, check_filter_type
from tpdiff_plugin.archs.fm_msa import FMMSA
from tpdiff_plugin.archs.prior_generators import PRIOR_GENERATORS, build_prior_generator, check_prior_generator
from tpdiff_plugin.archs.tm_ffn import TMFFN
from tpdiff_plugin.utils.option_files import is_number


class LayerNorm2d(nn.Module):
    """Per-pixel LayerNorm over channels with weight and bias (Restormer's 'WithBias'): ``[B, C, H, W]`` kept.

    Hand-written because torch's ``nn.LayerNorm`` normalises the trailing dims, not the channel dim of NCHW.
    """

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.normalized_shape = (dim,)  # a constant, not x.shape[1:2]: ONNX export needs it static

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class TTformerBlock(nn.Module):
    """TTformer block. ``use_prior=False`` builds a prior-free block (Restormer's); ``fm_msa=False`` keeps
    TM-FFN's modulation but replaces FM-MSA by plain transposed attention. ``filter_type`` is FM-MSA's filter,
    ``tm_ffn_modulation`` where TM-FFN modulates (see ``TPDiffNet``)."""

    def __init__(self, dim, num_heads, ffn_expansion_factor=2.66, bias=False, prior_ch=64, use_prior=True,
                 fm_msa=True, filter_kernel=3, offset_groups=1, prior_hidden=16, deform_impl='auto',
                 filter_type='modulated_deform', tm_ffn_modulation='after_gate'):
        super().__init__()
        self.use_prior = use_prior
        self.norm1 = LayerNorm2d(dim)
        self.attn = FMMSA(dim, num_heads, bias=bias, prior_ch=prior_ch, use_filter=fm_msa and use_prior,
                          filter_kernel=filter_kernel, offset_groups=offset_groups, prior_hidden=prior_hidden,
                          deform_impl=deform_impl, filter_type=filter_type)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = TMFFN(dim, ffn_expansion_factor=ffn_expansion_factor, bias=bias, prior_ch=prior_ch,
                         use_prior=use_prior, prior_hidden=prior_hidden, modulation=tm_ffn_modulation)

    def forward(self, x, z=None):
        x = x + self.attn(self.norm1(x), z)
        return x + self.ffn(self.norm2(x), z)


class TTformerLevel(nn.Module):
    """A sequence of TTformer blocks sharing one prior: ``(x [B, C, H, W], z) -> [B, C, H, W]``.

    ``grad_checkpoint``: in training, recompute each block's activations in the backward pass instead
    of keeping them (``torch.utils.checkpoint``), trading about one extra forward for memory.
    """

    def __init__(self, num_blocks, grad_checkpoint=False, **block_kwargs):
        super().__init__()
        self.use_prior = block_kwargs.get('use_prior', True)
        self.grad_checkpoint = grad_checkpoint
        self.blocks = nn.ModuleList(TTformerBlock(**block_kwargs) for _ in range(num_blocks))

    def forward(self, x, z=None):
        z = z if self.use_prior else None
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(block, x, z, use_reentrant=False)
            else:
                x = block(x, z)
        return x


class Downsample(nn.Sequential):
    """``[B, C, H, W] -> [B, 2C, H/2, W/2]``: 3x3 conv to C/2, then PixelUnshuffle(2)."""

    def __init__(self, dim):
        super().__init__(nn.Conv2d(dim, dim // 2, 3, padding=1, bias=False), nn.PixelUnshuffle(2))


class Upsample(nn.Sequential):
    """``[B, C, H, W] -> [B, C/2, 2H, 2W]``: 3x3 conv to 2C, then PixelShuffle(2).

    ``icnr_init``: the conv starts with the four sub-pixel filters of each output channel equal (ICNR, Aitken
    et al. 2017), so the pixel shuffle starts as a nearest-neighbour upsampling of one conv. With independent
    random filters the four positions of every 2x2 output block differ systematically: a checkerboard of
    period 2 (4, 8 after two, three levels) that the output conv passes on as soon as it is non-zero.
    """

    def __init__(self, dim, icnr_init=True):
        super().__init__(nn.Conv2d(dim, dim * 2, 3, padding=1, bias=False), nn.PixelShuffle(2))
        if icnr_init:
            icnr_(self[0].weight, scale=2)


def resize_prior(z, size):
    """Resize a prior to ``size``: unchanged, bilinear when enlarging, area (average) when shrinking."""
    if tuple(z.shape[-2:]) == tuple(size):
        return z
    if size[0] <= z.shape[-2] and size[1] <= z.shape[-1]:
        return F.adaptive_avg_pool2d(z, size)
    return F.interpolate(z, size=size, mode='bilinear', align_corners=False)


def rescale_prior(z, prior_scale, level_scale, size):
    """Resize a prior at 1/``prior_scale`` of the padded image to a level at 1/``level_scale`` (``size``).

    When one scale divides the other, by a constant factor (``avg_pool2d`` / bilinear ``scale_factor``): the same
    values as :func:`resize_prior` by size, but a traced graph (``tpdiff export``) keeps dynamic sizes. Else by size.
    """
    if prior_scale == level_scale:
        return z
    if level_scale % prior_scale == 0:
        return F.avg_pool2d(z, level_scale // prior_scale)
    if prior_scale % level_scale == 0:
        return F.interpolate(z, scale_factor=prior_scale // level_scale, mode='bilinear', align_corners=False)
    return resize_prior(z, size)


@ARCH_REGISTRY.register()
class TPDiffNet(nn.Module):
    """TP-Diff deblurring network: DM (``self.dm``) + TTformer U-Net.

    ``forward(lq [B, in_ch, H, W], prior=None, prior_target=None, detach_prior=False,
    return_prior=False, generator=None, noise=None) -> out [B, out_ch, H, W]`` (or ``(out, prior_used)``).

    - ``prior`` given: used as is (DM bypassed). Else with ``use_dm``: ``ẑ = dm(padded lq, z_target=prior_target)``
      (the training path when ``prior_target`` is given, sampling from N(0, I) otherwise; ``generator``
      makes the sampling reproducible; ``noise`` gives the DM's Gaussian draw itself, as tiled inference
      does), or ``ẑ = prior_gen(padded lq)`` for another ``prior_generator``. Else zeros.
    - ``detach_prior``: the U-Net sees ``prior.detach()`` (the paper's "w/o joint training" ablation);
      the returned prior is NOT detached, so an L1 diffusion loss on it still trains the DM.
    - Prior shapes for callers: ``[B, prior_ch, ceil(H/s), ceil(W/s)]``.

    Args: in_ch / out_ch (Restormer's inp_channels / out_channels; equal, the output is lq + residual); dim,
    num_blocks, num_refinement_blocks, heads, ffn_expansion_factor and bias as Restormer's. Beyond Restormer's:
    prior_ch / prior_scale (the TPE's C and s), filter_kernel (k of FM-MSA's filter, odd), offset_groups,
    prior_hidden (width of the Convs(z) in each block), fm_msa, filter_type (FM-MSA's filter: 'modulated_deform'
    (default), 'predicted', 'feature_deform', 'plain', 'separable' or 'none', see ``adaptive_filter.py``; with
    fm_msa false there is none), tm_ffn_modulation (where TM-FFN applies h·(1+γ)+φ: 'after_gate' (default) or
    'before_dwconv', see ``tm_ffn.py``), multi_scale_prior, use_dm, dm_feats / dm_blocks /
    dm_cond_blocks / dm_timesteps / dm_beta_start / dm_beta_end (PriorDiffusion's feat_ch / num_blocks /
    num_cond_blocks / timesteps / beta_start / beta_end), deform_impl ('auto', 'torchvision', 'grid_sample', 'gather'),
    grad_checkpoint (recompute block activations in backward to save training memory: measured on CPU, one
    forward+backward at 96 px keeps ~1.3 GiB per image without it), identity_init (zero the output conv, so an
    untrained net returns its input exactly: ``out = lq + 0``; default on, see ``arch_util.zero_init_``),
    icnr_init (the pixel-shuffle upsamplers start checkerboard-free, see ``Upsample``; default on),
    prior_generator (what makes the prior with ``use_dm``: 'dm' (default, ``self.dm``) or the paper's
    comparison generators 'memory_bank', 'sparse_coding', 'vq' (``self.prior_gen``, ``prior_generators.py``,
    with dm_feats features and dm_cond_blocks + dm_blocks encoder blocks; the DM is then not built)),
    mem_slots (their number of memory atoms / codebook entries; the memory-based two copy the TPE memory, so
    it must equal network_tpe.mem_slots), residual_lowpass (not in the paper; 0, the default, is off: a sigma in
    px by which the residual r is Gaussian-blurred before ``lq + r``, in training and inference alike, so the
    net's change to its input is band-limited to scales above about 2 sigma. When on, the sigma is stored as the
    buffer ``residual_lowpass_sigma``, so a checkpoint loads only into a network with the same filter. A demo-recipe
    option: on the CPU budget DN's change below ~3 px was measured to lower PSNR and SSIM while its coarse part
    raised both; see bench/README.md, rounds 5 and 6), residual_notch (not in the paper; default false: after any
    lowpass, r is filtered by ``arch_util.grid_notch``, which passes nothing at the 2- and 4-pixel periods where the
    U-Net's sampling grids print checkerboards; stored as the buffer ``residual_grid_notch``; a demo-recipe option
    since round 8, off in the paper files, see bench/README.md, rounds 7 and 8).
    """

    #: option names of earlier releases -> today's (``utils/networks.py`` names the new one in its error)
    RENAMED_OPTIONS = {'inp_channels': 'in_ch', 'out_channels': 'out_ch'}
    #: options with a fixed set of values (``option_check`` names the key in its error)
    CHOICE_OPTIONS = {'prior_generator': PRIOR_GENERATORS}

    def __init__(self, in_ch=3, out_ch=3, dim=30, num_blocks=(4, 6, 6, 8), num_refinement_blocks=4,
                 heads=(1, 2, 4, 8), ffn_expansion_factor=2.66, bias=False, prior_ch=64, prior_scale=4,
                 filter_kernel=3, fm_msa=True, multi_scale_prior=True, use_dm=True, dm_feats=64, dm_blocks=5,
                 dm_timesteps=8, deform_impl='auto', offset_groups=1, prior_hidden=16, dm_cond_blocks=2,
                 dm_beta_start=0.1, dm_beta_end=0.99, grad_checkpoint=False, identity_init=True,
                 icnr_init=True, filter_type='modulated_deform', tm_ffn_modulation='after_gate', prior_generator='dm',
                 mem_slots=256, residual_lowpass=0, residual_notch=False):
        super().__init__()
        check_deform_impl(deform_impl)
        check_filter_type(filter_type)
        check_prior_generator(prior_generator)
        if prior_generator != 'dm' and not use_dm:
            raise ValueError(f'prior_generator {prior_generator!r} needs use_dm: true (use_dm: false is the w/o-DM '
                             'ablation, whose prior the TPE gives)')
        if dim % 2:
            raise ValueError(f'dim must be even (pixel-unshuffle halves it before doubling), got {dim}')
        if out_ch != in_ch:
            raise ValueError(f'out_ch ({out_ch}) must equal in_ch ({in_ch}): the output is lq + residual')
        if not is_number(residual_lowpass) or residual_lowpass < 0:
            raise ValueError('residual_lowpass must be a number >= 0 (a sigma in px; 0 = off), '
                             f'got {residual_lowpass!r}')
        self.residual_lowpass = float(residual_lowpass)
        if self.residual_lowpass:  # in the state dict (only when on): a checkpoint says how its output is filtered
            self.register_buffer('residual_lowpass_sigma', torch.tensor(self.residual_lowpass))
        if not isinstance(residual_notch, bool):
            raise ValueError(f'residual_notch must be true or false, got {residual_notch!r}')
        self.residual_notch = residual_notch
        if residual_notch:  # recorded like residual_lowpass_sigma: a checkpoint says its output is notched
            self.register_buffer('residual_grid_notch', torch.tensor(1.0))
        if len(num_blocks) != 4 or len(heads) != 4:
            raise ValueError('num_blocks and heads must have 4 entries (one per U-Net level)')
        self.prior_ch = prior_ch
        self.prior_scale = prior_scale
        self.multi_scale_prior = multi_scale_prior
        self.pad_multiple = 8 * prior_scale // math.gcd(8, prior_scale)
        self.dm = PriorDiffusion(in_ch=in_ch, prior_ch=prior_ch, prior_scale=prior_scale, feat_ch=dm_feats,
                                 num_blocks=dm_blocks, timesteps=dm_timesteps, beta_start=dm_beta_start,
                                 beta_end=dm_beta_end, num_cond_blocks=dm_cond_blocks) \
            if use_dm and prior_generator == 'dm' else None
        self.prior_generator = prior_generator if use_dm else None
        if use_dm and prior_generator != 'dm':  # None otherwise: the DM net's state dict is unchanged
            self.prior_gen = build_prior_generator(prior_generator, in_ch=in_ch, prior_ch=prior_ch,
                                                   prior_scale=prior_scale, feat_ch=dm_feats,
                                                   num_blocks=dm_cond_blocks + dm_blocks, mem_slots=mem_slots)
        else:
            self.prior_gen = None

        common = dict(ffn_expansion_factor=ffn_expansion_factor, bias=bias, prior_ch=prior_ch, fm_msa=fm_msa,
                      filter_kernel=filter_kernel, offset_groups=offset_groups, prior_hidden=prior_hidden,
                      deform_impl=deform_impl, filter_type=filter_type, tm_ffn_modulation=tm_ffn_modulation)

        def level(n, d, h, full_res):
            return TTformerLevel(n, grad_checkpoint=grad_checkpoint, dim=d, num_heads=h,
                                 use_prior=multi_scale_prior or full_res, **common)

        self.patch_embed = nn.Conv2d(in_ch, dim, 3, padding=1, bias=bias)
        self.encoder_level1 = level(num_blocks[0], dim, heads[0], True)
        self.down1_2 = Downsample(dim)
        self.encoder_level2 = level(num_blocks[1], dim * 2, heads[1], False)
        self.down2_3 = Downsample(dim * 2)
        self.encoder_level3 = level(num_blocks[2], dim * 4, heads[2], False)
        self.down3_4 = Downsample(dim * 4)
        self.latent = level(num_blocks[3], dim * 8, heads[3], False)
        self.up4_3 = Upsample(dim * 8, icnr_init)
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=bias)
        self.decoder_level3 = level(num_blocks[2], dim * 4, heads[2], False)
        self.up3_2 = Upsample(dim * 4, icnr_init)
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=bias)
        self.decoder_level2 = level(num_blocks[1], dim * 2, heads[1], False)
        self.up2_1 = Upsample(dim * 2, icnr_init)
        self.decoder_level1 = level(num_blocks[0], dim * 2, heads[0], True)
        self.refinement = level(num_refinement_blocks, dim * 2, heads[0], True)
        self.output = nn.Conv2d(dim * 2, out_ch, 3, padding=1, bias=bias)
        if identity_init:
            zero_init_(self.output)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A stored ``residual_lowpass_sigma`` must be this network's sigma (the buffer only records it)."""
        stored = state_dict.get(prefix + 'residual_lowpass_sigma')
        if stored is not None and self.residual_lowpass and abs(float(stored) - self.residual_lowpass) > 1e-6:
            error_msgs.append(f'residual_lowpass: the checkpoint was trained with {float(stored):g}, this network '
                              f'filters with {self.residual_lowpass:g}')
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def set_deform_impl(self, impl):
        """Switch every FM-MSA deformable filter to ``impl`` ('auto', 'torchvision', 'grid_sample', 'gather');
        weights are unaffected."""
        check_deform_impl(impl)
        for m in self.modules():
            if isinstance(m, DeformFilterBase):
                m.deform_impl = impl

    def prior_shape(self, lq):
        """The prior shape callers use for ``lq``: ``(B, prior_ch, ceil(H/s), ceil(W/s))``."""
        b, _, h, w = lq.shape
        s = self.prior_scale
        return (b, self.prior_ch, -(-h // s), -(-w // s))

    def _pad_prior(self, z, name, expected, padded_hw):
        if tuple(z.shape) != expected:
            raise ValueError(f'TPDiffNet: {name} has shape {tuple(z.shape)}, expected {expected} '
                             '([B, prior_ch, ceil(H/prior_scale), ceil(W/prior_scale)])')
        ph, pw = padded_hw[0] - z.shape[-2], padded_hw[1] - z.shape[-1]
        return F.pad(z, (0, pw, 0, ph), mode='replicate') if ph or pw else z

    def unet(self, x, z):
        """The TTformer U-Net on a padded image: ``x [B, C, H, W]``, ``z`` at ``H/s`` -> residual ``[B, out, H, W]``."""
        h, w = x.shape[-2:]
        z1, z2, z3, z4 = (rescale_prior(z, self.prior_scale, 2 ** k, (h >> k, w >> k))
                          if k == 0 or self.multi_scale_prior else None for k in range(4))

        enc1 = self.encoder_level1(self.patch_embed(x), z1)
        enc2 = self.encoder_level2(self.down1_2(enc1), z2)
        enc3 = self.encoder_level3(self.down2_3(enc2), z3)
        lat = self.latent(self.down3_4(enc3), z4)
        dec3 = self.reduce_chan_level3(torch.cat([self.up4_3(lat), enc3], dim=1))
        dec3 = self.decoder_level3(dec3, z3)
        dec2 = self.reduce_chan_level2(torch.cat([self.up3_2(dec3), enc2], dim=1))
        dec2 = self.decoder_level2(dec2, z2)
        dec1 = self.decoder_level1(torch.cat([self.up2_1(dec2), enc1], dim=1), z1)
        r = self.output(self.refinement(dec1, z1))
        if self.residual_lowpass:
            r = gaussian_lowpass(r, self.residual_lowpass)
        return grid_notch(r) if self.residual_notch else r

    def generate_prior(self, lq, prior_target=None, generator=None, noise=None):
        """The prior this net makes for ``lq [B, in_ch, H, W]`` without being given one: the DM's ẑ (its training
        path when ``prior_target`` is given, else sampled from N(0, I)), another ``prior_generator``'s, or zeros
        without either; the prior shape for callers. The U-Net is not run: stage 2's DM warm-up
        (``train.dm_warmup_iter``) trains the DM through this alone."""
        x = pad_to_multiple(lq, self.pad_multiple)
        return self._generate(x, self.prior_shape(lq), prior_target, generator, noise)[1]

    def _generate(self, x, expected, prior_target, generator, noise):
        """``generate_prior`` on the padded image ``x``: ``(z_full, z)``, the prior at the padded size the U-Net
        uses and cropped to ``expected``."""
        padded_hw = (x.shape[-2] // self.prior_scale, x.shape[-1] // self.prior_scale)
        if self.dm is not None:
            target = None
            if prior_target is not None:
                target = self._pad_prior(prior_target, 'prior_target', expected, padded_hw)
            if noise is not None:
                noise = self._pad_prior(noise, 'noise', expected, padded_hw)
            z_full = self.dm(x, z_target=target, generator=generator, noise=noise)
        elif self.prior_gen is not None:  # from lq alone: prior_target, generator and noise are not used
            z_full = self.prior_gen(x)
        else:
            z_full = x.new_zeros((x.shape[0], self.prior_ch) + padded_hw)
        return z_full, z_full[..., :expected[2], :expected[3]]

    def forward(self, lq, prior=None, prior_target=None, detach_prior=False, return_prior=False, generator=None,
                noise=None):
        """``noise`` (optional, the prior shape for callers): the DM's Gaussian draw, used instead of drawing
        one (see ``PriorDiffusion.forward``); padded by replication like the other prior tensors."""
        h, w = lq.shape[-2:]
        expected = self.prior_shape(lq)
        x = pad_to_multiple(lq, self.pad_multiple)
        if prior is not None:
            z_full = self._pad_prior(prior, 'prior', expected, (x.shape[-2] // self.prior_scale,
                                                                x.shape[-1] // self.prior_scale))
            z = prior
        else:
            z_full, z = self._generate(x, expected, prior_target, generator, noise)
        out = self.unet(x, z_full.detach() if detach_prior else z_full)[..., :h, :w] + lq
        return (out, z) if return_prior else out
