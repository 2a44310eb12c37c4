"""Shared test helpers: every test runs on CPU with tiny configs."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tpdiff_plugin  # noqa: F401  (mends basicsr and registers everything once for the session)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread. Two OpenMP threads on a shared 2-core machine spin-wait and ran
    tiny-tensor tests up to ~90x slower; subprocess tests get OMP_NUM_THREADS=1 from run_cmd."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_cmd(args, cwd, timeout=600, env=None):
    """Run a console script from this venv (``basicsr``, ``tpdiff``, ``torchrun``) or a python -m call."""
    if args[0] in ('basicsr', 'tpdiff', 'torchrun'):
        args = [str(BIN / args[0])] + list(args[1:])
    full_env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli_runner():
    return run_cmd
