"""Early checks of a BasicSR options file, so mistakes surface as one line naming the key.

Upstream parses the YAML deep inside ``parse_options`` and fails later still (a missing LMDB is an
``lmdb.Error`` from a DataLoader worker). ``basicsr train|test`` (``cli.py``) reads the file once up front
and checks what can be checked without building anything: required top-level keys, and that the data and
checkpoint paths named in it exist.

A model or dataset class that declares its option schema is also checked against it: the keys it reads
(``NETWORK_LABELS``, ``TOP_KEYS``, ``TRAIN_KEYS``, ``VAL_KEYS``, ``PATH_KEYS`` on a model; ``OPTION_KEYS`` on a
dataset), the integers it needs (``TRAIN_INTS`` / ``INT_OPTIONS``: key -> minimum) and a dataset's options with
a fixed set of values (``CHOICE_OPTIONS``: key -> allowed values), and a model's ``train`` options with a check
of their own (``TRAIN_CHECKS``: key -> a function that raises UserError for a bad value, e.g. ``amp`` and the
nested ``self_enhance``). The classes are the
one home of their schema; here only basicsr's own keys are listed. An unknown key is a UserError suggesting
the closest known one (a typo such as ``netwrok_g`` or ``trian`` would otherwise be silently ignored by
basicsr). Options of other model types and of upstream datasets are left to basicsr.
"""
import os

import torch
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, MODEL_REGISTRY

import tpdiff_plugin  # noqa: F401  (registers the plugin's models and datasets, whose schemas are read below)
from tpdiff_plugin.archs.prior_generators import MEMORY_GENERATORS
from tpdiff_plugin.data.image_checks import check_lmdb_complete
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.option_files import check_int, closest_option, is_number

REQUIRED_KEYS = ('name', 'model_type')
DATA_PATH_KEYS = ('dataroot_gt', 'dataroot_lq', 'dataroot_blur', 'dataroot_sharp', 'meta_info_file')
# basicsr's own keys (read by its train/test loop and option parser, for every model)
TOP_KEYS = {'name', 'model_type', 'num_gpu', 'scale', 'manual_seed', 'is_train', 'dist', 'rank', 'world_size',
            'auto_resume', 'datasets', 'path', 'train', 'val', 'logger', 'dist_params', 'find_unused_parameters',
            'use_static_graph', 'root_path', 'debug', 'suffix'}
