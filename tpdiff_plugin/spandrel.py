"""TP-Diff for spandrel: ``import tpdiff_plugin.spandrel`` registers a ``TPDiffNet`` architecture with spandrel.

After the import, ``spandrel.ModelLoader().load_from_file('net_g_latest.pth')`` (chaiNNer, ComfyUI and other
apps built on spandrel load models this way) returns an ``ImageModelDescriptor`` holding a ``TPDiffNet``:
purpose ``Restoration``, scale 1, the checkpoint's input channels, size requirements ``multiple_of`` the
network's pad multiple (lcm(8, prior_scale)), tiling supported, float32 only (the DM's time embedding is
computed in float32, so fp16 or bf16 weights fail). Calling it (``model(image)``, ``[1, C, H, W]``
in [0, 1]) runs the DM from the start noise ``tpdiff deblur --seed 0`` draws for the whole padded image, so
the output is ``tpdiff deblur --tile 0``'s (float, before rounding). A tiling app calls the model per tile,
and each tile then gets its own draw; ``tpdiff deblur``, which crops one draw per tile, stays the reference.

spandrel hands an architecture only the state dict (``params_ema``, else ``params``), never the
``network_opt`` the plugin stores next to it, so the options are read from the weights' names and shapes
(:func:`detect_options`): in_ch, dim, num_blocks, num_refinement_blocks, heads, ffn_expansion_factor (a value
that gives the same hidden widths), bias, prior_ch, prior_hidden, multi_scale_prior, fm_msa / filter_type,
filter_kernel, offset_groups, tm_ffn_modulation, use_dm, prior_scale, dm_feats, dm_blocks, dm_cond_blocks, and
residual_lowpass and residual_notch (the buffers ``residual_lowpass_sigma`` and ``residual_grid_notch``; absent =
off). Not in the weights, so the defaults (those of every shipped options file) are assumed: dm_timesteps 8,
dm_beta_start 0.1, dm_beta_end 0.99, and without a DM prior_scale 4. A state dict that looks like TPDiffNet's
but that the detected network does not fit exactly is refused with ``spandrel.UnsupportedModelError``
naming the keys.
"""
import math
import warnings

import torch

with warnings.catch_warnings():  # spandrel's import emits torch.jit deprecation warnings
    warnings.simplefilter('ignore')
    from spandrel import (MAIN_REGISTRY, Architecture, ArchSupport, ImageModelDescriptor, ModelTiling,
                          SizeRequirements, UnsupportedModelError)
    from spandrel.util import KeyCondition, get_seq_len

from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
from tpdiff_plugin.utils.checkpoint import describe_keys

__all__ = ['TPDiffArch', 'detect_options', 'SEED']

SEED = 0  # the start noise's seed: `tpdiff deblur`'s default --seed
LEVELS = ('encoder_level1', 'encoder_level2', 'encoder_level3', 'latent')  # U-Net levels at dim · 1, 2, 4, 8
FULL_RES = ('encoder_level1', 'decoder_level1', 'refinement')  # the levels that always use the prior
DETECT = KeyCondition.has_all(
    'patch_embed.weight', 'encoder_level1.blocks.0.norm1.weight', 'encoder_level1.blocks.0.attn.temperature',
    'encoder_level1.blocks.0.ffn.project_in.weight', 'down1_2.0.weight', 'latent.blocks.0.attn.temperature',
    'up4_3.0.weight', 'reduce_chan_level3.weight', 'decoder_level1.blocks.0.norm1.weight',
    'refinement.blocks.0.norm1.weight', 'output.weight')


def _expansion_factor(hidden):
    """An ``ffn_expansion_factor`` f with ``int(d · f) == hidden[d]`` for every width d: 2.66 (the paper's) if it
    fits, else the shortest decimal in the interval that fits them all."""
    fits = lambda f: all(int(d * f) == h for d, h in hidden.items())  # noqa: E731
    if fits(2.66):
        return 2.66
    lo = max(h / d for d, h in hidden.items())
    hi = min((h + 1) / d for d, h in hidden.items())
    for digits in range(0, 7):
        for f in (round(lo, digits), round((lo + hi) / 2, digits), round(hi, digits)):
            if fits(f):
                return f
    raise UnsupportedModelError(f'TPDiffNet: no ffn_expansion_factor gives the FFN widths {hidden}')


