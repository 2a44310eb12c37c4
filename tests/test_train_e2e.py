"""End to end through the console scripts, as a user runs it, on the embedded demo set:
stage 1 with an interruption and --auto_resume, stage 2 from stage 1's checkpoints as 2 gloo
processes under torchrun, then --auto_resume, `basicsr test` and the demo report.

The demo options are used as shipped, shortened with upstream's --force_yml.
"""
import re
import shutil

import pytest
import torch

from conftest import REPO, free_port
from tpdiff_plugin.data.demo_set import build_demo

SHORT = ['--force_yml', 'val:val_freq=2', 'logger:save_checkpoint_freq=2', 'logger:print_freq=1',
         'datasets:train:batch_size_per_gpu=2']
# stage 2's demo recipe opens with DM-only iterations: one here, so the short run reaches the whole game too
S2_SHORT = ['train:dm_warmup_iter=1']


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo_ws')
    shutil.copytree(REPO / 'options', root / 'options')
    build_demo(root / 'datasets_lmdb' / 'demo', seed=0, force=False, quiet=True)
    return root


def _log(exp_dir):
    return '\n'.join(p.read_text() for p in sorted(exp_dir.glob('train_*.log')))


def _params(path):
    return torch.load(path, weights_only=True)['params']


def test_both_stages_resume_distribute_and_test(workspace, cli_runner):
    root = workspace
    s1 = root / 'experiments' / 'TPDiff_Demo_Stage1'
    s2 = root / 'experiments' / 'TPDiff_Demo_Stage2'

    # stage 1: stopped after 2 iterations, then resumed to 4
    r = cli_runner(['basicsr', 'train', '-opt', 'options/demo/stage1.yml'] + SHORT + ['train:total_iter=2'], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (s1 / 'training_states' / '2.state').is_file()
    r = cli_runner(['basicsr', 'train', '-opt', 'options/demo/stage1.yml', '--auto_resume'] + SHORT
                   + ['train:total_iter=4'], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    log1 = _log(s1)
    assert re.search(r'Resuming training from epoch: \d+, iter: 2', log1)
    assert 'Validation prior: TPE memory EMA of' in log1
    for label in ('g', 'tpe', 'rb', 'd_sharp', 'd_blur', 'd_wave'):
        assert (s1 / 'models' / f'net_{label}_latest.pth').is_file(), label
    losses = [float(v) for v in re.findall(r'l_cyc_blur: ([-+.\deE]+)', log1)]
    assert len(losses) >= 4 and all(v == v and abs(v) < 1e3 for v in losses)

    # stage 2 from stage 1's checkpoints, 2 processes on gloo
    r = cli_runner(['torchrun', '--nproc_per_node=2', f'--master_port={free_port()}', '-m', 'tpdiff_plugin.train',
                    '-opt', 'options/demo/stage2.yml', '--launcher', 'pytorch'] + SHORT + S2_SHORT
                   + ['train:total_iter=2'], cwd=root)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    log2 = _log(s2)
    assert re.search(r'^\s*world_size: 2$', log2, re.M)
    assert 'Validation prior: DM sampling (T=8)' in log2
    tpe1 = _params(s1 / 'models' / 'net_tpe_latest.pth')
    tpe2 = _params(s2 / 'models' / 'net_tpe_2.pth')
    assert tpe1.keys() == tpe2.keys() and all(torch.equal(tpe1[k], tpe2[k]) for k in tpe1)
    g1, g2 = _params(s1 / 'models' / 'net_g_latest.pth'), _params(s2 / 'models' / 'net_g_2.pth')
    dm_keys = [k for k in g1 if k.startswith('dm.')]
    assert dm_keys and any(not torch.equal(g1[k], g2[k]) for k in dm_keys)
    assert 'l_diff' in log2 and 'l_g_gan_sharp' in log2  # the warm-up's iteration, then the whole game's
    assert any(not torch.equal(g1[k], g2[k]) for k in g1 if not k.startswith('dm.'))  # DN moved after the warm-up

    # stage 2 resumed in one process
    r = cli_runner(['basicsr', 'train', '-opt', 'options/demo/stage2.yml', '--auto_resume'] + SHORT + S2_SHORT
                   + ['train:total_iter=4'], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r'Resuming training from epoch: \d+, iter: 2', _log(s2))
    tpe4 = _params(s2 / 'models' / 'net_tpe_latest.pth')
    assert all(torch.equal(tpe1[k], tpe4[k]) for k in tpe1)

    # test on the paired demo val set, then the report
    r = cli_runner(['basicsr', 'test', '-opt', 'options/test/demo.yml'], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    out = sorted((root / 'results' / 'TPDiff_Demo_Test' / 'visualization').rglob('*.png'))
    assert len(out) == 4
    r = cli_runner(['tpdiff', 'report',
                    '--results', 'results/TPDiff_Demo_Test'], cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'PSNR' in r.stdout and list((root / 'results').glob('*grid*.png'))
