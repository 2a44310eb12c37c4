"""Every TP-Diff network builds from a YAML ``network_*`` block (BasicSR) and from mmengine's MODELS."""
import copy

import pytest
import torch
import yaml
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY

import tpdiff_plugin
from tpdiff_plugin.archs.diffusion_arch import PriorDiffusion
from tpdiff_plugin.archs.tpe_arch import TexturePriorEncoder
from tpdiff_plugin.archs.ttformer_arch import TPDiffNet



OPTIONS = yaml.safe_load('''
network_g:
  type: TPDiffNet
  dim: 4
  num_blocks: [1, 1, 1, 1]
  num_refinement_blocks: 1
  heads: [1, 1, 2, 2]
  prior_ch: 6
  prior_hidden: 4
  dm_feats: 8
  dm_blocks: 1
  dm_timesteps: 2
  deform_impl: grid_sample
network_tpe:
  type: TexturePriorEncoder
  prior_ch: 6
  mem_slots: 8
  enc_ch: 4
network_dm:
  type: PriorDiffusion
  prior_ch: 6
  feat_ch: 8
  num_blocks: 1
  timesteps: 2
''')
CLASSES = {'network_g': TPDiffNet, 'network_tpe': TexturePriorEncoder, 'network_dm': PriorDiffusion}


def _run(net):
    x = torch.randn(1, 3, 20, 28)
    if isinstance(net, PriorDiffusion):
        assert net(x).shape == (1, 6, 5, 7)
    elif isinstance(net, TexturePriorEncoder):
        assert net(x, x).shape == (1, 6, 5, 7)
    else:
        assert net(x).shape == x.shape


@pytest.mark.parametrize('key', sorted(CLASSES))
def test_build_network_from_yaml_block(key):
    block = copy.deepcopy(OPTIONS[key])
    assert block['type'] in ARCH_REGISTRY
    net = build_network(block)
    assert type(net) is CLASSES[key]
    if key == 'network_g':
        assert net.dm.timesteps == 2 and net.encoder_level1.blocks[0].attn.filter.deform_impl == 'grid_sample'
    _run(net)


@pytest.mark.parametrize('key', sorted(CLASSES))
def test_mmengine_models_build_with_tpdiff_scope(key):
    from mmengine.registry import MODELS
    cfg = dict(OPTIONS[key])
    name = cfg.pop('type')
    assert name in tpdiff_plugin.MMENGINE_NAMES
    net = MODELS.build(dict(type=f'tpdiff.{name}', **cfg))
    assert type(net) is CLASSES[key]
    _run(net)