TRAIN_KEYS = {'total_iter', 'warmup_iter'}
VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'metrics', 'pbar', 'rgb2bgr', 'use_image'}
LOGGER_KEYS = {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'}
PATH_KEYS = {'resume_state', 'ignore_resume_networks', 'root', 'experiments_root', 'models', 'training_states',
             'log', 'visualization', 'results_root'}
PATH_PREFIXES = ('pretrain_network_', 'strict_load_', 'param_key_')
# (section, key, minimum): integers basicsr's loop needs, checked when present
BASICSR_INTS = [('train', 'total_iter', 1), ('logger', 'print_freq', 1), ('logger', 'save_checkpoint_freq', 1),
                ('val', 'val_freq', 1), ('', 'manual_seed', 0)]


def _declared(registry, name, attribute):
    """The class registered as ``name`` if it declares ``attribute`` (its option schema), else None."""
    if not isinstance(name, str) or name not in registry:
        return None
    cls = registry.get(name)
    return cls if getattr(cls, attribute, None) is not None else None


def validate_devices(opt, source):
    """``num_gpu``: an integer >= 0 or "auto", and no more GPUs than this machine has (for every model type:
    upstream would fail inside torch.cuda)."""
    num_gpu = opt.get('num_gpu')
    if num_gpu is None or num_gpu == 'auto':
        return
    check_int(num_gpu, 'num_gpu (or "auto")', 0, source)
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpu > have:
        raise UserError(f'{source}: num_gpu is {num_gpu} but this machine has {have} GPU(s); set num_gpu: '
                        f'{have} (0 trains on the CPU) or "auto"')


def validate_paths(opt, source):
    """Check required keys and that every data / pretrained path named in ``opt`` exists."""
    for key in REQUIRED_KEYS:
        if key not in opt:
            raise UserError(f'{source}: missing required option "{key}"')
    datasets = opt.get('datasets') or {}
    if not isinstance(datasets, dict):
        raise UserError(f'{source}: option "datasets" must be a mapping of phase names to dataset options')
    for phase, dopt in datasets.items():
        if not isinstance(dopt, dict):
            raise UserError(f'{source}: option "datasets.{phase}" must be a mapping')
        for key in DATA_PATH_KEYS:
            value = dopt.get(key)
            if isinstance(value, str) and not os.path.exists(value):
                raise UserError(f'{source}: datasets.{phase}.{key}: no such file or folder: {value} '
                                f'(build it with `tpdiff make-lmdb` or `tpdiff make-demo`)')
            if isinstance(value, str) and os.path.isdir(value):
                check_lmdb_complete(value, f'{source}: datasets.{phase}.{key}')
    paths = opt.get('path') or {}
    if isinstance(paths, dict):
        for key, value in paths.items():
            if key.startswith('pretrain_network') and isinstance(value, str) and not os.path.isfile(value):
                raise UserError(f'{source}: path.{key}: no such checkpoint: {value}')
        # after the networks: a missing stage-1 run is reported by its networks first
        value = paths.get('resume_optim_d')
        if isinstance(value, str) and not os.path.exists(value):
            raise UserError(f'{source}: path.resume_optim_d: no such training state or folder: {value}')


def _unknown(key, known, where, source):
    key = str(key)  # YAML reads `1:`, `~:` or `yes:` as a number, None or a bool
    close = closest_option(key, known)
    hint = f'; did you mean "{close}"?' if close else f' (known: {", ".join(sorted(known))})'
    raise UserError(f'{source}: unknown option "{where}{key}"{hint}')


def _check_keys(opt, model, source):
    """Unknown top-level, network, ``train``, ``val``, ``logger`` and ``path`` keys for a declaring model."""
    networks = {f'network_{x}' for x in model.NETWORK_LABELS}
    top = TOP_KEYS | set(model.TOP_KEYS)
    for key in opt:
        if isinstance(key, str) and key.startswith('network_'):
            if key not in networks:
                _unknown(key, networks, '', source)
        elif key not in top:
            _unknown(key, top | networks, '', source)
    sections = {'train': TRAIN_KEYS | set(model.TRAIN_KEYS), 'val': VAL_KEYS | set(model.VAL_KEYS),
                'logger': LOGGER_KEYS}
    for section, known in sections.items():
        value = opt.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise UserError(f'{source}: option "{section}" must be a mapping, got {type(value).__name__}')
        for key in value:
            if key not in known:
                _unknown(key, known, f'{section}.', source)
    path_keys = PATH_KEYS | set(model.PATH_KEYS)
    paths = opt.get('path') or {}
    if not isinstance(paths, dict):
        raise UserError(f'{source}: option "path" must be a mapping, got {type(paths).__name__}')
    for key in paths:
        if key not in path_keys and not (isinstance(key, str) and key.startswith(PATH_PREFIXES)):
            _unknown(key, path_keys | {f'pretrain_network_{x}' for x in model.NETWORK_LABELS}, 'path.', source)


def _check_numbers(opt, model, source):
    ints = BASICSR_INTS + [('train', key, minimum) for key, minimum in model.TRAIN_INTS.items()]
    for section, key, minimum in ints:
        block = opt if not section else (opt.get(section) or {})
        if block.get(key) is not None:
            check_int(block[key], f'{section + "." if section else ""}{key}', minimum, source)
    for key, check in getattr(model, 'TRAIN_CHECKS', {}).items():  # the model's own checks of train options
        if isinstance(opt.get('train'), dict) and opt['train'].get(key) is not None:
            try:
                check(opt['train'][key])
            except UserError as e:
                raise UserError(f'{source}: {e}') from None
    for option in ('optim_g', 'optim_d'):
        optim = (opt.get('train') or {}).get(option)
        if isinstance(optim, dict) and 'lr' in optim:
            lr = optim['lr']
            if not is_number(lr) or lr < 0:
                hint = ' (YAML reads 2e-4 as text: write !!float 2e-4 or 0.0002)' if isinstance(lr, str) else ''
                raise UserError(f'{source}: train.{option}.lr must be a number >= 0, got {lr!r}{hint}')


def _check_scheduler(opt, source):
    """basicsr's ``CosineAnnealingRestartLR`` has no learning rate past its last period: it fails with a TypeError
    deep in the training loop at that iteration. So its periods must cover ``train.total_iter``."""
    train = opt.get('train') or {}
    scheduler, total = train.get('scheduler'), train.get('total_iter')
    if not (isinstance(scheduler, dict) and scheduler.get('type') == 'CosineAnnealingRestartLR' and is_number(total)):
        return
    periods = scheduler.get('periods')
    if not (isinstance(periods, list) and periods and all(is_number(p) and p > 0 for p in periods)):
        raise UserError(f'{source}: train.scheduler.periods must be a list of positive iteration counts, '
                        f'got {periods!r}')
    if sum(periods) < total:
        raise UserError(f'{source}: train.scheduler.periods add up to {sum(periods)}, fewer than train.total_iter '
                        f'({total}); a cosine schedule has no learning rate after its last period, so make them '
                        f'add up to at least {total}')


def _check_datasets(opt, source):
    datasets = opt.get('datasets') or {}
    if not isinstance(datasets, dict):
        raise UserError(f'{source}: option "datasets" must be a mapping of phase names to dataset options')
    for phase, dopt in datasets.items():
        dataset = _declared(DATASET_REGISTRY, dopt.get('type') if isinstance(dopt, dict) else None, 'OPTION_KEYS')
        if dataset is None:
            continue
        for key in dopt:
            if key not in dataset.OPTION_KEYS:
                _unknown(key, dataset.OPTION_KEYS, f'datasets.{phase}.', source)
        for key, minimum in dataset.INT_OPTIONS.items():
            if dopt.get(key) is not None:
                check_int(dopt[key], f'datasets.{phase}.{key}', minimum, source)
        _check_choices(dopt, getattr(dataset, 'CHOICE_OPTIONS', {}), f'datasets.{phase}.', source)


def _check_choices(block, choice_options, where, source):
    """``block``'s options with a fixed set of values (a class's ``CHOICE_OPTIONS``: key -> allowed values)."""
    for key, choices in choice_options.items():
        if block.get(key) is not None and block[key] not in choices:
            raise UserError(f'{source}: {where}{key}: {block[key]!r} is not one of {", ".join(choices)}')


def _check_prior_shapes(opt, source):
    """The TPE makes the prior that ``network_g`` reads: their prior sizes must agree."""
    g, tpe = opt.get('network_g'), opt.get('network_tpe')
    if isinstance(g, dict) and isinstance(tpe, dict):
        for key in ('prior_scale', 'prior_ch'):
            if key in g and key in tpe and g[key] != tpe[key]:
                raise UserError(f'{source}: network_g.{key} ({g[key]}) and network_tpe.{key} ({tpe[key]}) differ; '
                                'the TPE makes the prior that network_g reads, so they must be equal')
    for label in ('g', 'tpe'):
        block = opt.get(f'network_{label}')
        if isinstance(block, dict) and block.get('prior_scale') is not None:
            check_int(block['prior_scale'], f'network_{label}.prior_scale', 1, source)
    if isinstance(g, dict) and isinstance(tpe, dict) and g.get('prior_generator') in MEMORY_GENERATORS:
        slots_g, slots_tpe = g.get('mem_slots', 256), tpe.get('mem_slots', 256)
        if slots_g != slots_tpe:
            raise UserError(f'{source}: network_g.mem_slots ({slots_g}) and network_tpe.mem_slots ({slots_tpe}) '
                            f'differ; prior_generator {g["prior_generator"]} copies the TPE memory, so they must be equal')


def _check_network_choices(opt, source):
    """A network's options with a fixed set of values (the class's ``CHOICE_OPTIONS``)."""
    for key, block in opt.items():
        if not (isinstance(key, str) and key.startswith('network_') and isinstance(block, dict)):
            continue
        arch = _declared(ARCH_REGISTRY, block.get('type'), 'CHOICE_OPTIONS')
        if arch is not None:
            _check_choices(block, arch.CHOICE_OPTIONS, f'{key}.', source)


def validate_schema(opt, source):
    """Unknown keys and wrong types, for models and datasets that declare their schema."""
    model = _declared(MODEL_REGISTRY, opt.get('model_type'), 'TRAIN_KEYS')
    if model is None:
        return
    _check_keys(opt, model, source)
    _check_numbers(opt, model, source)
    _check_scheduler(opt, source)
    _check_datasets(opt, source)
    _check_network_choices(opt, source)
    _check_prior_shapes(opt, source)


def validate_options(opt, source):
    """Schema of our models' keys, the GPUs asked for, required keys, and that every data / checkpoint path
    exists."""
    validate_schema(opt, source)
    validate_devices(opt, source)
    validate_paths(opt, source)
