"""Each basicsr-1.4.2 mend in tpdiff_plugin/compat.py: upstream fails without it, works with it.

The end-to-end runs use upstream's own SRModel with a tiny SRVGGNetCompact (scale 1) on a small
paired set, so they test the mends and the `basicsr` CLI, not our networks.
"""
import re
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from basicsr.models import build_model
from tpdiff_plugin import compat
from tpdiff_plugin.utils import checkpoint, resume
from tpdiff_plugin.version import __version__

from conftest import free_port  # noqa: E402


def _write_paired_set(root, n=4, size=48, seed=0):
    rng = np.random.default_rng(seed)
    (root / 'gt').mkdir(parents=True)
    (root / 'lq').mkdir()
    for i in range(n):
        gt = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        gt = cv2.GaussianBlur(gt, (3, 3), 0)
        lq = cv2.blur(gt, (5, 1))
        cv2.imwrite(str(root / 'gt' / f'{i:03d}.png'), gt)
        cv2.imwrite(str(root / 'lq' / f'{i:03d}.png'), lq)


def _options(root, name, total_iter):
    return textwrap.dedent(f"""\
        name: {name}
        model_type: SRModel
        scale: 1
        num_gpu: 0
        manual_seed: 0
        datasets:
          train:
            name: synth
            type: PairedImageDataset
            dataroot_gt: {root}/gt
            dataroot_lq: {root}/lq
            io_backend: {{type: disk}}
            gt_size: 32
            use_hflip: true
            use_rot: true
            num_worker_per_gpu: 0
            batch_size_per_gpu: 2
            dataset_enlarge_ratio: 1
            prefetch_mode: cuda
          val:
            name: synth_val
            type: PairedImageDataset
            dataroot_gt: {root}/gt
            dataroot_lq: {root}/lq
            io_backend: {{type: disk}}
        network_g: {{type: SRVGGNetCompact, num_in_ch: 3, num_out_ch: 3, num_feat: 8, num_conv: 2, upscale: 1}}
        path: {{pretrain_network_g: ~, strict_load_g: true, resume_state: ~}}
        train:
          ema_decay: 0
          optim_g: {{type: Adam, lr: 0.001}}
          scheduler: {{type: MultiStepLR, milestones: [1000], gamma: 0.5}}
          total_iter: {total_iter}
          warmup_iter: -1
          pixel_opt: {{type: L1Loss, loss_weight: 1.0}}
        val:
          val_freq: 3
          save_img: false
          metrics:
            psnr: {{type: calculate_psnr, crop_border: 0, test_y_channel: false}}
        logger: {{print_freq: 1, save_checkpoint_freq: 3, use_tb_logger: false}}
        """)


@pytest.fixture
def sr_experiment(tmp_path):
    data = tmp_path / 'data'
    _write_paired_set(data)
    opt = tmp_path / 'sr.yml'
    opt.write_text(_options(data, 'compat_sr', total_iter=6))
    return tmp_path, opt


# 1. torchvision.transforms.functional_tensor -----------------------------------------------------

def test_plain_basicsr_import_fails_without_mend_and_works_with_it():
    plain = subprocess.run([sys.executable, '-c', 'import basicsr'], capture_output=True, text=True)
    assert plain.returncode != 0 and 'functional_tensor' in plain.stderr
    mended = subprocess.run([sys.executable, '-c', 'import tpdiff_plugin, basicsr; print("ok")'],
                            capture_output=True, text=True)
    assert mended.returncode == 0, mended.stderr
    from basicsr.data.degradations import rgb_to_grayscale
    img = torch.rand(1, 3, 4, 4)
    expected = (0.2989 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)
    torch.testing.assert_close(rgb_to_grayscale(img), expected, atol=1e-4, rtol=0)


# 2. resume on CPU -----------------------------------------------------------------------------

def _resume_opt(tmp_path):
    state = {'epoch': 1, 'iter': 3, 'optimizers': [], 'schedulers': []}
    path = tmp_path / '3.state'
    checkpoint.atomic_torch_save(state, path)
    return {'auto_resume': False, 'name': 'x', 'num_gpu': 0, 'is_train': True,
            'path': {'resume_state': str(path)}}, state


def test_upstream_resume_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip('upstream resume works when a GPU is present')
    opt, _ = _resume_opt(tmp_path)
    with pytest.raises((RuntimeError, AssertionError)):
        compat.ORIGINALS['load_resume_state'](opt)


def test_resume_state_loads_on_cpu(tmp_path):
    opt, state = _resume_opt(tmp_path)
    loaded = resume.load_resume_state(opt)
    assert loaded == state


def test_resume_state_missing_file_is_named(tmp_path):
    opt, _ = _resume_opt(tmp_path)
    opt['path']['resume_state'] = str(tmp_path / 'nope.state')
    with pytest.raises(FileNotFoundError, match='nope.state'):
        resume.load_resume_state(opt)


