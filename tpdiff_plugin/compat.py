"""Mends for running basicsr 1.4.2 on current torchvision, on CPU and as several CPU processes.

basicsr 1.4.2 (the last PyPI release) predates torchvision 0.17 and assumes a CUDA device in
its resume, launcher and DDP code. Each mend below is small, idempotent and documented with the
upstream symptom; :func:`apply` is called by ``tpdiff_plugin/__init__.py`` before anything
imports basicsr. Every mend has a test in ``tests/test_compat.py`` that fails without it.

1. ``import basicsr`` fails: ``torchvision.transforms.functional_tensor`` was removed in
   torchvision 0.17 (upstream BasicSR issues #533, #663). We register a stand-in module that
   re-exports ``rgb_to_grayscale`` from ``torchvision.transforms.functional``.
2. Resume maps the state with ``torch.cuda.current_device()``: fails with no GPU. We replace
   ``basicsr.train.load_resume_state`` with one that maps to the current device or the CPU and
   loads with ``weights_only=True``.
3. ``--launcher pytorch`` hard-codes NCCL and ``torch.cuda.set_device(rank % device_count())``
   (ZeroDivisionError on CPU). We use gloo and skip ``set_device`` when there is no GPU, and also when the
   options train on the CPU (``num_gpu: 0``) of a machine that has GPUs: upstream's ``parse_options`` starts
   the process group before anyone reads ``num_gpu``, so NCCL met CPU tensors in DDP there.
4. ``BaseModel.model_to_device`` wraps DDP with ``device_ids=[torch.cuda.current_device()]``:
   fails on CPU. We pass ``device_ids=None`` for CPU models.
5. ``prefetch_mode: cuda`` needs a GPU (and ``pin_memory``). Without one in use, the parsed options
   fall back to the CPU prefetcher with a warning instead of crashing inside the training loop.

Reliability mends, whose machinery lives in ``utils/`` (this module only installs it):

6. ``BaseModel.load_network`` calls ``torch.load`` without ``weights_only``, and ``save_network`` /
   ``save_training_state`` can leave a torn file when killed mid-save. They go through
   ``utils/checkpoint.py`` (``weights_only=True``, one-line errors, atomic writes); network checkpoints
   also carry their network's options block, so that ``tpdiff deblur --weights`` needs no ``--opt``.
7. Resume assumes CUDA, can pick a ``.state`` whose networks were never written and restarts the
   interrupted epoch from its first batch: ``utils/resume.py`` makes it exact on CPU (mend 2 is its
   ``load_resume_state``; the train dataloader and sampler are wrapped to continue the epoch).
"""
import os
import sys
import types
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DataParallel, DistributedDataParallel

from tpdiff_plugin.utils import checkpoint, resume

_APPLIED = False
# Upstream's functions as they were before the mends, kept so tests can show each mend is needed.
ORIGINALS = {}


def _mend_functional_tensor():
    """Mend 1: provide ``torchvision.transforms.functional_tensor`` for basicsr's degradations."""
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401  (old torchvision: nothing to do)
        return
    except ImportError:
        pass
    from torchvision.transforms import functional
    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[name] = shim


def _init_dist_pytorch(backend='nccl', **kwargs):
    """Mend 3: upstream's launcher-pytorch init, with gloo and no ``set_device`` on CPU."""
    rank = int(os.environ['RANK'])
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        backend = 'gloo'
    dist.init_process_group(backend=backend, **kwargs)


def model_to_device(self, net):
    """Mend 4: upstream ``BaseModel.model_to_device`` with ``device_ids=None`` for CPU models."""
    net = net.to(self.device)
    if self.opt['dist']:
        find_unused_parameters = self.opt.get('find_unused_parameters', False)
        device_ids = None if self.device.type == 'cpu' else [torch.cuda.current_device()]
        net = DistributedDataParallel(net, device_ids=device_ids,
                                      find_unused_parameters=find_unused_parameters)
    elif self.opt['num_gpu'] > 1:
        net = DataParallel(net)
    return net


def cpu_prefetch_fallback(opt):
    """Mend 5: ``prefetch_mode: cuda`` without a GPU in use becomes the CPU prefetcher, with a warning.

    Upstream would build a ``CUDAPrefetcher`` (``torch.cuda.Stream()`` fails without a GPU) and then
    also demand ``pin_memory: true``. Returns ``opt``, changed in place.
    """
    train = (opt.get('datasets') or {}).get('train') or {}
    if train.get('prefetch_mode') == 'cuda' and not (torch.cuda.is_available() and opt.get('num_gpu', 0) != 0):
        warnings.warn('datasets.train.prefetch_mode is "cuda" but no GPU is in use; '
                      'using the CPU prefetcher instead (set prefetch_mode: ~ to silence this).')
        train['prefetch_mode'] = None
    return opt