def _filter_options(sd, prefix):
    """``fm_msa`` / ``filter_type`` / ``filter_kernel`` / ``offset_groups`` from the attention of one prior block."""
    f = prefix + 'attn.filter.'
    if prefix + 'attn.qkv.0.weight' in sd:
        return {'fm_msa': False}
    if f + 'weight' in sd:
        k = sd[f + 'weight'].shape[-1]
        convs = f + 'prior_convs.2.weight' if f + 'prior_convs.2.weight' in sd else f + 'feature_convs.2.weight'
        if convs not in sd:
            return {'filter_type': 'plain', 'filter_kernel': k}
        groups, rest = divmod(sd[convs].shape[0], 3 * k * k)
        kind = 'modulated_deform' if 'prior_convs' in convs else 'feature_deform'
        if rest == 0:
            return {'filter_type': kind, 'filter_kernel': k, 'offset_groups': groups}
    elif f + 'vertical.weight' in sd:
        return {'filter_type': 'separable', 'filter_kernel': sd[f + 'vertical.weight'].shape[-2]}
    elif f + 'prior_convs.2.weight' in sd:  # predicted: 3·k²·G outputs; k and G are told apart only for G = 1
        k = math.isqrt(sd[f + 'prior_convs.2.weight'].shape[0] // 3)
        if 3 * k * k == sd[f + 'prior_convs.2.weight'].shape[0] and k % 2:
            return {'filter_type': 'predicted', 'filter_kernel': k, 'offset_groups': 1}
    raise UnsupportedModelError(f'TPDiffNet: cannot tell the FM-MSA filter from the keys under {prefix}attn')


def detect_options(sd):
    """``TPDiffNet`` keyword arguments read from a state dict alone (see the module docstring)."""
    if not DETECT(sd):
        raise UnsupportedModelError('not a TPDiffNet state dict (patch_embed, encoder_level1, ..., output)')
    if any(k.startswith('prior_gen.') for k in sd):
        raise UnsupportedModelError('TPDiffNet: a network with prior_generator memory_bank, sparse_coding or vq '
                                    '(the paper\'s comparison generators) is not supported here; use '
                                    'Deblurrer.from_checkpoint')
    embed = sd['patch_embed.weight']
    dim = embed.shape[0]
    opts = {'in_ch': embed.shape[1], 'out_ch': sd['output.weight'].shape[0], 'dim': dim,
            'bias': 'patch_embed.bias' in sd,
            'num_blocks': [get_seq_len(sd, f'{level}.blocks') for level in LEVELS],
            'num_refinement_blocks': get_seq_len(sd, 'refinement.blocks'),
            'heads': [sd[f'{level}.blocks.0.attn.temperature'].shape[0] for level in LEVELS if
                      f'{level}.blocks.0.attn.temperature' in sd]}
    if len(opts['heads']) != 4:
        raise UnsupportedModelError('TPDiffNet: a U-Net level without blocks; its heads cannot be read')
    hidden = {dim << i: sd[f'{level}.blocks.0.ffn.project_out.weight'].shape[1] for i, level in enumerate(LEVELS)}
    opts['ffn_expansion_factor'] = _expansion_factor(hidden)
    prior = next((f'{level}.blocks.0.' for level in FULL_RES if f'{level}.blocks.0.ffn.prior_convs.0.weight' in sd),
                 None)
    if prior is not None:
        convs = sd[prior + 'ffn.prior_convs.0.weight']
        opts.update(prior_ch=convs.shape[1], prior_hidden=convs.shape[0])
        width = sd[prior + 'ffn.project_out.weight'].shape[1]
        opts['tm_ffn_modulation'] = {2 * width: 'after_gate', 4 * width: 'before_dwconv'}.get(
            sd[prior + 'ffn.prior_convs.2.weight'].shape[0], 'unknown')
        opts.update(_filter_options(sd, prior))
    opts['multi_scale_prior'] = any(k.startswith(LEVELS[1:]) and '.ffn.prior_convs.' in k for k in sd)
    opts['use_dm'] = 'dm.condition.head.1.weight' in sd
    if opts['use_dm']:
        scale = math.isqrt(sd['dm.condition.head.1.weight'].shape[1] // opts['in_ch'])
        opts.update(prior_scale=scale, prior_ch=sd['dm.denoiser.tail.weight'].shape[0],
                    dm_feats=sd['dm.denoiser.head.weight'].shape[0], dm_blocks=get_seq_len(sd, 'dm.denoiser.blocks'),
                    dm_cond_blocks=get_seq_len(sd, 'dm.condition.blocks'))
    sigma = sd.get('residual_lowpass_sigma')  # the buffer exists only when the filter is on
    opts['residual_lowpass'] = 0 if sigma is None else round(float(sigma), 6)
    opts['residual_notch'] = 'residual_grid_notch' in sd
    if opts.get('tm_ffn_modulation') == 'unknown':
        raise UnsupportedModelError(f'TPDiffNet: cannot tell where TM-FFN modulates from {prior}ffn.prior_convs')
    return opts


def _check_fit(net, sd):
    own = net.state_dict()
    missing, unexpected = set(own) - set(sd), set(sd) - set(own)
    shapes = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    parts = [f'{what}: {describe_keys(keys)}' for what, keys in
             (('missing', missing), ('unexpected', unexpected), ('mis-shaped', shapes)) if keys]
    if parts:
        raise UnsupportedModelError('TPDiffNet: the state dict does not fit the network its keys describe '
                                    f'({"; ".join(parts)}); it may come from another version of tpdiff-plugin')


def _call(model, image):
    """The network with ``tpdiff deblur``'s start noise (seed :data:`SEED`, drawn on the CPU) for ``image``."""
    return model(image, generator=torch.Generator().manual_seed(SEED))


class TPDiffArch(Architecture[TPDiffNet]):
    """spandrel's description of ``TPDiffNet`` checkpoints (detection by key names, options from shapes)."""

    def __init__(self):
        super().__init__(id='TPDiffNet', name='TP-Diff', detect=DETECT)

    def load(self, state_dict):
        opts = detect_options(state_dict)
        try:
            net = TPDiffNet(**opts)
        except ValueError as e:
            raise UnsupportedModelError(f'TPDiffNet: the detected options do not build a network: {e}') from None
        _check_fit(net, state_dict)
        tags = [f'{opts["dim"]}dim', f'{sum(opts["num_blocks"])}blocks',
                opts.get('filter_type', 'modulated_deform') if opts.get('fm_msa', True) else 'no-fm-msa',
                'dm' if opts['use_dm'] else 'no-dm']
        return ImageModelDescriptor(
            net, state_dict, architecture=self, purpose='Restoration', tags=tags, supports_half=False,
            supports_bfloat16=False, scale=1, input_channels=opts['in_ch'], output_channels=opts['out_ch'],
            size_requirements=SizeRequirements(multiple_of=net.pad_multiple), tiling=ModelTiling.SUPPORTED,
            call_fn=_call)


MAIN_REGISTRY.add(ArchSupport.from_architecture(TPDiffArch()), ignore_duplicates=True)
