"""The paper's size: TPDiffNet + TexturePriorEncoder = 11.89M parameters (±3%), TPE about 0.12M."""
import copy
from pathlib import Path

import yaml
from basicsr.archs import build_network

from tpdiff_plugin.archs.tpe_arch import TexturePriorEncoder
from tpdiff_plugin.archs.ttformer_arch import TPDiffNet

REPO = Path(__file__).resolve().parents[2]
PAPER_PARAMS = 11.89e6


def _n(m):
    return sum(p.numel() for p in m.parameters())


def _check(net_g, tpe):
    assert isinstance(net_g, TPDiffNet) and isinstance(tpe, TexturePriorEncoder)
    assert net_g.dm is not None, 'the paper-size network includes the DM'
    assert 80_000 <= _n(tpe) <= 160_000
    total = _n(net_g) + _n(tpe)
    assert abs(total - PAPER_PARAMS) <= 0.03 * PAPER_PARAMS, f'{total} parameters, paper: 11.89M'


def test_class_defaults_have_the_paper_size():
    _check(TPDiffNet(), TexturePriorEncoder())


def test_stage2_options_have_the_paper_size():
    path = REPO / 'options' / 'tpdiff_stage2.yml'
    assert path.is_file(), f'{path} is missing: the paper-schedule stage-2 options must exist'
    opt = yaml.safe_load(path.read_text(encoding='utf-8'))
    _check(build_network(copy.deepcopy(opt['network_g'])), build_network(copy.deepcopy(opt['network_tpe'])))


def test_prior_scale_1_keeps_the_paper_size():
    """The paper's full-resolution prior (prior_scale 1) changes only the pixel-unshuffle encoders (TPE, DM
    condition): 11.84M, still within the paper's 11.89M ± 3% (measured numbers in docs/performance.md)."""
    net_g, tpe = TPDiffNet(prior_scale=1), TexturePriorEncoder(prior_scale=1)
    _check(net_g, tpe)
    assert (_n(net_g), _n(tpe)) == (11_730_888, 112_640)
