"""Exact resume: what a ``.state`` file holds, which one ``--auto_resume`` picks, and how training continues.

Upstream basicsr 1.4.2 saves optimizers and schedulers, maps the state to ``torch.cuda.current_device()``
(no GPU: crash), takes the newest ``.state`` even when its networks were never written, and restarts the
interrupted epoch from its first batch. Here (installed over upstream by ``compat.apply``):

- :func:`save_training_state`: the ``.state`` also holds whatever the model returns from
  :meth:`TrainingStateHook.extra_training_state` (the explicit hook models implement; our models save the
  history pools, the RNG streams, the bad-iteration count and the discriminators' parameter counts there),
  written atomically.
- :func:`load_resume_state`: maps to the current device or the CPU, ``weights_only=True``; ``--auto_resume``
  picks the newest *complete* state (every network's ``net_<label>_<iter>.pth`` present).
- :func:`wrap_create_train_val_dataloader` / :func:`wrap_sampler_iter`: the train sampler continues the
  interrupted epoch where it stopped and restores the python / numpy / torch RNG streams saved at that
  moment, so a resumed CPU run with ``num_worker_per_gpu: 0`` repeats the uninterrupted one exactly.
- With dataloader workers (``num_worker_per_gpu > 0``) the workers' RNG positions are not saved; instead,
  for a dataset that declares ``SAMPLE_SEEDS = True``, the train sampler yields ``(index, seed)`` keys with
  ``seed = sample_seed(manual_seed, epoch, position in the epoch)``, and the dataset draws that sample's
  randomness from python's ``random`` seeded with it (:func:`python_random_seeded`). Each sample's crops no
  longer depend on which worker loads it, so a resumed run is exact with workers too, and any number of
  workers gives the same training. With 0 workers nothing changes (the dataset draws from the main
  process's stream, saved in the ``.state``).

Under DDP every rank's streams and extra state are saved (``rank_states``) and each rank resumes its own.

Upstream's ``train_pipeline`` calls ``load_resume_state(opt)`` and later ``create_train_val_dataloader(opt,
logger)`` with no channel between them: :data:`_HANDOFF` carries the epoch position and RNG streams from
one to the other (written by the first, consumed once by the second).
"""
import contextlib
import glob
import os
import random
import warnings

import numpy as np
import torch
import torch.distributed as dist

from tpdiff_plugin.utils.checkpoint import atomic_torch_save, read_checkpoint
from tpdiff_plugin.utils.errors import UserError

_HANDOFF = {}


class TrainingStateHook:
    """Mixin (before basicsr's model class) for models that resume exactly.

    :func:`save_training_state` merges ``extra_training_state()`` into the state it writes; on resume,
    ``load_extra_training_state`` gets those entries back (this rank's under DDP). ``validation`` leaves the RNG
    streams as it found them: basicsr saves a checkpoint *before* validating at the same iteration, and
    validating draws from the global RNG (each DataLoader iterator takes a seed from torch's), so without this
    a run resumed from such a checkpoint would continue on other random numbers than the uninterrupted run
    (found by ``bench/soak.py``). It also means that how often one validates does not change training.
    """

    def extra_training_state(self):
        """Entries (plain containers of tensors and numbers) to merge into the ``.state`` file."""
        return {}

    def load_extra_training_state(self, state):
        """Take back what ``extra_training_state`` saved; ``state`` is the ``.state`` as this rank saved it."""

    def resume_training(self, resume_state):
        super().resume_training(resume_state)  # basicsr's: optimizers and schedulers
        self.load_extra_training_state(own_rank_state(resume_state, self.opt))

    def validation(self, dataloader, current_iter, tb_logger, save_img=False):
        states = get_rng_states()
        try:
            super().validation(dataloader, current_iter, tb_logger, save_img)
        finally:
            set_rng_states(states)


def _rank_and_world():
    """``(rank, world size)`` of this process under torch.distributed, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_from_ranks(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` under torch.distributed (a collective: every rank must call it),
    else ``[obj]``."""
    world = _rank_and_world()[1]
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def save_training_state(model, epoch, current_iter):
    """Upstream ``BaseModel.save_training_state`` plus the model's extra state, written atomically by rank 0.

    Called on every rank: under DDP each rank's extra state (its RNG streams, history pools, ...) is gathered
    and saved as ``rank_states`` (rank 0's also at the top level, as in a one-process run), so that each
    rank resumes its own (:func:`own_rank_state`)."""
    if current_iter == -1:
        return
    extra = model.extra_training_state() if isinstance(model, TrainingStateHook) else {}
    ranks = gather_from_ranks(extra)
    if _rank_and_world()[0] != 0:
        return
    state = {'epoch': epoch, 'iter': current_iter,
             'optimizers': [o.state_dict() for o in model.optimizers],
             'schedulers': [s.state_dict() for s in model.schedulers]}
    state.update(extra)
    if len(ranks) > 1:
        state['rank_states'] = ranks
    atomic_torch_save(state, os.path.join(model.opt['path']['training_states'], f'{current_iter}.state'))


def own_rank_state(resume_state, opt):
    """The ``.state`` as this rank saved it: under DDP, this rank's entries of ``rank_states`` over rank 0's.

    A multi-process state without them (saved before) loses its RNG streams here: rank 0's on every rank
    would make the ranks' random draws identical, so such runs resume with their seeded streams."""
    world = opt.get('world_size', 1)
    if world <= 1:
        return resume_state
    ranks = resume_state.get('rank_states')
    if isinstance(ranks, list) and len(ranks) == world:
        return {**resume_state, **ranks[opt.get('rank', 0)]}
    return {k: v for k, v in resume_state.items() if k != 'rng_states'}


