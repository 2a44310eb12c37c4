"""Same seed and options -> the same training, iteration by iteration, on CPU (basicsr train, subprocess).

Also holds the tiny demo-like experiment used by the other reliability tests (``tiny_experiment``).
"""
import re

import pytest
import torch
import yaml

from conftest import REPO, run_cmd
from tpdiff_plugin.data.demo_set import build_demo

LOSS_LINE = re.compile(r'iter:\s+(\d+), lr:.*?\]\s+(l_.*)$')


def tiny_options(data, name, total_iter=20, save_freq=5, stage_file='demo/stage1.yml'):
    """options/demo/stage1.yml shrunk to seconds: 32 px patches, 2 per batch, 4-channel nets, no validation.

    The demo training set has 35 blurry images, so one epoch is 17 iterations (drop_last)."""
    opt = yaml.safe_load((REPO / 'options' / stage_file).read_text())
    opt['name'] = name
    train = opt['datasets']['train']
    train.update(dataroot_blur=str(data / 'train_blur.lmdb'), dataroot_sharp=str(data / 'train_sharp.lmdb'),
                 gt_size=32, batch_size_per_gpu=2, dataset_enlarge_ratio=1, num_worker_per_gpu=0)
    opt['datasets'].pop('val', None)
    opt.pop('val', None)
    opt['network_g'].update(dim=4, dm_feats=8, dm_timesteps=4, prior_ch=8, prior_hidden=4)
    opt['network_tpe'].update(prior_ch=8, mem_slots=8, enc_ch=4)
    for key in ('network_d_sharp', 'network_d_blur', 'network_d_wave'):
        opt[key].update(base_ch=4, num_layers=2)
    opt['network_rb'].update(base_ch=4, num_levels=2)
    opt['train'].update(total_iter=total_iter, pool_size=3)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=save_freq)
    return opt


@pytest.fixture(scope='session')
def demo_data(tmp_path_factory):
    path = tmp_path_factory.mktemp('demo_data') / 'demo'
    build_demo(str(path), seed=0, force=False, quiet=True)
    return path


def write_options(root, opt):
    path = root / f'{opt["name"]}.yml'
    path.write_text(yaml.safe_dump(opt))
    return path


def train(root, opt_path, *extra, env=None):
    return run_cmd(['basicsr', 'train', '-opt', str(opt_path), *extra], cwd=root, env=env, timeout=300)


def logged_losses(exp_dir):
    """``{iter: 'l_... text'}`` from every train log of the experiment (the exact logged text)."""
    out = {}
    for log in sorted(exp_dir.glob('train_*.log')):
        for line in log.read_text().splitlines():
            m = LOSS_LINE.search(line)
            if m:
                out[int(m.group(1))] = m.group(2).strip()
    return out


def weights(exp_dir, it):
    return {p.name.rsplit('_', 1)[0]: torch.load(p, weights_only=True)
            for p in sorted((exp_dir / 'models').glob(f'net_*_{it}.pth'))}


def assert_same_weights(a, b):
    assert a.keys() == b.keys() and a
    for net in a:
        for key, tensors in a[net].items():
            for name, t in tensors.items():
                assert torch.equal(t, b[net][key][name]), f'{net}.{key}.{name} differs'


def test_same_seed_gives_the_same_losses_and_weights(tmp_path, demo_data):
    opt = tiny_options(demo_data, 'det', total_iter=20, save_freq=20)
    runs = []
    for k in (1, 2):
        root = tmp_path / f'run{k}'
        root.mkdir()
        res = train(root, write_options(root, opt))
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(root / 'experiments' / 'det')
    first, second = (logged_losses(r) for r in runs)
    assert sorted(first) == list(range(1, 21))
    assert first == second
    assert_same_weights(weights(runs[0], 20), weights(runs[1], 20))


def test_another_seed_gives_other_losses(tmp_path, demo_data):
    """The comparison above can fail: a different manual_seed changes the logged losses."""
    opt = tiny_options(demo_data, 'seed', total_iter=3, save_freq=3)
    logs = []
    for seed in (10, 11):
        root = tmp_path / f'seed{seed}'
        root.mkdir()
        opt['manual_seed'] = seed
        res = train(root, write_options(root, opt))
        assert res.returncode == 0, res.stderr[-3000:]
        logs.append(logged_losses(root / 'experiments' / 'seed'))
    assert logs[0].keys() == logs[1].keys() == {1, 2, 3}
    assert logs[0] != logs[1]
