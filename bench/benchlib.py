"""Helpers of ``bench/run.py``: interleaved timing, the matmul reference, the deformable-filter inputs, an
isolated peak-memory probe and an in-process stage-2 training model. Imported by run.py only."""
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds one call of ``fn()`` takes (device synchronised before and after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(calls, repeats, device, on_round=None):
    """Time every ``calls[name]()`` once per round, ``repeats`` rounds, names interleaved so that a noisy
    machine slows them all alike. Returns ``{name: [seconds per round]}``."""
    times = {name: [] for name in calls}
    for r in range(repeats):
        for name, fn in calls.items():
            times[name].append(timed(fn, device))
        if on_round is not None:
            on_round(r)
    return times


def median(values):
    return statistics.median(values)


def matmul_call(n, device, dtype):
    """A dense ``n x n`` matmul (2·n³ FLOP) as a callable."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: torch.mm(a, b)


def deform_inputs(channels, h, w, device, seed=0):
    """Inputs of FM-MSA's filter: depthwise 3x3 weight, one offset group, offsets of a few pixels, a sigmoid mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, h, w, generator=g)
    offset = torch.randn(1, 18, h, w, generator=g) * 2
    mask = torch.rand(1, 9, h, w, generator=g)
    weight = torch.randn(channels, 1, 3, 3, generator=g) / 3
    return [t.to(device) for t in (x, offset, mask, weight)]


def tile_memory_subprocess(tile, timeout=900, channels_last=False):
    """Peak RSS of one ``tile x tile`` forward of the paper-size TPDiffNet, in a fresh process (CPU).

    Returns ``{'base_mib', 'peak_mib', 'seconds'}``: RSS with torch imported and the network built, and the
    high-water mark during one forward (inference mode, flush-denormal on, the allocator settings of
    ``tune_malloc`` as in the parent unless ``TPDIFF_NO_MALLOPT`` is set; ``channels_last`` as Deblurrer on CPU).
    """
    code = f'''
import json, os, time
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
import torch
torch.set_flush_denormal(True)
import tpdiff_plugin
from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
from tpdiff_plugin.utils.allocator import tune_malloc
from tpdiff_plugin.utils.measure import _proc_status_kib as kib
tune_malloc()
net = TPDiffNet().eval()
x = torch.rand(1, 3, {tile}, {tile})
if {bool(channels_last)}:
    net.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
noise = torch.randn(net.prior_shape(x))
base = kib('VmRSS')
open('/proc/self/clear_refs', 'w').write('5')
t0 = time.perf_counter()
with torch.no_grad():
    net(x, noise=noise)
print(json.dumps({{'base_mib': base / 1024, 'peak_mib': kib('VmHWM') / 1024, 'seconds': time.perf_counter() - t0}}))
'''
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else 'probe failed')
    return json.loads(res.stdout.strip().splitlines()[-1])


