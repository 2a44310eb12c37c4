"""glibc malloc settings for CPU inference and training: keep freed memory instead of page-faulting it back.

With glibc's defaults, a block above the mmap threshold (128 KiB, rising to at most 32 MiB as blocks are
freed) gets its own ``mmap`` and is unmapped on ``free``, and the heap is trimmed when 128 KiB are free at its
top. A paper-size TP-Diff forward allocates and frees activations of tens of MiB in every layer, so every one
of them is faulted in page by page again: measured, a 256x256 forward spent more system time than user time
(issue 10; numbers in docs/performance.md). :func:`tune_malloc` sets, through ``mallopt``:

- ``M_MMAP_THRESHOLD`` = 1 GiB: blocks below it come from the heap (a single block of 1 GiB or more, e.g. a
  4K image buffer, is still mapped and given back on free);
- ``M_TRIM_THRESHOLD`` = ``TRIM_THRESHOLD`` (2047 MiB, about the most a C ``int`` takes): freed memory at the
  top of the heap is kept, so the next forward reuses it without faults. With 1 GiB (the first value shipped)
  the heap was trimmed and faulted in again in every 512-px tile of a 3840x2160 paper-size deblur:
  system time 0.12x user time there, against 0.01x with 2047 MiB (bench/README.md, issue 10);
- ``M_TOP_PAD`` = 1 GiB: the heap grows in large steps.

The price is memory: blocks freed inside the heap stay resident and leave holes, so a tile's peak RSS is
0.6-1.5 GiB above glibc's defaults (3.5-4.5 GiB instead of 2.9 GiB for a 512-px paper-size tile); settings
that map the large blocks again (thresholds of 64-512 MiB) or trim between tiles lower it by 0.1-0.4 GiB
for 0.07-0.5x the user time in page faults (measured, bench/README.md).

The process keeps its peak heap instead of returning it to the system (see docs/performance.md for what
each entry point does and why a plain ``import tpdiff_plugin`` does not call this). Nothing is changed:

- off Linux/glibc (macOS, Windows, musl);
- with ``TPDIFF_NO_MALLOPT=1`` in the environment (the opt-out);
- for each parameter the user set already, as ``MALLOC_<NAME>_`` or in ``GLIBC_TUNABLES`` (theirs wins).

``mallopt`` after start-up does what the ``MALLOC_*_`` variables do at start-up (glibc applies those through the
same setter); only memory allocated before the call keeps its old placement.
"""
import ctypes
import os
import sys

OPT_OUT_ENV = 'TPDIFF_NO_MALLOPT'
GIB = 1 << 30
TRIM_THRESHOLD = 2047 << 20  # mallopt's value is a C int: 2 GiB does not fit
# glibc's <malloc.h> codes; mallopt's value is a C int. name: (code, value, env variable, GLIBC_TUNABLES name)
SETTINGS = {
    'mmap_threshold': (-3, GIB, 'MALLOC_MMAP_THRESHOLD_', 'glibc.malloc.mmap_threshold'),
    'trim_threshold': (-1, TRIM_THRESHOLD, 'MALLOC_TRIM_THRESHOLD_', 'glibc.malloc.trim_threshold'),
    'top_pad': (-2, GIB, 'MALLOC_TOP_PAD_', 'glibc.malloc.top_pad'),
}

_state = {'result': None}


def _glibc():
    """The process's C library if it is glibc (it has ``gnu_get_libc_version`` and ``mallopt``), else None."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (an AttributeError off glibc)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def user_settings(environ=None):
    """The parameters of :data:`SETTINGS` the user chose already (env variable or ``GLIBC_TUNABLES``)."""
    environ = os.environ if environ is None else environ
    tunables = environ.get('GLIBC_TUNABLES', '')
    return [name for name, (_, _, env, tunable) in SETTINGS.items() if env in environ or f'{tunable}=' in tunables]


def tune_malloc(environ=None):
    """Apply the settings once per process; return one line saying what was done (for logs and bench headers)."""
    if _state['result'] is not None:
        return _state['result']
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT_ENV, '') not in ('', '0'):
        result = f'malloc unchanged ({OPT_OUT_ENV} is set)'
    elif (libc := _glibc()) is None:
        result = 'malloc unchanged (not glibc)'
    else:
        kept = user_settings(environ)
        done = []
        for name, (code, value, _, _) in SETTINGS.items():
            if name not in kept and libc.mallopt(code, value) == 1:
                done.append(f'{name}={value >> 20} MiB')
        result = 'mallopt ' + (', '.join(done) or 'none')
        if kept:
            result += f' (kept the user\'s {", ".join(kept)})'
    _state['result'] = result
    return result