def test_basicsr_train_then_auto_resume_on_cpu(sr_experiment, cli_runner):
    """A run stopped at iteration 3 continues from its .state with --auto_resume (mends 2 and 5)."""
    root, opt = sr_experiment
    first = cli_runner(['basicsr', 'train', '-opt', str(opt), '--force_yml', 'train:total_iter=3'], cwd=root)
    assert first.returncode == 0, first.stderr[-3000:]
    exp = root / 'experiments' / 'compat_sr'
    assert (exp / 'training_states' / '3.state').is_file()
    assert (exp / 'models' / 'net_g_3.pth').is_file()
    # prefetch_mode: cuda on a CPU machine fell back to the CPU prefetcher (mend 5)
    assert 'CPU prefetcher' in first.stderr or torch.cuda.is_available()

    second = cli_runner(['basicsr', 'train', '-opt', str(opt), '--auto_resume'], cwd=root)
    assert second.returncode == 0, second.stderr[-3000:]
    log = '\n'.join(p.read_text() for p in sorted(exp.glob('train_compat_sr_*.log')))
    assert re.search(r'Resuming training from epoch: \d+, iter: 3', log), log[-2000:]
    assert (exp / 'training_states' / '6.state').is_file()
    resumed = torch.load(exp / 'training_states' / '6.state', weights_only=True)
    assert resumed['iter'] == 6
    # the weights moved on from iteration 3 to 6
    w3 = torch.load(exp / 'models' / 'net_g_3.pth', weights_only=True)['params']
    w6 = torch.load(exp / 'models' / 'net_g_6.pth', weights_only=True)['params']
    assert any(not torch.equal(w3[k], w6[k]) for k in w3)


def test_basicsr_test_runs_on_cpu(sr_experiment, cli_runner):
    root, opt = sr_experiment
    train = cli_runner(['basicsr', 'train', '-opt', str(opt), '--force_yml', 'train:total_iter=3'], cwd=root)
    assert train.returncode == 0, train.stderr[-3000:]
    data = root / 'data'
    test_opt = root / 'test.yml'
    test_opt.write_text(textwrap.dedent(f"""\
        name: compat_sr_test
        model_type: SRModel
        scale: 1
        num_gpu: 0
        datasets:
          test_1:
            name: synth_test
            type: PairedImageDataset
            dataroot_gt: {data}/gt
            dataroot_lq: {data}/lq
            io_backend: {{type: disk}}
        network_g: {{type: SRVGGNetCompact, num_in_ch: 3, num_out_ch: 3, num_feat: 8, num_conv: 2, upscale: 1}}
        path: {{pretrain_network_g: {root}/experiments/compat_sr/models/net_g_3.pth, strict_load_g: true}}
        val:
          save_img: true
          suffix: ~
          metrics:
            psnr: {{type: calculate_psnr, crop_border: 0, test_y_channel: false}}
        """))
    res = cli_runner(['basicsr', 'test', '-opt', str(test_opt)], cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    out = sorted((root / 'results' / 'compat_sr_test' / 'visualization' / 'synth_test').glob('*.png'))
    assert len(out) == 4
    log = next((root / 'results' / 'compat_sr_test').glob('test_compat_sr_test_*.log')).read_text()
    psnr = float(re.search(r'# psnr: ([0-9.]+)', log).group(1))
    assert 10 < psnr < 100


# 3. --launcher pytorch on CPU -------------------------------------------------------------------

def test_upstream_launcher_pytorch_fails_on_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip('upstream launcher works when a GPU is present')
    monkeypatch.setenv('RANK', '0')
    with pytest.raises((ZeroDivisionError, RuntimeError)):
        compat.ORIGINALS['_init_dist_pytorch']('nccl')


def test_torchrun_two_processes_on_gloo(sr_experiment, cli_runner):
    """`torchrun --nproc_per_node=2 -m tpdiff_plugin.train --launcher pytorch` trains and saves (mends 3, 4)."""
    root, opt = sr_experiment
    res = cli_runner(['torchrun', '--nproc_per_node=2', f'--master_port={free_port()}', '-m', 'tpdiff_plugin.train',
                      '-opt', str(opt), '--launcher', 'pytorch', '--force_yml', 'train:total_iter=3'],
                     cwd=root)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    exp = root / 'experiments' / 'compat_sr'
    assert (exp / 'models' / 'net_g_3.pth').is_file()
    log = next(exp.glob('train_compat_sr_*.log')).read_text()
    assert re.search(r'^\s*world_size: 2$', log, re.M), log[:3000]
    assert re.search(r'^\s*dist: True$', log, re.M)


@pytest.mark.parametrize('num_gpu, dist_params, expected', [
    (0, {'backend': 'nccl'}, 'gloo'),  # CPU training on a GPU machine: NCCL cannot reduce CPU tensors
    (1, {'backend': 'nccl'}, 'nccl'),
    (1, None, 'nccl'),
    ('auto', {'backend': 'gloo'}, 'gloo'),
])
def test_launcher_pytorch_backend_follows_num_gpu(tmp_path, monkeypatch, num_gpu, dist_params, expected):
    """Upstream's parse_options starts the process group (``init_dist('pytorch')``, NCCL) before num_gpu is read."""
    opt = {'name': 'backend', 'model_type': 'SRModel', 'num_gpu': num_gpu, 'manual_seed': 0,
           'path': {}, 'network_g': {'type': 'TPDiffNet'}, 'datasets': {}}
    if dist_params:
        opt['dist_params'] = dist_params
    path = tmp_path / 'opt.yml'
    path.write_text(yaml.safe_dump(opt))
    assert compat.launcher_backend(str(path)) == expected
    import basicsr.train
    import basicsr.utils.options as options
    calls = []
    monkeypatch.setattr(options, 'init_dist', lambda launcher, **kw: calls.append((launcher, kw)))
    monkeypatch.setattr(sys, 'argv', ['train', '-opt', str(path), '--launcher', 'pytorch'])
    basicsr.train.parse_options(str(tmp_path))
    assert calls == [('pytorch', {'backend': expected})]
    assert compat.launcher_backend(str(tmp_path / 'missing.yml')) is None  # upstream reports it


# 4. DDP wrapping on CPU -------------------------------------------------------------------------

class _FakeModel:
    def __init__(self):
        self.opt = {'dist': True, 'num_gpu': 0}
        self.device = torch.device('cpu')


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrap_on_cpu(gloo_group):
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError)):
            compat.ORIGINALS['model_to_device'](_FakeModel(), torch.nn.Conv2d(3, 3, 3, padding=1))
    wrapped = compat.model_to_device(_FakeModel(), net)
    assert isinstance(wrapped, DistributedDataParallel)
    x = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(wrapped(x), net(x))
    wrapped(x).sum().backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