def get_rng_states():
    """The python ``random``, numpy and torch (CPU, and CUDA when present) RNG states, as plain objects
    that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {'python': random.getstate(),
              'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
              'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states['cuda'] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    """Restore what :func:`get_rng_states` returned."""
    version, internal, gauss = states['python']
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = states['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states['torch'])
    if states.get('cuda') is not None and torch.cuda.is_available():
        cuda = states['cuda']
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def complete_states(opt):
    """``(iter, path)`` of every ``.state`` in the experiment whose networks were saved, newest first.

    Networks are saved before the ``.state`` and every file is written atomically, so a ``.state`` is
    complete by construction; this also skips a state whose ``net_g_<iter>.pth`` (or the file of another
    network that has checkpoints at other iterations) has been deleted since.
    """
    state_dir = os.path.join('experiments', opt['name'], 'training_states')
    model_dir = os.path.join('experiments', opt['name'], 'models')
    if not os.path.isdir(state_dir):
        return []
    iters = [int(name[:-len('.state')]) for name in os.listdir(state_dir)
             if name.endswith('.state') and name[:-len('.state')].isdigit()]
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


def load_resume_state(opt):
    """basicsr.train.load_resume_state without the CUDA assumption, ``weights_only=True``; ``--auto_resume``
    picks the newest complete state. Leaves the epoch position and RNG streams in :data:`_HANDOFF`."""
    from basicsr.train import check_resume  # at call time: basicsr imports only after compat's torchvision mend

    _HANDOFF.clear()
    resume_state_path = None
    if opt['auto_resume']:
        states = complete_states(opt)
        if states:
            resume_state_path = states[0][1]
            opt['path']['resume_state'] = resume_state_path
    elif opt['path'].get('resume_state'):
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
    check_resume(opt, resume_state['iter'])
    rng = own_rank_state(resume_state, opt).get('rng_states')  # this rank's streams
    _HANDOFF.update(iter=resume_state['iter'], epoch=resume_state.get('epoch', 0), rng=rng)
    return resume_state


def sample_seed(manual_seed, epoch, position):
    """The seed of the sample at ``position`` (over all ranks) in ``epoch``'s order of a run seeded with
    ``manual_seed``: a 64-bit hash of the three (numpy's ``SeedSequence``), the same in every process."""
    entropy = [int(x) % 2**64 for x in (manual_seed, epoch, position)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def python_random_seeded(seed):
    """Python's global ``random`` seeded with ``seed`` inside the block, and as it was before after it."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def wrap_sampler_iter(original_iter):
    """``EnlargedSampler.__iter__`` that, once after a resume, restores the RNG streams and skips the batches
    the interrupted run already consumed in this epoch; with ``_tpdiff_sample_seeds`` set (the manual seed),
    it yields ``(index, sample_seed(...))`` keys instead of indices."""
    def sampler_iter(self):
        resume = getattr(self, '_tpdiff_resume', None)
        self._tpdiff_resume = None
        indices = original_iter(self)
        seed = getattr(self, '_tpdiff_sample_seeds', None)
        if seed is not None:  # this rank's k-th sample is at rank + k * num_replicas in the epoch's order
            indices = iter([(i, sample_seed(seed, self.epoch, self.rank + k * self.num_replicas))
                            for k, i in enumerate(indices)])
        if resume is None:
            return indices
        skip, rng = resume
        if rng is not None:
            set_rng_states(rng)
        return iter(list(indices)[skip:])
    sampler_iter.__doc__ = original_iter.__doc__
    return sampler_iter


def wrap_sampler_set_epoch(original_set_epoch):
    """``EnlargedSampler.set_epoch`` that arms the pending resume: it applies to the first iteration over the
    sampler after the training loop's first ``set_epoch``. basicsr's ``CPUPrefetcher`` opens an iterator
    before that (and drops it); with workers that iterator already draws indices, and restoring the RNG
    streams there would be followed by the loop's own iterator drawing its seed from them."""
    def set_epoch(self, epoch):
        original_set_epoch(self, epoch)
        pending = getattr(self, '_tpdiff_pending_resume', None)
        if pending is not None:
            self._tpdiff_resume, self._tpdiff_pending_resume = pending, None
    set_epoch.__doc__ = original_set_epoch.__doc__
    return set_epoch


def wrap_create_train_val_dataloader(create):
    """basicsr's ``create_train_val_dataloader`` that hands the resume position to the train sampler, and
    turns on per-sample seeds when workers load a dataset that takes them (``SAMPLE_SEEDS``)."""
    def create_with_resume(opt, logger):
        result = create(opt, logger)
        train_loader, train_sampler = result[0], result[1]
        if (train_loader is not None and train_sampler is not None and train_loader.num_workers > 0
                and getattr(train_sampler.dataset, 'SAMPLE_SEEDS', False)):
            train_sampler._tpdiff_sample_seeds = int(opt.get('manual_seed') or 0)
        resume = dict(_HANDOFF)
        _HANDOFF.clear()
        if resume and train_loader is not None and train_sampler is not None:
            per_epoch = len(train_loader)
            done = resume['iter'] - resume['epoch'] * per_epoch  # iterations of the saved epoch already run
            done = min(max(done, 0), per_epoch)
            train_sampler._tpdiff_pending_resume = (done * train_loader.batch_size, resume['rng'])
            logger.info(f'Resume: continuing epoch {resume["epoch"]} after its first {done} of {per_epoch} '
                        'iterations' + ('' if resume['rng'] is not None else ' (no RNG states saved)'))
        return result
    create_with_resume.__doc__ = create.__doc__
    return create_with_resume
