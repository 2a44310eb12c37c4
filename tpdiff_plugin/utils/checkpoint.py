"""The one place checkpoints are read, picked apart, fitted to a network and written.

Every ``.pth`` / ``.state`` the plugin touches goes through here: basicsr's ``BaseModel.load_network`` /
``save_network`` / ``save_training_state`` (mended in ``compat.py`` to call these), the models' own
``load_network``, ``--auto_resume``, ``path.resume_optim_d`` and ``tpdiff deblur`` / ``Deblurrer``.

- Reading uses ``torch.load(weights_only=True)``: a file that would run code when unpickled is refused,
  and any unreadable file is one ``UserError`` line naming it and the option it came from.
- Writing is atomic (temporary file in the same folder, fsync, rename, fsync of the folder), so a kill at
  any moment leaves either the old file or the complete new one. torch has no atomic save of its own.

A network checkpoint we write is basicsr's ``{param_key: state dict}`` (``params``, and ``params_ema`` for
an EMA copy) plus two entries, so that the file says which network it holds:

- ``network_opt``: the options block the network was built from (e.g. the model's ``network_g``), as
  plain YAML types (dict, list, str, int, float, bool, None). Omitted when the model has no matching
  ``network_*`` block. Read it back with :func:`network_options`.
- ``tpdiff_version``: the plugin version that wrote the file (``tpdiff_plugin/version.py``).

Upstream basicsr indexes the file with its ``param_key`` and never sees the two extra entries, and both
load with ``weights_only=True``.

Test hook (tests only): with ``TPDIFF_TEST_KILL_DURING_SAVE=<file name>`` in the environment,
:func:`atomic_torch_save` SIGKILLs its own process after writing that file's temporary copy and before
the rename, i.e. in the middle of a save (``tests/test_crash_resume.py``).
"""
import contextlib
import errno
import glob
import logging
import numbers
import os
import signal
from collections.abc import Mapping

import numpy as np
import torch

from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.version import __version__

NETWORK_OPT_KEY = 'network_opt'  # the network's options block, stored next to its params
VERSION_KEY = 'tpdiff_version'  # the plugin version that wrote the checkpoint

# basicsr's logger name: get_root_logger() is logging.getLogger('basicsr') with basicsr's handlers
logger = logging.getLogger('basicsr')


# ---------------------------------------------------------------------------------------------- read
def read_checkpoint(path, what, map_location='cpu'):
    """``torch.load(path, weights_only=True)``; an unreadable or unsafe file is a one-line UserError.

    ``what`` names the option or flag the path came from (e.g. ``'--weights'``), for the message."""
    path = os.fspath(path)
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


def describe_keys(keys, limit=3):
    """``'a, b, c (+2 more)'``: a few names for a one-line message (a name with a line break or another
    unprintable character is shown as its repr)."""
    keys = [k if k.isprintable() else repr(k) for k in sorted(map(str, keys))]
    more = f' (+{len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def _is_state_dict(value):
    return isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())


def pick_params(ckpt, path, param_key=None, fallback_to_params=False):
    """The state dict inside a basicsr network checkpoint, and the key it was under.

    ``param_key`` None: ``params_ema`` if present, else ``params``, else the file itself when it is a bare
    state dict (key None). A named ``param_key`` must be present, except that with ``fallback_to_params``
    a missing one falls back to ``params`` (basicsr's rule for ``param_key_g: params_ema``), with a log line.
    ``module.`` prefixes (DDP) are dropped. Anything else (non-tensor values, keys that are not names, meta,
    sparse or quantized tensors) is a one-line UserError naming ``path``.
    """
    if not isinstance(ckpt, dict):
        raise UserError(f'{path}: not a basicsr checkpoint (a dict of state dicts), got {type(ckpt).__name__}')
    if param_key is None:
        key = next((k for k in ('params_ema', 'params') if k in ckpt), None)
    else:
        key = param_key
        if key not in ckpt and fallback_to_params and 'params' in ckpt:
            logger.info(f'Loading: {key} does not exist in {path}, use params.')
            key = 'params'
        if key not in ckpt:
            raise UserError(f'{path}: no "{key}" entry (has: {describe_keys(ckpt, 5)})')
    state = ckpt[key] if key is not None else ckpt
    if not _is_state_dict(state):
        raise UserError(f'{path}: no "params_ema" or "params" state dict inside '
                        f'(has: {describe_keys(ckpt, 5)}); is it a basicsr network checkpoint?')
    odd = [k for k in state if not isinstance(k, str)]
    if odd:
        raise UserError(f'{path}: the state dict has a key that is not a name ({odd[0]!r}, a {type(odd[0]).__name__}); '
                        'is it a basicsr network checkpoint?')
    for name, value in state.items():  # torch loads these (weights_only too) but cannot copy them into a network
        if value.is_meta or value.is_quantized or value.layout != torch.strided:
            kind = 'a meta tensor (no values)' if value.is_meta else 'quantized' if value.is_quantized else \
                f'a {str(value.layout).replace("torch.", "")} tensor'
            raise UserError(f'{path}: tensor {describe_keys([name])} is {kind}, not a plain dense tensor; save the '
                            "network's state_dict() as it is")
    return {(k[7:] if k.startswith('module.') else k): v for k, v in state.items()}, key


