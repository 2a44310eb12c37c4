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
save leaves the previous checkpoint intact. Reliability mends of the same kind:

6. ``BaseModel.load_network`` calls ``torch.load`` without ``weights_only``; ours passes
   ``weights_only=True`` (a checkpoint that would run code when unpickled is refused) and reports an
   unreadable file as a one-line ``UserError``.
7. Resume is exact on CPU with ``num_worker_per_gpu: 0``: ``load_resume_state`` picks the newest
   *complete* ``.state`` (its ``net_*_<iter>.pth`` present), and the train dataloader continues the
   interrupted epoch where it stopped (upstream restarts the epoch from its first batch), restoring
   the python / numpy / torch RNG streams saved by the model at the moment the first batch is drawn.
   With dataloader workers, each worker's RNG position within the epoch is not saved: the resumed
   run sees the same images in the same order, but other random crops and flips. With several
   processes (DDP) the RNG streams are not restored (only rank 0's are saved).

Test hook (tests only): with ``TPDIFF_TEST_KILL_DURING_SAVE=<file name>`` in the environment,
:func:`atomic_torch_save` SIGKILLs its own process after writing that file's temporary copy and
before the rename, i.e. in the middle of a save (``tests/test_crash_resume.py``).
"""
import errno
import glob
import os
import signal
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


def _disk_full_error(exc):
    """The OSError (no space, file too large, quota) behind ``exc``: torch.save wraps it in a RuntimeError."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


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
        if os.environ.get('TPDIFF_TEST_KILL_DURING_SAVE') == os.path.basename(path):  # test hook, see above
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        disk = _disk_full_error(e)
        if disk is not None:
            from tpdiff_plugin.utils.errors import UserError
            raise UserError(f'cannot write {path}: {os.strerror(disk.errno)}; nothing was replaced (the previous '
                            'checkpoint is intact). Free some space, then continue with --auto_resume') from None
        raise
    # temporary copies of this file left by a process killed mid-save
    for stale in glob.glob(os.path.join(glob.escape(folder), f'.{glob.escape(os.path.basename(path))}.tmp*')):
        try:
            os.remove(stale)
        except OSError:
            pass
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _complete_states(opt):
    """``(iter, path)`` of every ``.state`` in the experiment whose networks were saved, newest first.

    Networks are saved before the ``.state`` and every file is written atomically, so a ``.state`` is
    complete by construction; this also skips a state whose ``net_g_<iter>.pth`` (or the file of another
    network that has checkpoints at other iterations) has been deleted since.
    """
    from basicsr.utils import scandir
    state_dir = os.path.join('experiments', opt['name'], 'training_states')
    model_dir = os.path.join('experiments', opt['name'], 'models')
    if not os.path.isdir(state_dir):
        return []
    iters = []
    for name in scandir(state_dir, suffix='.state', recursive=False, full_path=False):
        stem = name[:-len('.state')]
        if stem.isdigit():
            iters.append(int(stem))
    labels = [k[len('network_'):] for k in opt if k.startswith('network_')]
    labels = [x for x in labels if x == 'g' or glob.glob(os.path.join(glob.escape(model_dir), f'net_{x}_*.pth'))]
    out = []
    for it in sorted(iters, reverse=True):
        missing = [x for x in labels if not os.path.isfile(os.path.join(model_dir, f'net_{x}_{it}.pth'))]
        if missing:
            warnings.warn(f'auto_resume: skipping {state_dir}/{it}.state: net_{missing[0]}_{it}.pth is missing')
            continue
        out.append((it, os.path.join(state_dir, f'{it}.state')))
    return out


#: Hand-off from load_resume_state to the train dataloader built next by upstream's train_pipeline (the
#: epoch position and RNG streams to restore when its first batch is drawn). Consumed once.
_RESUME_HANDOFF = {}


def read_checkpoint(path, what, map_location='cpu'):
    """``torch.load(path, weights_only=True)``; an unreadable or unsafe file is a one-line UserError."""
    import torch
    from tpdiff_plugin.utils.errors import UserError
    if not os.path.isfile(path):
        raise UserError(f'{what}: no such checkpoint file: {path}')
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torn, foreign or unsafe file: one line naming it)
        text = str(e).strip()
        first = text.splitlines()[0] if text else ''
        if 'weights_only' in text or 'Unsupported global' in text or 'GLOBAL' in text:
            first = ('refused to unpickle: it holds Python objects other than tensors and plain containers '
                     '(loaded with weights_only=True; only load checkpoints you trust, and re-save them '
                     'as plain state dicts)')
        raise UserError(f'{what}: cannot read checkpoint {path}: {type(e).__name__}: {first}') from None


