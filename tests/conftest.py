"""Shared test helpers: every test runs on CPU with tiny configs."""
import copy
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tpdiff_plugin  # noqa: F401  (mends basicsr and registers everything once for the session)
from tpdiff_plugin.archs.ttformer_arch import TPDiffNet

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def bench_module(name):
    """The script ``bench/<name>.py`` imported as a module (bench/ is not a package: loaded by path, so that its
    generic names, e.g. ``run``, never shadow anything on sys.path)."""
    spec = importlib.util.spec_from_file_location(f'bench_{name}', REPO / 'bench' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread. Two OpenMP threads on a shared 2-core machine spin-wait and ran
    tiny-tensor tests up to ~90x slower; subprocess tests get OMP_NUM_THREADS=1 from run_cmd."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The tiny TPDiffNet most tests use, as a network_g block (lists, so it dumps to YAML as it is).
# identity_init off: a random output conv, so that the network changes images and tests can see it.
TINY_NET = dict(type='TPDiffNet', dim=4, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1],
                prior_ch=8, prior_hidden=8, ffn_expansion_factor=2.0, dm_feats=8, dm_blocks=1, dm_cond_blocks=1,
                dm_timesteps=4, identity_init=False)


def tiny_net_opts(**overrides):
    """A fresh copy of ``TINY_NET`` (a ``network_g`` block with ``type``), ``overrides`` replacing or adding keys."""
    return {**copy.deepcopy(TINY_NET), **overrides}


def tiny_net(seed=0, **overrides):
    """The tiny TPDiffNet of ``tiny_net_opts(**overrides)``, built after ``torch.manual_seed(seed)``."""
    kwargs = tiny_net_opts(**overrides)
    kwargs.pop('type')
    torch.manual_seed(seed)
    return TPDiffNet(**kwargs)


def texture_pair(n=4, size=32):
    """``(sharp, blurry)``, each ``[n, 3, size, size]``: grey noise textures whose detail is a few hundredths in
    size, as in photos, and their copies blurred by the binomial [1, 4, 6, 4, 1]/16 (reflect-padded). Drawn from
    torch's global generator: the discriminator learning tests tell the two apart."""
    sharp = 0.5 + 0.05 * torch.randn(n, 3, size, size)
    taps = torch.tensor([1., 4., 6., 4., 1.]) / 16
    blurry = torch.nn.functional.pad(sharp, (2, 2, 2, 2), mode='reflect').flatten(0, 1)[:, None]
    blurry = torch.nn.functional.conv2d(blurry, taps.view(1, 1, 1, 5))
    return sharp, torch.nn.functional.conv2d(blurry, taps.view(1, 1, 5, 1)).view_as(sharp)


def d_separation_loss(d, view=lambda x: x, r1_weight=0., steps=60):
    """Trains discriminator ``d`` (Adam 2e-4, betas (0.5, 0.999), LSGAN) for ``steps`` to tell ``view`` of sharp
    ``texture_pair`` textures (real) from ``view`` of their blurred copies (fake), with the R1 penalty
    ``r1_weight / 2 * |grad D(real)|^2`` when > 0; returns its LSGAN loss over the last 10 steps (0.25 = chance)."""
    opt = torch.optim.Adam(d.parameters(), 2e-4, betas=(0.5, 0.999))
    losses = []
    for _ in range(steps):
        sharp, blurry = texture_pair()
        real = view(sharp).requires_grad_(r1_weight > 0)
        pred_real, pred_fake = d(real), d(view(blurry))
        loss = ((pred_real - 1) ** 2).mean() / 2 + (pred_fake ** 2).mean() / 2
        total = loss
        if r1_weight > 0:
            grad, = torch.autograd.grad(pred_real.sum(), real, create_graph=True)
            total = loss + r1_weight / 2 * grad.square().sum(dim=(1, 2, 3)).mean()
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-10:]) / 10


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_cmd(args, cwd, timeout=600, env=None):
    """Run a console script from this venv (``basicsr``, ``tpdiff``, ``torchrun``) or a python -m call."""
    if args[0] in ('basicsr', 'tpdiff', 'torchrun'):
        args = [str(BIN / args[0])] + list(args[1:])
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    if args[0].endswith('torchrun'):
        # the torchrun tests are two CPU processes on gloo; on a one-GPU machine both ranks saw the GPU and
        # failed in basicsr's model_to_device (bench/gpu_check.sh, 2026-11-27), which is not what they test
        full_env['CUDA_VISIBLE_DEVICES'] = ''
    full_env.update(env or {})
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_runner():
    return run_cmd
