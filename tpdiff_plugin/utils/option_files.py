"""Early checks of a BasicSR options file, so mistakes surface as one line naming the key.

Upstream parses the YAML deep inside ``parse_options`` and fails later still (a missing LMDB
is an ``lmdb.Error`` from a DataLoader worker). We read the file once up front and check what
can be checked without building anything: YAML syntax, required top-level keys, and that the
data and checkpoint paths named in it exist.

For the model types this plugin owns (``TPDiffModel``, ``UnpairedCycleModel``) the file is also checked
against a schema of known keys (top level, ``train``, ``val``, ``logger``, ``path`` and the options of
``UnpairedImageDataset``): an unknown key is a UserError suggesting the closest known one (a typo such
as ``netwrok_g`` or ``trian`` would otherwise be silently ignored by basicsr), and the numbers that must
be positive integers (``total_iter``, ``gt_size``, ...) or numbers (``lr``) are type-checked. Options of
other model types and of upstream datasets are left to basicsr.
"""
import difflib
import numbers
import os

import yaml

from tpdiff_plugin.utils.errors import UserError

REQUIRED_KEYS = ('name', 'model_type')
DATA_PATH_KEYS = ('dataroot_gt', 'dataroot_lq', 'dataroot_blur', 'dataroot_sharp', 'meta_info_file')


def load_options_file(path):
    """Parse ``path`` as YAML and return the mapping, or raise UserError naming the file (and line)."""
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.safe_load(f)
    except OSError as e:
        raise UserError(f'-opt: cannot read options file {path}: {e.strerror}') from None
    except yaml.YAMLError as e:
        where = ''
        mark = getattr(e, 'problem_mark', None)
        if mark is not None:
            where = f' (line {mark.line + 1}, column {mark.column + 1})'
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise UserError(f'{path}{where}: not valid YAML: {problem}') from None
    if not isinstance(opt, dict):
        raise UserError(f'{path}: expected a mapping of option keys at the top level, got {type(opt).__name__}')
    return opt


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
                from tpdiff_plugin.data.image_checks import check_lmdb_complete
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


OWN_MODELS = ('TPDiffModel', 'UnpairedCycleModel')
OWN_DATASETS = ('UnpairedImageDataset',)
TOP_KEYS = {'name', 'model_type', 'stage', 'num_gpu', 'scale', 'manual_seed', 'is_train', 'dist', 'rank',
            'world_size', 'auto_resume', 'datasets', 'path', 'train', 'val', 'logger', 'dist_params',
            'find_unused_parameters', 'use_static_graph', 'root_path', 'debug', 'suffix'}
NETWORK_LABELS = ('g', 'rb', 'tpe', 'd_sharp', 'd_blur', 'd_wave')
TRAIN_KEYS = {'optim_g', 'optim_d', 'scheduler', 'total_iter', 'warmup_iter', 'pool_size', 'gan_opt', 'cycle_opt',
              'wave_opt', 'diff_opt', 'ema_decay', 'joint_train', 'use_tpe', 'max_bad_iters', 'cycle_sharp_opt',
              'identity_opt', 'sharp_cycle_trains_rb', 'r1_weight', 'd_update_every', 'sharp_cycle_prior',
              'dm_target', 'gan_sharp_opt', 'sharp_cycle_noise'}
VAL_KEYS = {'val_freq', 'save_img', 'suffix', 'metrics', 'sample_seed', 'pbar', 'rgb2bgr', 'use_image'}
LOGGER_KEYS = {'print_freq', 'save_checkpoint_freq', 'use_tb_logger', 'wandb'}
PATH_KEYS = {'resume_state', 'ignore_resume_networks', 'root', 'experiments_root', 'models', 'training_states',
             'log', 'visualization', 'results_root', 'resume_optim_d'}
PATH_PREFIXES = ('pretrain_network_', 'strict_load_', 'param_key_')
UNPAIRED_DATASET_KEYS = {'name', 'type', 'phase', 'dataroot_blur', 'dataroot_sharp', 'io_backend', 'gt_size',
                         'patch_size', 'use_hflip', 'use_rot', 'mean', 'std', 'num_worker_per_gpu',
                         'batch_size_per_gpu', 'dataset_enlarge_ratio', 'prefetch_mode', 'pin_memory',
                         'persistent_workers', 'use_shuffle', 'num_prefetch_queue', 'scale'}
# (section, key, minimum): integers the models or basicsr's loop need, checked when present
POSITIVE_INTS = [('train', 'total_iter', 1), ('train', 'pool_size', 0), ('train', 'max_bad_iters', 1),
                 ('train', 'd_update_every', 1),
                 ('logger', 'print_freq', 1), ('logger', 'save_checkpoint_freq', 1), ('val', 'val_freq', 1),
                 ('', 'manual_seed', 0)]
DATASET_INTS = [('gt_size', 1), ('patch_size', 1), ('batch_size_per_gpu', 1), ('num_worker_per_gpu', 0),
                ('dataset_enlarge_ratio', 1)]


def _unknown(key, known, where, source):
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    hint = f'; did you mean "{close[0]}"?' if close else f' (known: {", ".join(sorted(known))})'
    raise UserError(f'{source}: unknown option "{where}{key}"{hint}')


