"""A training run killed (SIGKILL) in the middle of a checkpoint save resumes with --auto_resume from the
last complete checkpoint and ends bit-identical to an uninterrupted run (CPU, fixed seed, no workers).

The kill uses compat's test hook ``TPDIFF_TEST_KILL_DURING_SAVE=<file name>``: the process kills itself
after writing that file's temporary copy, before the rename. Saves are at 5, 10, 15, 20; an epoch is 17
iterations, so the resumed run continues an epoch in its middle and then crosses into the next one.
"""
import signal

import pytest
import torch

from test_determinism import demo_data  # noqa: F401  (fixture)
from test_determinism import (assert_same_weights, logged_losses, tiny_options, train, weights,
                              write_options)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp('straight')
    res = train(root, write_options(root, tiny_options(demo_data, 'crash')))
    assert res.returncode == 0, res.stderr[-3000:]
    return root / 'experiments' / 'crash'


@pytest.mark.parametrize('killed_file, resumed_from', [('15.state', 10), ('net_d_blur_15.pth', 10)])
def test_kill_during_save_then_auto_resume_is_bit_exact(tmp_path, demo_data, uninterrupted, killed_file,
                                                        resumed_from):
    opt_path = write_options(tmp_path, tiny_options(demo_data, 'crash'))
    exp = tmp_path / 'experiments' / 'crash'
    killed = train(tmp_path, opt_path, env={'TPDIFF_TEST_KILL_DURING_SAVE': killed_file})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # the torn file exists only as a temporary copy; no 15.state was published
    assert list((exp / ('training_states' if killed_file.endswith('.state') else 'models')).glob(
        f'.{killed_file}.tmp*'))
    assert sorted(p.name for p in (exp / 'training_states').glob('*.state')) == ['10.state', '5.state']

    resumed = train(tmp_path, opt_path, '--auto_resume')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = '\n'.join(p.read_text() for p in exp.glob('train_*.log'))
    assert f'Resuming training from epoch: 0, iter: {resumed_from}.' in log
    assert f'continuing epoch 0 after its first {resumed_from} of 17 iterations' in log
    assert not list(exp.rglob('.*.tmp*')), 'stale temporary files were left behind'

    # every iteration after the resume logs the same losses as the uninterrupted run ...
    straight, again = logged_losses(uninterrupted), logged_losses(exp)
    assert all(again[i] == straight[i] for i in range(resumed_from + 1, 21))
    # ... and the final networks, optimizers, schedulers, pools and RNG streams are bit-identical
    for it in (15, 20):
        assert_same_weights(weights(uninterrupted, it), weights(exp, it))
    a = torch.load(uninterrupted / 'training_states' / '20.state', weights_only=True)
    b = torch.load(exp / 'training_states' / '20.state', weights_only=True)
    assert a['iter'] == b['iter'] == 20 and a['epoch'] == b['epoch'] == 1
    for oa, ob in zip(a['optimizers'], b['optimizers']):
        for pa, pb in zip(oa['state'].values(), ob['state'].values()):
            assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert a['schedulers'] == b['schedulers']
    for name in a['image_pools']:
        assert torch.equal(a['image_pools'][name], b['image_pools'][name])
    assert torch.equal(a['rng_states']['torch'], b['rng_states']['torch'])
    assert a['rng_states']['python'] == b['rng_states']['python']


def test_resume_without_the_rng_streams_would_differ(tmp_path, demo_data, uninterrupted):
    """The comparison above can fail: a state without its RNG streams (as upstream saves it) resumes at 10
    into other random crops and pool draws, so other weights at 20."""
    import shutil
    opt_path = write_options(tmp_path, tiny_options(demo_data, 'crash'))
    exp = tmp_path / 'experiments' / 'crash'
    shutil.copytree(uninterrupted, exp)
    for p in list((exp / 'training_states').glob('*.state')):
        if p.name != '10.state':
            p.unlink()
    state = torch.load(exp / 'training_states' / '10.state', weights_only=True)
    del state['rng_states']
    torch.save(state, exp / 'training_states' / '10.state')
    resumed = train(tmp_path, opt_path, '--auto_resume')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(uninterrupted, 20), weights(exp, 20)
    assert any(not torch.equal(a['net_g']['params'][n], b['net_g']['params'][n]) for n in a['net_g']['params'])


def test_auto_resume_skips_a_state_whose_networks_are_missing(tmp_path, monkeypatch):
    """basicsr's check_resume points every network at net_<label>_<iter>.pth; a state without them is skipped."""
    from tpdiff_plugin.utils.checkpoint import atomic_torch_save
    from tpdiff_plugin.utils.resume import load_resume_state
    monkeypatch.chdir(tmp_path)
    exp = tmp_path / 'experiments' / 'x'
    (exp / 'training_states').mkdir(parents=True)
    (exp / 'models').mkdir()
    for it in (5, 10):
        atomic_torch_save({'iter': it, 'epoch': 0, 'optimizers': [], 'schedulers': []},
                          exp / 'training_states' / f'{it}.state')
        atomic_torch_save({'params': {}}, exp / 'models' / f'net_g_{it}.pth')
    atomic_torch_save({'params': {}}, exp / 'models' / 'net_rb_5.pth')  # net_rb_10.pth is missing
    (exp / 'training_states' / '.15.state.tmp123').write_bytes(b'torn')  # a save killed midway
    opt = {'auto_resume': True, 'name': 'x', 'num_gpu': 0, 'network_g': {}, 'network_rb': {},
           'path': {'models': 'experiments/x/models', 'resume_state': None}}
    with pytest.warns(UserWarning, match='net_rb_10.pth is missing'):
        state = load_resume_state(opt)
    assert state['iter'] == 5 and opt['path']['resume_state'].endswith('5.state')
    assert opt['path']['pretrain_network_rb'].endswith('net_rb_5.pth')