def _synthetic_images(folder, n, size, seed):
    """``n`` smooth random RGB images (blobs and edges, not white noise) as PNGs in ``folder``."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = cv2.resize(rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8), (size, size),
                         interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(os.path.join(folder, f'img{i:03d}.png'), img)


def build_stage2_model(options_path, device, workdir, batch_size=None, patch=None, amp=None):
    """The stage-2 TPDiffModel of ``options_path``, built in-process with basicsr's ``build_model``.

    Data: tiny synthetic folders (``io_backend: disk``) in ``workdir``; the stage-1 checkpoints it needs are
    the randomly initialised networks of the same options, saved in ``workdir``. Returns
    ``(model, dataloader)``. ``amp`` given: ``train.amp`` set to it (e.g. ``'bf16'``).
    """
    import yaml
    from basicsr.archs import build_network
    from basicsr.data import build_dataloader, build_dataset
    from basicsr.models import build_model
    from basicsr.utils.options import ordered_yaml

    import tpdiff_plugin  # noqa: F401
    from tpdiff_plugin.utils.checkpoint import atomic_torch_save
    with open(options_path, encoding='utf-8') as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    opt = copy.deepcopy(opt)
    opt['is_train'], opt['dist'], opt['rank'], opt['world_size'] = True, False, 0, 1
    opt['num_gpu'] = 1 if device.type == 'cuda' else 0
    opt['auto_resume'] = False
    root = os.path.join(workdir, 'experiment')
    opt['path'] = dict(opt.get('path') or {})
    for key in ('experiments_root', 'models', 'training_states', 'log', 'visualization'):
        opt['path'][key] = os.path.join(root, key)
        os.makedirs(opt['path'][key], exist_ok=True)
    opt['path'].pop('resume_optim_d', None)  # fresh discriminator moments: the same work per iteration
    opt['train'].pop('dm_warmup_iter', None)  # the iteration timed is the whole game's, not the DM's warm-up
    if amp is not None:
        opt['train']['amp'] = amp
    for label in ('g', 'tpe', 'rb', 'd_sharp', 'd_blur', 'd_wave'):  # random stage-1 checkpoints do for timing
        if f'network_{label}' in opt and (label in ('g', 'tpe', 'rb') or opt['path'].get(f'pretrain_network_{label}')):
            ckpt = os.path.join(workdir, f'net_{label}_stage1.pth')
            atomic_torch_save({'params': build_network(copy.deepcopy(opt[f'network_{label}'])).state_dict()}, ckpt)
            opt['path'][f'pretrain_network_{label}'] = ckpt
    train = opt['datasets']['train']
    size = int(patch or train.get('gt_size', 64))
    _synthetic_images(os.path.join(workdir, 'blur'), 8, max(96, size), seed=1)
    _synthetic_images(os.path.join(workdir, 'sharp'), 8, max(96, size), seed=2)
    train.update(phase='train', scale=1, dataroot_blur=os.path.join(workdir, 'blur'),
                 dataroot_sharp=os.path.join(workdir, 'sharp'), io_backend={'type': 'disk'}, gt_size=size,
                 num_worker_per_gpu=0, prefetch_mode=None)
    if batch_size:
        train['batch_size_per_gpu'] = batch_size
    opt['datasets'] = {'train': train}
    dataset = build_dataset(train)
    loader = build_dataloader(dataset, train, num_gpu=opt['num_gpu'], dist=False, sampler=None,
                              seed=opt.get('manual_seed', 0))
    model = build_model(opt)
    return model, loader


def time_training(model, loader, iterations, device):
    """Per iteration: seconds for data (next batch + feed_data), G (generator losses, backward, step) and D
    (discriminator losses, backward, step). G and D are split where the model's ``optimize_parameters``
    enters ``discriminator_losses`` and where ``optimizer_d.step`` returns."""
    marks = {}
    original = model.discriminator_losses

    def d_losses():
        sync(device)
        marks['d_start'] = time.perf_counter()
        return original()

    def after_d_step(optimizer, args, kwargs):
        sync(device)
        marks['d_end'] = time.perf_counter()

    model.discriminator_losses = d_losses
    handle = model.optimizer_d.register_step_post_hook(after_d_step)
    rows = {'data': [], 'G': [], 'D': []}
    batches = iter(loader)
    try:
        for it in range(1, iterations + 1):
            sync(device)
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            model.feed_data(batch)
            sync(device)
            t1 = time.perf_counter()
            model.optimize_parameters(it)
            rows['data'].append(t1 - t0)
            rows['G'].append(marks['d_start'] - t1)
            rows['D'].append(marks['d_end'] - marks['d_start'])
    finally:
        handle.remove()
        del model.discriminator_losses
    return rows


def stage2_training_times(options_path, device, iterations, batch_size=None, patch=None, amp=None):
    with tempfile.TemporaryDirectory(prefix='tpdiff_bench_') as workdir:
        model, loader = build_stage2_model(options_path, device, workdir, batch_size, patch, amp)
        batch = model.opt['datasets']['train']['batch_size_per_gpu']
        size = model.opt['datasets']['train']['gt_size']
        return time_training(model, loader, iterations, device), batch, size