def _check_int(value, option, minimum, source):
    integral_float = isinstance(value, float) and value.is_integer()  # `!!float 5e3` is common in basicsr files
    if isinstance(value, bool) or not (isinstance(value, int) or integral_float) or value < minimum:
        kind = 'a positive integer' if minimum >= 1 else 'an integer >= 0'
        raise UserError(f'{source}: {option} must be {kind}, got {value!r}')


def validate_schema(opt, source):
    """Unknown keys and wrong types for the plugin's own model types (see the module docstring)."""
    if opt.get('model_type') not in OWN_MODELS:
        return
    networks = {f'network_{x}' for x in NETWORK_LABELS}
    for key in opt:
        if key not in TOP_KEYS and not (isinstance(key, str) and key.startswith('network_')):
            _unknown(key, TOP_KEYS | networks, '', source)
    for key in opt:
        if isinstance(key, str) and key.startswith('network_') and key not in networks:
            _unknown(key, networks, '', source)
    sections = {'train': TRAIN_KEYS, 'val': VAL_KEYS, 'logger': LOGGER_KEYS}
    for section, known in sections.items():
        value = opt.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise UserError(f'{source}: option "{section}" must be a mapping, got {type(value).__name__}')
        for key in value:
            if key not in known:
                _unknown(key, known, f'{section}.', source)
    paths = opt.get('path') or {}
    for key in paths:
        if key not in PATH_KEYS and not (isinstance(key, str) and key.startswith(PATH_PREFIXES)):
            _unknown(key, PATH_KEYS | {f'pretrain_network_{x}' for x in NETWORK_LABELS}, 'path.', source)
    for section, key, minimum in POSITIVE_INTS:
        block = opt if not section else (opt.get(section) or {})
        if block.get(key) is not None:
            _check_int(block[key], f'{section + "." if section else ""}{key}', minimum, source)
    num_gpu = opt.get('num_gpu')
    if num_gpu is not None and num_gpu != 'auto':
        _check_int(num_gpu, 'num_gpu (or "auto")', 0, source)
    for option in ('optim_g', 'optim_d'):
        optim = (opt.get('train') or {}).get(option)
        if isinstance(optim, dict) and 'lr' in optim:
            lr = optim['lr']
            if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or lr < 0:
                hint = ' (YAML reads 2e-4 as text: write !!float 2e-4 or 0.0002)' if isinstance(lr, str) else ''
                raise UserError(f'{source}: train.{option}.lr must be a number >= 0, got {lr!r}{hint}')
    for phase, dopt in (opt.get('datasets') or {}).items():
        if not isinstance(dopt, dict) or dopt.get('type') not in OWN_DATASETS:
            continue
        for key in dopt:
            if key not in UNPAIRED_DATASET_KEYS:
                _unknown(key, UNPAIRED_DATASET_KEYS, f'datasets.{phase}.', source)
        for key, minimum in DATASET_INTS:
            if dopt.get(key) is not None:
                _check_int(dopt[key], f'datasets.{phase}.{key}', minimum, source)
    g, tpe = opt.get('network_g'), opt.get('network_tpe')
    if isinstance(g, dict) and isinstance(tpe, dict):
        for key in ('prior_scale', 'prior_ch'):
            if key in g and key in tpe and g[key] != tpe[key]:
                raise UserError(f'{source}: network_g.{key} ({g[key]}) and network_tpe.{key} ({tpe[key]}) differ; '
                                'the TPE makes the prior that network_g reads, so they must be equal')
    for label in ('g', 'tpe'):
        block = opt.get(f'network_{label}')
        if isinstance(block, dict) and block.get('prior_scale') is not None:
            _check_int(block['prior_scale'], f'network_{label}.prior_scale', 1, source)


def apply_force_yml(opt, entries, source):
    """Apply upstream's ``--force_yml KEY:SUB=VALUE`` overrides to ``opt`` (as ``parse_options`` does later).

    Like upstream, only existing keys can be set; a missing one is a UserError naming it.
    """
    from basicsr.utils.options import _postprocess_yml_value
    for entry in entries:
        if entry.count('=') != 1:
            raise UserError(f'--force_yml: expected KEY:SUBKEY=VALUE, got {entry!r}')
        keys, value = (part.strip() for part in entry.split('='))
        node, path = opt, keys.split(':')
        for depth, key in enumerate(path):
            if not isinstance(node, dict) or key not in node:
                raise UserError(f'--force_yml {entry}: {source} has no option "{":".join(path[:depth + 1])}" '
                                '(--force_yml can only change existing keys)')
            if depth == len(path) - 1:
                node[key] = _postprocess_yml_value(value)
            else:
                node = node[key]
    return opt


def validate_options(opt, source):
    """Schema of our models' keys, required keys, and that every data / checkpoint path exists."""
    validate_schema(opt, source)
    validate_paths(opt, source)


def validate_options_file(path):
    """Load and validate ``path``; returns the parsed mapping."""
    opt = load_options_file(path)
    validate_options(opt, path)
    return opt