def load_resume_state(opt):
    """Mend 2 (and 7): basicsr.train.load_resume_state without the CUDA assumption, ``weights_only=True``;
    ``--auto_resume`` picks the newest complete state."""
    import torch
    from tpdiff_plugin.utils.errors import UserError

    _RESUME_HANDOFF.clear()
    resume_state_path = None
    if opt['auto_resume']:
        states = _complete_states(opt)
        if states:
            resume_state_path = states[0][1]
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
    resume_state = read_checkpoint(resume_state_path, 'path.resume_state', map_location=device)
    if not isinstance(resume_state, dict) or not isinstance(resume_state.get('iter'), int):
        raise UserError(f'path.resume_state: {resume_state_path} is not a basicsr training state (no "iter")')
    from basicsr.train import check_resume
    check_resume(opt, resume_state['iter'])
    # the RNG streams are rank 0's (only rank 0 saves): restoring them on every rank would make the ranks'
    # random draws identical, so multi-process runs resume with their seeded streams instead
    rng = resume_state.get('rng_states') if opt.get('world_size', 1) == 1 else None
    _RESUME_HANDOFF.update(iter=resume_state['iter'], epoch=resume_state.get('epoch', 0), rng=rng)
    return resume_state


def get_rng_states():
    """The python ``random``, numpy and torch (CPU, and CUDA when present) RNG states, as plain objects
    that ``torch.load(weights_only=True)`` accepts."""
    import random

    import numpy as np
    import torch
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {'python': random.getstate(),
              'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
              'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    """Restore what :func:`get_rng_states` returned."""
    import random

    import numpy as np
    import torch
    version, internal, gauss = states['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = states['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states['torch'])
    if states.get('cuda') is not None and torch.cuda.is_available():
        cuda = states['cuda']
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _sampler_iter(self):
    """EnlargedSampler.__iter__ that, once after a resume, restores the RNG streams and skips the batches
    the interrupted run already consumed in this epoch (mend 7)."""
    resume = getattr(self, '_tpdiff_resume', None)
    self._tpdiff_resume = None
    indices = ORIGINALS['EnlargedSampler.__iter__'](self)
    if resume is None:
        return indices
    skip, rng = resume
    if rng is not None:
        set_rng_states(rng)
    return iter(list(indices)[skip:])


def _create_train_val_dataloader(create):
    def create_with_resume(opt, logger):
        result = create(opt, logger)
        train_loader, train_sampler = result[0], result[1]
        resume = dict(_RESUME_HANDOFF)
        _RESUME_HANDOFF.clear()
        if resume and train_loader is not None and train_sampler is not None:
            per_epoch = len(train_loader)
            done = resume['iter'] - resume['epoch'] * per_epoch  # iterations of the saved epoch already run
            done = min(max(done, 0), per_epoch)
            train_sampler._tpdiff_resume = (done * train_loader.batch_size, resume['rng'])
            logger.info(f'Resume: continuing epoch {resume["epoch"]} after its first {done} of {per_epoch} '
                        'iterations' + ('' if resume['rng'] is not None else ' (no RNG states saved)'))
        return result
    create_with_resume.__doc__ = create.__doc__
    return create_with_resume


def _load_network(self, net, load_path, strict=True, param_key='params'):
    """Mend 6: upstream ``BaseModel.load_network`` with ``torch.load(weights_only=True)``."""
    from collections import OrderedDict

    from basicsr.utils import get_root_logger
    logger = get_root_logger()
    net = self.get_bare_model(net)
    load_net = read_checkpoint(load_path, 'pretrain_network')
    if not isinstance(load_net, dict):
        from tpdiff_plugin.utils.errors import UserError
        raise UserError(f'{load_path}: not a basicsr checkpoint (a dict of state dicts), got {type(load_net).__name__}')
    if param_key is not None:
        if param_key not in load_net and 'params' in load_net:
            param_key = 'params'
            logger.info('Loading: params_ema does not exist, use params.')
        load_net = load_net[param_key]
    logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
    load_net = OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in load_net.items())
    self._print_different_keys_loading(net, load_net, strict)
    net.load_state_dict(load_net, strict=strict)


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
        **{'EnlargedSampler.__iter__': EnlargedSampler.__iter__},
    )
    basicsr.train.load_resume_state = load_resume_state
    dist_util._init_dist_pytorch = _init_dist_pytorch
    BaseModel.model_to_device = model_to_device
    basicsr.train.parse_options = _parse_options_with_fallback(basicsr.train.parse_options)
    BaseModel.save_network = master_only(_save_network)
    BaseModel.save_training_state = master_only(_save_training_state)
    BaseModel.load_network = _load_network
    basicsr.train.create_train_val_dataloader = _create_train_val_dataloader(basicsr.train.create_train_val_dataloader)
    EnlargedSampler.__iter__ = _sampler_iter
    _APPLIED = True
