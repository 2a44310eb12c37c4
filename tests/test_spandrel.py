"""``tpdiff_plugin.spandrel``: spandrel's ModelLoader loads TPDiffNet checkpoints, options read from the weights."""
import inspect

import pytest
import torch

pytest.importorskip('spandrel')
import spandrel  # noqa: E402
import spandrel_extra_arches  # noqa: E402

import tpdiff_plugin.spandrel as tpdiff_spandrel  # noqa: E402  (registers TPDiffNet with spandrel)
from conftest import tiny_net_opts  # noqa: E402
from tpdiff_plugin.archs.arch_util import pad_to_multiple  # noqa: E402
from tpdiff_plugin.archs.ttformer_arch import TPDiffNet  # noqa: E402
from tpdiff_plugin.inference import Deblurrer  # noqa: E402
from tpdiff_plugin.utils.checkpoint import save_networks  # noqa: E402
from tpdiff_plugin.utils.option_files import load_options_file  # noqa: E402

# options that change the weights' names or shapes (or, residual_lowpass and residual_notch, a stored buffer); the others (schedule, init, impl) are not in a state dict
SHAPE_OPTIONS = ('in_ch', 'out_ch', 'dim', 'num_blocks', 'num_refinement_blocks', 'heads', 'bias', 'prior_ch',
                 'prior_hidden', 'multi_scale_prior', 'filter_kernel', 'offset_groups', 'use_dm', 'prior_scale',
                 'dm_feats', 'dm_blocks', 'dm_cond_blocks', 'filter_type', 'tm_ffn_modulation', 'residual_lowpass',
                 'residual_notch')


def _random_net(block, seed=0):
    """The network of an options block, with every weight moved off its init so outputs depend on all of them."""
    torch.manual_seed(seed)
    net = TPDiffNet(**{k: v for k, v in block.items() if k != 'type'}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net


def _same_network(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize('options, size', [('options/demo/stage2.yml', (37, 53)),
                                           ('options/tpdiff_stage2.yml', (21, 26))],
                         ids=['demo', 'paper'])
def test_model_loader_loads_a_saved_checkpoint_and_deblurs_as_the_plugin(tmp_path, options, size):
    block = load_options_file(options)['network_g']
    net = _random_net(block)
    path = tmp_path / 'net_g_latest.pth'
    save_networks([net], ['params'], str(path), network_opt=block)  # spandrel sees only params
    model = spandrel.ModelLoader().load_from_file(path)
    assert isinstance(model, spandrel.ImageModelDescriptor) and model.architecture.id == 'TPDiffNet'
    assert isinstance(model.model, TPDiffNet) and _same_network(model.model, net)
    assert (model.scale, model.input_channels, model.output_channels, model.purpose) == (1, 3, 3, 'Restoration')
    assert model.size_requirements.multiple_of == 8 and model.tiling == spandrel.ModelTiling.SUPPORTED
    detected = tpdiff_spandrel.detect_options(model.model.state_dict())
    defaults = {k: p.default for k, p in inspect.signature(TPDiffNet).parameters.items()}
    effective = {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **block}.items()}
    assert set(SHAPE_OPTIONS) <= set(detected) and detected == {k: effective[k] for k in detected}
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    out = model(x)
    want = Deblurrer(net, seed=tpdiff_spandrel.SEED)(x)  # tpdiff deblur --tile 0 --seed 0, before rounding
    assert out.shape == x.shape and (want - x).abs().max() > 0.01
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


VARIANTS = {
    'filter_predicted': dict(filter_type='predicted'),
    'filter_feature_deform': dict(filter_type='feature_deform', offset_groups=2),
    'filter_plain_k5': dict(filter_type='plain', filter_kernel=5),
    'filter_separable': dict(filter_type='separable'),
    'filter_none': dict(filter_type='none'),
    'fm_msa_off': dict(fm_msa=False),
    'ffn_before_dwconv': dict(tm_ffn_modulation='before_dwconv'),
    'one_scale_prior_bias': dict(multi_scale_prior=False, bias=True),
    'no_dm': dict(use_dm=False),
    'prior_scale_2_groups_2': dict(prior_scale=2, offset_groups=2, ffn_expansion_factor=2.66, heads=[1, 2, 2, 4]),
    'one_channel': dict(in_ch=1, out_ch=1, prior_ch=4),
    'residual_lowpass': dict(residual_lowpass=0.7),  # a buffer in the state dict, read back to the value
    'residual_notch': dict(residual_lowpass=0.7, residual_notch=True),  # so is the notch's flag
}


@pytest.mark.parametrize('overrides', VARIANTS.values(), ids=VARIANTS.keys())
def test_options_are_read_from_the_state_dict_alone(overrides):
    block = tiny_net_opts(dm_timesteps=8, **overrides)  # T is not in the weights: spandrel assumes the default 8
    net = _random_net(block)
    model = spandrel.MAIN_REGISTRY.load(net.state_dict())
    assert _same_network(model.model, net)
    x = torch.rand(1, block.get('in_ch', 3), 13, 19, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the rebuilt network computes what the original does (as Deblurrer runs it)
        want = net(pad_to_multiple(x, net.pad_multiple), generator=torch.Generator().manual_seed(0))
    want = want[..., :13, :19].clamp(0, 1)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-6)


def test_found_before_the_extra_architectures(tmp_path):
    """With spandrel-extra-arches (Restormer, MPRNet, ...) in the registry, a TPDiffNet is still a TPDiffNet."""
    registry = spandrel.MAIN_REGISTRY.copy()
    registry.add(*spandrel_extra_arches.EXTRA_REGISTRY, ignore_duplicates=True)
    net = _random_net(tiny_net_opts())
    assert registry.load(net.state_dict()).architecture.id == 'TPDiffNet'


def test_a_state_dict_it_cannot_place_is_refused_with_the_keys():
    state = _random_net(tiny_net_opts()).state_dict()
    odd = dict(state, **{'encoder_level2.blocks.0.attn.filter.lut': torch.zeros(3)})  # a part no option builds
    with pytest.raises(spandrel.UnsupportedModelError, match=r'unexpected: encoder_level2\..*\.filter\.lut'):
        spandrel.MAIN_REGISTRY.load(odd)
    bent = dict(state, **{'latent.blocks.0.ffn.dwconv.weight': torch.zeros(5, 1, 3, 3)})
    with pytest.raises(spandrel.UnsupportedModelError, match=r'mis-shaped: latent\.blocks\.0\.ffn\.dwconv\.weight'):
        spandrel.MAIN_REGISTRY.load(bent)
    unknown_filter = {k: v for k, v in state.items() if not k.startswith('encoder_level1.blocks.0.attn.filter.')}
    unknown_filter['encoder_level1.blocks.0.attn.filter.taps.weight'] = torch.zeros(4, 1, 3, 3)
    with pytest.raises(spandrel.UnsupportedModelError, match='cannot tell the FM-MSA filter'):
        spandrel.MAIN_REGISTRY.load(unknown_filter)
    with pytest.raises(spandrel.UnsupportedModelError):  # not TPDiffNet at all: no architecture claims it
        spandrel.MAIN_REGISTRY.load({'weight': torch.zeros(3, 3, 3, 3)})
