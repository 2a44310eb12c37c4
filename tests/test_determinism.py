"""Same seed and options -> the same training, iteration by iteration, on CPU (basicsr train, subprocess).

Also holds the tiny demo-like experiment used by the other reliability tests (``tiny_experiment``).
"""
import re

import pytest
import torch
import yaml

from conftest import bench_module, run_cmd
from tpdiff_plugin.data.demo_set import build_demo

LOSS_LINE = re.compile(r'iter:\s+(\d+), lr:.*?\]\s+(l_.*)$')


def tiny_options(data, name, total_iter=20, save_freq=5, stage_file='demo/stage1.yml'):
    """The demo options shrunk to seconds, no validation (``bench/soak.py``'s experiment, its one home)."""
    return bench_module('soak').shrunk_demo_options(str(data), name, total_iter, save_freq, stage_file=stage_file)


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
        for key, entries in a[net].items():  # params (tensors), network_opt and version (plain values)
            if not isinstance(entries, dict):
                assert entries == b[net][key], f'{net}.{key} differs'
                continue
            for name, t in entries.items():
                same = torch.equal(t, b[net][key][name]) if torch.is_tensor(t) else t == b[net][key][name]
                assert same, f'{net}.{key}.{name} differs'


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