def network_options(ckpt, path):
    """The network options block stored in a checkpoint read by :func:`read_checkpoint` (a mapping with a
    ``type``, as in an options file's ``network_g``), or None for a checkpoint saved without one (before
    checkpoints carried them, or not by this plugin). A stored entry that is not such a block is a one-line
    UserError naming ``path``."""
    if not isinstance(ckpt, dict) or NETWORK_OPT_KEY not in ckpt:
        return None
    block = ckpt[NETWORK_OPT_KEY]
    if not isinstance(block, dict) or not isinstance(block.get('type'), str):
        raise UserError(f'{path}: the stored "{NETWORK_OPT_KEY}" is not a network options block (a mapping with '
                        f'a "type"), got {type(block).__name__}; pass the network options explicitly')
    return block


def check_finite(state, path):
    """A one-line UserError naming the first tensor of ``state`` that holds NaN or Inf (a diverged or corrupted
    checkpoint would otherwise load and make images of NaN)."""
    for name, value in state.items():
        if (value.is_floating_point() or value.is_complex()) and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise UserError(f'{path}: tensor {describe_keys([name])} holds {bad} NaN/Inf value(s); the checkpoint is '
                            'unusable (a diverged run or a corrupted file): load an earlier one')


def _misfit(own, state):
    """``(missing, unexpected, mis-shaped)`` keys of ``state`` against the network's own state dict."""
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    return missing, unexpected, shapes


def check_fit(net, state, path, hint):
    """A one-line UserError when ``state`` does not fit ``net`` exactly: a few missing / unexpected keys and
    the first mis-shaped one. ``hint`` ends the message (what the user should check)."""
    own = net.state_dict()
    missing, unexpected, shapes = _misfit(own, state)
    parts = []
    if missing:
        parts.append(f'missing keys: {describe_keys(missing)}')
    if unexpected:
        parts.append(f'unexpected keys: {describe_keys(unexpected)}')
    if shapes:
        k = shapes[0]
        parts.append(f'{len(shapes)} shape mismatch(es), e.g. {describe_keys([k])}: checkpoint '
                     f'{tuple(state[k].shape)} vs network {tuple(own[k].shape)}')
    if parts:
        raise UserError(f'{path}: does not fit {type(net).__name__} as configured ({"; ".join(parts)}); {hint}')


def load_network_file(net, path, what, param_key=None, strict=True, fallback_to_params=False,
                      hint='check the network options', ckpt=None):
    """Read ``path``, pick its state dict (:func:`pick_params`), refuse non-finite values and load it into ``net``.

    ``strict``: the state must fit ``net`` exactly (else a UserError, see :func:`check_fit`); non-strict
    loading keeps torch's rules (matching names only) and logs what was left out. ``ckpt``: the checkpoint
    already read from ``path`` (it is then not read again). Returns the key used."""
    if ckpt is None:
        ckpt = read_checkpoint(path, what)
    state, key = pick_params(ckpt, path, param_key, fallback_to_params)
    check_finite(state, path)
    logger.info(f'Loading {type(net).__name__} model from {path}, with param key: [{key}].')
    if strict:
        check_fit(net, state, path, hint)
    else:
        missing, unexpected, shapes = _misfit(net.state_dict(), state)
        skipped = sorted(missing | unexpected) + shapes
        if skipped:
            logger.warning(f'Loading {path} non-strictly: left out {describe_keys(skipped)}')
        state = {k: v for k, v in state.items() if k not in unexpected and k not in shapes}
    net.load_state_dict(state, strict=strict)
    return key


# ---------------------------------------------------------------------------------------------- write
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

    A crash at any moment leaves either the old file or the complete new one, never a torn file. A full
    disk is a one-line UserError and the previous file stays.
    """
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
            raise UserError(f'cannot write {path}: {os.strerror(disk.errno)}; nothing was replaced (the previous '
                            'checkpoint is intact). Free some space, then continue with --auto_resume') from None
        raise
    # temporary copies of this file left by a process killed mid-save
    for stale in glob.glob(os.path.join(glob.escape(folder), f'.{glob.escape(os.path.basename(path))}.tmp*')):
        with contextlib.suppress(OSError):  # best effort: another process may have removed it
            os.remove(stale)
    with contextlib.suppress(OSError):  # make the rename itself durable, where the file system allows it
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def plain_options(value):
    """A copy of an options value in plain YAML types (dict, list, str, int, float, bool, None), which
    ``torch.load(weights_only=True)`` reads back: ``OrderedDict`` becomes dict, tuples lists, numpy scalars
    Python numbers. Anything else is a TypeError."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f'option key {bad[0]!r} is not a name')
        return {k: plain_options(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_options(v) for v in value]
    raise TypeError(f'{type(value).__name__} is not an options value')


def save_networks(nets, param_keys, path, network_opt=None):
    """Write basicsr's network checkpoint ``{param_key: state dict}`` for bare ``nets`` atomically (tensors on
    the CPU, no ``module.`` prefix), with the plugin version and ``network_opt`` (the options block the
    networks were built from, if given; see the module docstring)."""
    save_dict = {}
    for net, key in zip(nets, param_keys):
        state = net.state_dict()
        save_dict[key] = {(k[7:] if k.startswith('module.') else k): v.cpu() for k, v in state.items()}
    if network_opt is not None:
        try:
            save_dict[NETWORK_OPT_KEY] = plain_options(network_opt)
        except TypeError as e:  # a block built in code with odd values: the weights still matter more
            logger.warning(f'{path}: network options not stored in the checkpoint ({e})')
    save_dict[VERSION_KEY] = __version__
    atomic_torch_save(save_dict, path)