# 5. prefetch_mode: cuda -------------------------------------------------------------------------

def test_cuda_prefetch_falls_back_to_cpu_without_gpu():
    if torch.cuda.is_available():
        pytest.skip('CUDA prefetching is the right thing with a GPU')
    loader = torch.utils.data.DataLoader([{'lq': torch.zeros(3)}], batch_size=1)
    with pytest.raises((RuntimeError, AssertionError)):
        compat.ORIGINALS['CUDAPrefetcher'](loader, {'num_gpu': 0})
    opt = {'num_gpu': 0, 'datasets': {'train': {'prefetch_mode': 'cuda'}}}
    with pytest.warns(UserWarning, match='prefetch_mode'):
        compat.cpu_prefetch_fallback(opt)
    assert opt['datasets']['train']['prefetch_mode'] is None
    untouched = {'num_gpu': 0, 'datasets': {'train': {'prefetch_mode': 'cpu'}}}
    assert compat.cpu_prefetch_fallback(untouched)['datasets']['train']['prefetch_mode'] == 'cpu'


# 6. checkpoints: network checkpoints carry their options, upstream still loads them --------------

def test_save_network_stores_the_options_block_and_upstream_load_network_still_reads_it(tmp_path):
    net_g = {'type': 'SRVGGNetCompact', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 8, 'num_conv': 2, 'upscale': 1}
    opt = {'name': 'x', 'model_type': 'SRModel', 'num_gpu': 0, 'dist': False, 'rank': 0, 'world_size': 1,
           'is_train': False, 'scale': 1, 'network_g': dict(net_g),
           'path': {'models': str(tmp_path), 'pretrain_network_g': None}}
    torch.manual_seed(0)
    model = build_model(opt)
    model.save_network([model.net_g, model.net_g], 'net_g', 7, param_key=['params', 'params_ema'])
    ckpt = torch.load(tmp_path / 'net_g_7.pth', weights_only=True)
    assert set(ckpt) == {'params', 'params_ema', 'network_opt', 'tpdiff_version'}
    assert ckpt['network_opt'] == net_g and ckpt['tpdiff_version'] == __version__
    # upstream's own BaseModel.load_network (as before mend 6) loads the file with each param_key
    torch.manual_seed(1)
    other = build_model(opt)
    for key in ('params', 'params_ema'):
        other.net_g.apply(lambda m: torch.nn.init.zeros_(m.weight) if hasattr(m, 'weight') else None)
        compat.ORIGINALS['load_network'](other, other.net_g, str(tmp_path / 'net_g_7.pth'), True, key)
        for (name, a), b in zip(model.net_g.state_dict().items(), other.net_g.state_dict().values()):
            assert torch.equal(a, b), (key, name)
    # a label with no network_* block in the options: the file holds no options, the rest as before
    model.save_network(model.net_g, 'net_extra', -1)
    assert set(torch.load(tmp_path / 'net_extra_latest.pth', weights_only=True)) == {'params', 'tpdiff_version'}
