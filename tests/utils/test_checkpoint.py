"""utils/checkpoint.py: the one reader / writer of checkpoints."""
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_net, tiny_net_opts
from tpdiff_plugin.utils.checkpoint import (atomic_torch_save, check_finite, check_fit, load_network_file, logger,
                                            network_options, pick_params, save_networks)
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.version import __version__


def test_atomic_save_keeps_previous_file_on_failure(tmp_path):
    path = tmp_path / 'net.pth'
    atomic_torch_save({'a': torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        atomic_torch_save({'a': Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(2))
    assert os.listdir(tmp_path) == ['net.pth']  # no temporary file left behind


def test_pick_params_prefers_ema_then_params_then_a_bare_state_dict():
    w = {'weight': torch.ones(1)}
    ema = {'module.weight': torch.zeros(1)}
    state, key = pick_params({'params': w, 'params_ema': ema}, 'x.pth')
    assert key == 'params_ema' and list(state) == ['weight'] and state['weight'].item() == 0  # DDP prefix dropped
    assert pick_params({'params': w}, 'x.pth')[1] == 'params'
    state, key = pick_params(w, 'x.pth')
    assert key is None and state['weight'].item() == 1


def test_pick_params_named_key_and_basicsr_fallback():
    ckpt = {'params': {'weight': torch.ones(1)}}
    with pytest.raises(UserError, match=r'x.pth: no "params_ema" entry \(has: params\)'):
        pick_params(ckpt, 'x.pth', 'params_ema')
    assert pick_params(ckpt, 'x.pth', 'params_ema', fallback_to_params=True)[1] == 'params'
    with pytest.raises(UserError, match='not a basicsr checkpoint'):
        pick_params([1, 2], 'x.pth')
    with pytest.raises(UserError, match='no "params_ema" or "params" state dict'):
        pick_params({'iter': 3}, 'x.pth')


def test_check_fit_names_missing_unexpected_and_misshaped_keys():
    net = nn.Conv2d(3, 4, 3)
    check_fit(net, net.state_dict(), 'x.pth', 'hint')  # fits: no error
    with pytest.raises(UserError, match=r'missing keys: bias; unexpected keys: extra; 1 shape mismatch'):
        check_fit(net, {'weight': torch.zeros(4, 3, 1, 1), 'extra': torch.zeros(1)}, 'x.pth', 'hint')


def test_save_then_load_round_trip_strict_and_not(tmp_path):
    src, dst = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    path = tmp_path / 'net.pth'
    save_networks([src], ['params'], path)
    assert load_network_file(dst, path, '--weights') == 'params'
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)
    other = nn.Conv2d(3, 4, 3, bias=False)
    with pytest.raises(UserError, match='does not fit Conv2d as configured'):
        load_network_file(other, path, '--weights')
    load_network_file(other, path, '--weights', strict=False)  # loads what matches, leaves out the rest
    assert torch.equal(other.weight, src.weight)
    with pytest.raises(UserError, match='--weights: no such checkpoint file'):
        load_network_file(dst, tmp_path / 'missing.pth', '--weights')


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    net = nn.Conv2d(3, 4, 3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state['bias'][1] = float('inf')
    state['weight'][0, 0, 0, 0] = float('nan')
    path = tmp_path / 'bad.pth'
    torch.save({'params': state}, path)
    with pytest.raises(UserError, match=r'bad.pth: tensor weight holds 1 NaN/Inf value\(s\)'):
        load_network_file(nn.Conv2d(3, 4, 3), path, '--weights')


# Found by the fuzz suite (tests/fuzz/test_fuzz_checkpoints.py): each was a traceback or a multi-line message.
@pytest.mark.parametrize('make, match', [
    (lambda w: w.to_sparse(), 'tensor weight is a sparse_coo tensor'),
    (lambda w: torch.empty_like(w, device='meta'), 'tensor weight is a meta tensor'),
    (lambda w: torch.quantize_per_tensor(w, 0.1, 0, torch.qint8), 'tensor weight is quantized'),
])
def test_tensors_that_cannot_be_loaded_are_refused_naming_them(tmp_path, make, match):
    net = nn.Linear(3, 2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state['weight'] = make(state['weight'])  # torch.load(weights_only=True) reads all three back
    torch.save({'params': state}, tmp_path / 'odd.pth')
    with pytest.raises(UserError, match=match):
        load_network_file(net, tmp_path / 'odd.pth', '--weights')


def test_odd_keys_and_complex_nan_give_one_line():
    w = torch.zeros(2)
    with pytest.raises(UserError, match=r"key that is not a name \(3, a int\)"):  # was AttributeError (startswith)
        pick_params({'params': {3: w}}, 'x.pth')
    with pytest.raises(UserError) as info:  # the message named the key with its line break
        pick_params({'params': 1, 'a\nb': 2}, 'x.pth', 'params_x')
    assert '\n' not in str(info.value) and "'a\\nb'" in str(info.value)
    net = nn.Linear(2, 1, bias=False)
    with pytest.raises(UserError) as info:
        check_fit(net, {'weight\n': torch.zeros(1, 2)}, 'x.pth', 'hint')
    assert '\n' not in str(info.value)
    with pytest.raises(UserError, match='holds 1 NaN/Inf'):  # complex tensors were not checked
        check_finite({'w': torch.tensor([1 + 1j, complex('nan')])}, 'x.pth')


# ------------------------------------------------------------------ network options stored next to params
def test_saved_checkpoint_carries_its_network_options_and_the_version(tmp_path):
    net = tiny_net(seed=0)
    # as basicsr's YAML loader and code give it: an OrderedDict, a tuple, a numpy number
    block = OrderedDict(tiny_net_opts(num_blocks=(1, 1, 1, 1), dim=np.int64(4)))
    path = tmp_path / 'net_g_5.pth'
    save_networks([net, tiny_net(seed=1)], ['params', 'params_ema'], path, network_opt=block)
    ckpt = torch.load(path, weights_only=True)  # plain types only: the safe loader reads it
    assert set(ckpt) == {'params', 'params_ema', 'network_opt', 'tpdiff_version'}
    assert ckpt['tpdiff_version'] == __version__
    assert ckpt['network_opt'] == tiny_net_opts() and type(ckpt['network_opt']) is dict
    assert type(ckpt['network_opt']['dim']) is int and type(ckpt['network_opt']['num_blocks']) is list
    assert network_options(ckpt, str(path)) == tiny_net_opts()
    # upstream basicsr's load_network indexes the file with its param_key: unchanged
    fresh = tiny_net(seed=2)
    fresh.load_state_dict(torch.load(path, map_location='cpu')['params'])
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), net.state_dict().values()))
    # and ours still picks params_ema
    assert pick_params(ckpt, str(path))[1] == 'params_ema'


def test_network_options_of_old_and_damaged_checkpoints(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logger, 'propagate', True)  # basicsr's logger does not propagate to caplog once set up
    net = nn.Conv2d(3, 4, 3)
    path = tmp_path / 'net.pth'
    save_networks([net], ['params'], path)  # no options block: the entry is left out
    assert set(torch.load(path, weights_only=True)) == {'params', 'tpdiff_version'}
    assert network_options(torch.load(path, weights_only=True), 'net.pth') is None
    assert network_options({'params': net.state_dict()}, 'old.pth') is None  # saved before options were stored
    with pytest.raises(UserError, match=r'x.pth: the stored "network_opt" is not a network options block'):
        network_options({'params': {}, 'network_opt': ['TPDiffNet']}, 'x.pth')
    # a block with values that are no options (built in code): the weights are still saved, with a warning
    save_networks([net], ['params'], path, network_opt={'type': 'Conv', 'act': nn.ReLU()})
    assert set(torch.load(path, weights_only=True)) == {'params', 'tpdiff_version'}
    assert 'network options not stored' in caplog.text and 'ReLU is not an options value' in caplog.text


def test_load_network_file_uses_a_checkpoint_already_read(tmp_path):
    src, dst = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    ckpt = {'params': src.state_dict()}
    assert load_network_file(dst, str(tmp_path / 'never_written.pth'), '--weights', ckpt=ckpt) == 'params'
    assert torch.equal(dst.weight, src.weight)