def launcher_backend(opt_path):
    """Mend 3: the process-group backend for ``--launcher pytorch`` with the options file ``opt_path``: gloo
    when it trains on the CPU (``num_gpu: 0``), else its ``dist_params.backend`` (default nccl). None when the
    file cannot be read: upstream then reports it as before."""
    import yaml
    from basicsr.utils.options import ordered_yaml
    try:
        with open(opt_path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(opt, dict):
        return None
    if opt.get('num_gpu') == 0:
        return 'gloo'
    return (opt.get('dist_params') or {}).get('backend') or 'nccl'


def _parse_options_with_fallback(parse_options):
    import argparse

    import basicsr.utils.options as options

    def parse(root_path, is_train=True):
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument('-opt')
        parser.add_argument('--launcher', default='none')
        known, _ = parser.parse_known_args()
        backend = launcher_backend(known.opt) if known.launcher == 'pytorch' and known.opt else None
        init_dist = options.init_dist

        def init_with_backend(launcher, **kwargs):  # upstream calls init_dist('pytorch') with no backend
            return init_dist(launcher, **{**kwargs, 'backend': backend})

        if backend is not None:
            options.init_dist = init_with_backend
        try:
            opt, args = parse_options(root_path, is_train=is_train)
        finally:
            options.init_dist = init_dist
        return cpu_prefetch_fallback(opt), args
    parse.__doc__ = parse_options.__doc__
    return parse


def _load_network(self, net, load_path, strict=True, param_key='params'):
    """Mend 6: upstream ``BaseModel.load_network`` through ``utils/checkpoint.py`` (``weights_only=True``,
    one-line errors; a missing ``param_key`` falls back to ``params`` as upstream's does)."""
    checkpoint.load_network_file(self.get_bare_model(net), load_path, 'pretrain_network', param_key=param_key,
                                 strict=strict, fallback_to_params=True,
                                 hint='check the network options, or set strict_load_* false')


def _save_network(self, net, net_label, current_iter, param_key='params'):
    """Mend 6: upstream ``BaseModel.save_network``, written atomically. The file also carries the options
    block the network was built from (``net_g`` -> ``network_g``, ``net_d_sharp`` -> ``network_d_sharp``)
    and the plugin version; upstream's ``load_network`` reads it as before (see ``utils/checkpoint.py``)."""
    if current_iter == -1:
        current_iter = 'latest'
    nets = net if isinstance(net, list) else [net]
    keys = param_key if isinstance(param_key, list) else [param_key]
    if len(nets) != len(keys):
        raise ValueError('save_network: the lengths of net and param_key should be the same')
    block = self.opt.get('network_' + net_label[4:]) if net_label.startswith('net_') else None
    checkpoint.save_networks([self.get_bare_model(n) for n in nets], keys,
                             os.path.join(self.opt['path']['models'], f'{net_label}_{current_iter}.pth'),
                             network_opt=block if isinstance(block, dict) and 'type' in block else None)


def _save_training_state(self, epoch, current_iter):
    """Mend 6/7: upstream ``BaseModel.save_training_state``, with the model's extra state, atomically."""
    resume.save_training_state(self, epoch, current_iter)


def apply():
    """Apply every mend once. Safe to call repeatedly."""
    global _APPLIED
    if _APPLIED:
        return
    _mend_functional_tensor()

    # imported only now: importing basicsr needs mend 1 in place
    import basicsr.train
    import basicsr.utils.dist_util as dist_util
    from basicsr.data.data_sampler import EnlargedSampler
    from basicsr.models.base_model import BaseModel
    from basicsr.utils.dist_util import master_only

    ORIGINALS.update(
        load_resume_state=basicsr.train.load_resume_state,
        _init_dist_pytorch=dist_util._init_dist_pytorch,
        model_to_device=BaseModel.model_to_device,
        CUDAPrefetcher=basicsr.train.CUDAPrefetcher,
        parse_options=basicsr.train.parse_options,
        save_network=BaseModel.save_network,
        save_training_state=BaseModel.save_training_state,
        load_network=BaseModel.load_network,
        create_train_val_dataloader=basicsr.train.create_train_val_dataloader,
        **{'EnlargedSampler.__iter__': EnlargedSampler.__iter__,
           'EnlargedSampler.set_epoch': EnlargedSampler.set_epoch},
    )
    basicsr.train.load_resume_state = resume.load_resume_state
    dist_util._init_dist_pytorch = _init_dist_pytorch
    BaseModel.model_to_device = model_to_device
    basicsr.train.parse_options = _parse_options_with_fallback(basicsr.train.parse_options)
    BaseModel.save_network = master_only(_save_network)
    BaseModel.save_training_state = _save_training_state  # every rank calls it (a gather); rank 0 writes
    BaseModel.load_network = _load_network
    basicsr.train.create_train_val_dataloader = resume.wrap_create_train_val_dataloader(
        basicsr.train.create_train_val_dataloader)
    EnlargedSampler.__iter__ = resume.wrap_sampler_iter(EnlargedSampler.__iter__)
    EnlargedSampler.set_epoch = resume.wrap_sampler_set_epoch(EnlargedSampler.set_epoch)
    _APPLIED = True
