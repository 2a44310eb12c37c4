"""Checkpoints are loaded with ``weights_only=True`` everywhere: a pickle that would run code is refused
with one line naming the file, and its code never runs."""
import builtins
import os

import cv2
import numpy as np
import pytest
import torch

from basicsr.models import build_model
from conftest import REPO
from tpdiff_plugin import compat
from tpdiff_plugin.utils import resume
from tpdiff_plugin.cli import tpdiff_main
from tpdiff_plugin.inference import Deblurrer
from tpdiff_plugin.utils.errors import UserError


class _Payload:
    """Unpickling this calls ``open(marker, 'w')``: the marker file appears if the pickle is executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, 'w')


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / 'PWNED'
    path = tmp_path / 'evil.pth'
    torch.save({'params': {'weight': torch.zeros(1)}, 'payload': _Payload(marker)}, path)
    return path, marker


def _assert_refused(message, path, marker):
    assert str(path) in message and 'refused to unpickle' in message and '\n' not in message
    assert not marker.exists()


def test_the_payload_is_live_without_weights_only(evil):
    """Control: the same file loaded the unsafe way does run its code."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


NET = {'type': 'ReblurUNet', 'in_ch': 3, 'out_ch': 3, 'base_ch': 4, 'num_levels': 2}


@pytest.mark.parametrize('model_type', ['SRModel', 'UnpairedCycleModel'])
def test_pretrain_network_through_basicsr_load_network(evil, model_type):
    """``path.pretrain_network_g`` of an upstream model (mended ``BaseModel.load_network``) and of ours."""
    path, marker = evil
    opt = {'name': 'x', 'model_type': model_type, 'num_gpu': 0, 'dist': False, 'rank': 0, 'world_size': 1,
           'is_train': False, 'scale': 1, 'network_g': dict(NET),
           'path': {'pretrain_network_g': str(path), 'strict_load_g': True, 'param_key_g': 'params'}}
    with pytest.raises(UserError) as err:
        build_model(opt)
    _assert_refused(str(err.value), path, marker)


def test_deblurrer_from_checkpoint(evil):
    path, marker = evil
    with pytest.raises(UserError) as err:
        Deblurrer.from_checkpoint(path, opt=str(REPO / 'options' / 'demo' / 'stage2.yml'))
    assert str(path) in str(err.value) and '\n' not in str(err.value)
    assert not marker.exists()


def test_tpdiff_deblur_weights(evil, tmp_path, capsys):
    path, marker = evil
    img = tmp_path / 'in.png'
    cv2.imwrite(str(img), np.full((16, 16, 3), 128, np.uint8))
    code = tpdiff_main(['deblur', '-i', str(img), '-o', str(tmp_path / 'out'), '--weights', str(path),
                        '--opt', str(REPO / 'options' / 'demo' / 'stage2.yml'), '--quiet'])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith('error: ') and str(path) in err and err.count('\n') == 1
    assert not marker.exists()
    assert not (tmp_path / 'out').exists() or not os.listdir(tmp_path / 'out')


def test_resume_state(evil, tmp_path):
    path, marker = evil
    opt = {'auto_resume': False, 'name': 'x', 'num_gpu': 0, 'path': {'resume_state': str(path)}}
    with pytest.raises(UserError) as err:
        resume.load_resume_state(opt)
    _assert_refused(str(err.value), path, marker)


def test_auto_resume_state(evil, tmp_path, monkeypatch):
    """The newest .state that --auto_resume picks is refused the same way."""
    path, marker = evil
    monkeypatch.chdir(tmp_path)
    states, models = tmp_path / 'experiments' / 'x' / 'training_states', tmp_path / 'experiments' / 'x' / 'models'
    states.mkdir(parents=True)
    models.mkdir()
    os.replace(path, states / '7.state')
    torch.save({'params': {}}, models / 'net_g_7.pth')
    opt = {'auto_resume': True, 'name': 'x', 'num_gpu': 0, 'network_g': {}, 'path': {'models': str(models)}}
    with pytest.raises(UserError, match='7.state') as err:
        resume.load_resume_state(opt)
    assert 'refused to unpickle' in str(err.value) and not marker.exists()


def test_upstream_load_network_is_mended():
    from basicsr.models.base_model import BaseModel
    assert BaseModel.load_network is compat._load_network
    assert compat.ORIGINALS['load_network'] is not compat._load_network