def _torchrun(root, opt_path, *extra):
    from conftest import free_port, run_cmd
    return run_cmd(['torchrun', '--nproc_per_node=2', f'--master_port={free_port()}', '-m', 'tpdiff_plugin.train',
                    '-opt', str(opt_path), '--launcher', 'pytorch', *extra], cwd=root, timeout=600)


def _resume_ddp_from_5(tmp_path, straight_root, name, strip_rank_states=False):
    """A copy of the straight 2-process run cut back to its iteration-5 checkpoint, resumed to 10 (2 processes)."""
    import shutil
    root = tmp_path / name
    shutil.copytree(straight_root, root)
    exp = root / 'experiments' / 'ddp'
    for p in list((exp / 'models').glob('*_10.pth')) + list((exp / 'models').glob('*_latest.pth')):
        p.unlink()
    (exp / 'training_states' / '10.state').unlink()
    if strip_rank_states:  # as a state saved before rank_states existed
        state = torch.load(exp / 'training_states' / '5.state', weights_only=True)
        del state['rank_states']
        torch.save(state, exp / 'training_states' / '5.state')
    res = _torchrun(root, root / 'ddp.yml', '--auto_resume')
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    return exp


def test_two_gloo_processes_resume_exactly(tmp_path, demo_data):
    """Under DDP every rank saves its own RNG streams, pools and sharp batch (rank_states) and resumes them: a
    2-process run resumed at 5 ends bit-identical to the uninterrupted one at 10. Without rank_states (the
    control) the ranks resume on their seeded streams and end elsewhere."""
    straight = tmp_path / 'straight'
    straight.mkdir()
    opt_path = write_options(straight, tiny_options(demo_data, 'ddp', total_iter=10, save_freq=5))
    (straight / 'ddp.yml').write_text(opt_path.read_text())
    res = _torchrun(straight, straight / 'ddp.yml')
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    state = torch.load(straight / 'experiments' / 'ddp' / 'training_states' / '5.state', weights_only=True)
    ranks = state['rank_states']
    assert len(ranks) == 2 and not torch.equal(ranks[0]['rng_states']['torch'], ranks[1]['rng_states']['torch'])

    resumed = _resume_ddp_from_5(tmp_path, straight, 'resumed')
    assert 'Resuming training from epoch' in '\n'.join(p.read_text() for p in resumed.glob('train_*.log'))
    assert_same_weights(weights(straight / 'experiments' / 'ddp', 10), weights(resumed, 10))

    control = _resume_ddp_from_5(tmp_path, straight, 'control', strip_rank_states=True)
    a, b = weights(straight / 'experiments' / 'ddp', 10), weights(control, 10)
    assert any(not torch.equal(a['net_g']['params'][n], b['net_g']['params'][n]) for n in a['net_g']['params'])


def test_resume_with_two_dataloader_workers_is_bit_exact(tmp_path, demo_data):
    """``num_worker_per_gpu: 2``: every sample's crops, flips and sharp image come from a seed of (manual_seed,
    epoch, position in the epoch), not from a worker's RNG, so a run resumed at 10 (mid-epoch: an epoch is 17
    iterations) logs the same losses and ends with the same weights at 20 as the uninterrupted run."""
    import shutil
    opt = tiny_options(demo_data, 'workers')
    opt['datasets']['train']['num_worker_per_gpu'] = 2
    straight = tmp_path / 'straight'
    straight.mkdir()
    res = train(straight, write_options(straight, opt))
    assert res.returncode == 0, res.stderr[-3000:]

    root = tmp_path / 'resumed'
    shutil.copytree(straight, root)
    exp = root / 'experiments' / 'workers'
    for suffix in ('15', '20', 'latest'):  # cut back to the iteration-10 checkpoint
        for p in exp.glob(f'models/*_{suffix}.pth'):
            p.unlink()
    for it in (15, 20):
        (exp / 'training_states' / f'{it}.state').unlink()
    res = train(root, root / 'workers.yml', '--auto_resume')
    assert res.returncode == 0, res.stderr[-3000:]
    log = '\n'.join(p.read_text() for p in exp.glob('train_*.log'))
    assert 'continuing epoch 0 after its first 10 of 17 iterations' in log
    a = logged_losses(straight / 'experiments' / 'workers')
    b = logged_losses(exp)
    assert [b[i] for i in range(11, 21)] == [a[i] for i in range(11, 21)]
    assert_same_weights(weights(straight / 'experiments' / 'workers', 20), weights(exp, 20))
