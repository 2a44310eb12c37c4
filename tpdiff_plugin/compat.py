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
   (ZeroDivisionError on CPU). We use gloo and skip ``set_device`` when there is no GPU.
4. ``BaseModel.model_to_device`` wraps DDP with ``device_ids=[torch.cuda.current_device()]``:
   fails on CPU. We pass ``device_ids=None`` for CPU models.
5. ``prefetch_mode: cuda`` needs a GPU (and ``pin_memory``). Without one in use, the parsed options
   fall back to the CPU prefetcher with a warning instead of crashing inside the training loop.

Also here, because every saved file passes through it: ``BaseModel.save_network`` and
``save_training_state`` write atomically (temporary file, fsync, rename), so a kill during a
save leaves the previous checkpoint intact.
"""
import os
import sys
import types
import warnings

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


def atomic_torch_save(obj, path):
    """``torch.save`` to ``path`` via a temporary file in the same folder, fsync and rename.

    A crash at any moment leaves either the old file or the complete new one, never a torn file.
    """
    import torch
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def load_resume_state(opt):
    """Mend 2: basicsr.train.load_resume_state without the CUDA assumption, ``weights_only=True``."""
    import torch
    from basicsr.utils import scandir

    resume_state_path = None
    if opt['auto_resume']:
        state_path = os.path.join('experiments', opt['name'], 'training_states')
        if os.path.isdir(state_path):
            states = list(scandir(state_path, suffix='state', recursive=False, full_path=False))
            if len(states) != 0:
                states = [float(v.split('.state')[0]) for v in states]
                resume_state_path = os.path.join(state_path, f'{max(states):.0f}.state')
                opt['path']['resume_state'] = resume_state_path
    else:
        if opt['path'].get('resume_state'):
            resume_state_path = opt['path']['resume_state']

    if resume_state_path is None:
        return None
    if not os.path.isfile(resume_state_path):
        raise FileNotFoundError(f'path.resume_state: no such file: {resume_state_path}')
    if torch.cuda.is_available() and opt.get('num_gpu', 0) != 0:
        device = torch.device('cuda', torch.cuda.current_device())
    else:
        device = torch.device('cpu')
    resume_state = torch.load(resume_state_path, map_location=device, weights_only=True)
    from basicsr.train import check_resume
    check_resume(opt, resume_state['iter'])
    return resume_state


def _init_dist_pytorch(backend='nccl', **kwargs):
    """Mend 3: upstream's launcher-pytorch init, with gloo and no ``set_device`` on CPU."""
    import torch
    import torch.distributed as dist
    rank = int(os.environ['RANK'])
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        backend = 'gloo'
    dist.init_process_group(backend=backend, **kwargs)


def model_to_device(self, net):
    """Mend 4: upstream ``BaseModel.model_to_device`` with ``device_ids=None`` for CPU models."""
    import torch
    from torch.nn.parallel import DataParallel, DistributedDataParallel
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
    import torch
    train = (opt.get('datasets') or {}).get('train') or {}
    if train.get('prefetch_mode') == 'cuda' and not (torch.cuda.is_available() and opt.get('num_gpu', 0) != 0):
        warnings.warn('datasets.train.prefetch_mode is "cuda" but no GPU is in use; '
                      'using the CPU prefetcher instead (set prefetch_mode: ~ to silence this).')
        train['prefetch_mode'] = None
    return opt


def _parse_options_with_fallback(parse_options):
    def parse(root_path, is_train=True):
        opt, args = parse_options(root_path, is_train=is_train)
        return cpu_prefetch_fallback(opt), args
    parse.__doc__ = parse_options.__doc__
    return parse


def _save_network(self, net, net_label, current_iter, param_key='params'):
    """Upstream ``BaseModel.save_network``, written atomically (no retry loop needed)."""
    if current_iter == -1:
        current_iter = 'latest'
    save_path = os.path.join(self.opt['path']['models'], f'{net_label}_{current_iter}.pth')
    net = net if isinstance(net, list) else [net]
    param_key = param_key if isinstance(param_key, list) else [param_key]
    assert len(net) == len(param_key), 'The lengths of net and param_key should be the same.'
    save_dict = {}
    for net_, key_ in zip(net, param_key):
        net_ = self.get_bare_model(net_)
        state_dict = net_.state_dict()
        for key, param in state_dict.items():
            if key.startswith('module.'):
                key = key[7:]
            state_dict[key] = param.cpu()
        save_dict[key_] = state_dict
    atomic_torch_save(save_dict, save_path)


def _save_training_state(self, epoch, current_iter):
    """Upstream ``BaseModel.save_training_state``, written atomically."""
    if current_iter == -1:
        return
    state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [], 'schedulers': []}
    for o in self.optimizers:
        state['optimizers'].append(o.state_dict())
    for s in self.schedulers:
        state['schedulers'].append(s.state_dict())
    extra = getattr(self, 'extra_training_state', None)
    if callable(extra):
        state.update(extra())
    save_path = os.path.join(self.opt['path']['training_states'], f'{current_iter}.state')
    atomic_torch_save(state, save_path)


def apply():
    """Apply every mend once. Safe to call repeatedly."""
    global _APPLIED
    if _APPLIED:
        return
    _mend_functional_tensor()

    import basicsr.train
    import basicsr.utils.dist_util as dist_util
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
    )
    basicsr.train.load_resume_state = load_resume_state
    dist_util._init_dist_pytorch = _init_dist_pytorch
    BaseModel.model_to_device = model_to_device
    basicsr.train.parse_options = _parse_options_with_fallback(basicsr.train.parse_options)
    BaseModel.save_network = master_only(_save_network)
    BaseModel.save_training_state = master_only(_save_training_state)
    _APPLIED = True
