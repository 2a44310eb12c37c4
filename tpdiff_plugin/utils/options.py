"""Early checks of a BasicSR options file, so mistakes surface as one line naming the key.

Upstream parses the YAML deep inside ``parse_options`` and fails later still (a missing LMDB
is an ``lmdb.Error`` from a DataLoader worker). We read the file once up front and check what
can be checked without building anything: YAML syntax, required top-level keys, and that the
data and checkpoint paths named in it exist.
"""
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


def validate_options(opt, source):
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
    paths = opt.get('path') or {}
    if isinstance(paths, dict):
        for key, value in paths.items():
            if key.startswith('pretrain_network') and isinstance(value, str) and not os.path.isfile(value):
                raise UserError(f'{source}: path.{key}: no such checkpoint: {value}')


def validate_options_file(path):
    """Load and validate ``path``; returns the parsed mapping."""
    opt = load_options_file(path)
    validate_options(opt, path)
    return opt
