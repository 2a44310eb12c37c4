"""utils/allocator.py: glibc malloc keeps large blocks on the heap for our entry points, not for a plain import."""
import subprocess
import sys

import pytest

from tpdiff_plugin.utils import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None or not hasattr(allocator._glibc(), 'mallinfo2'),
                           reason='needs glibc >= 2.33 (mallinfo2)')

# Prints how many blocks are mmapped before and after a 40 MiB malloc (glibc's default threshold is <= 32 MiB).
PROBE = '''
import ctypes, sys
{setup}
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                                'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
before = libc.mallinfo2().hblks
p = libc.malloc(40 << 20)
print(libc.mallinfo2().hblks - before)
libc.free(ctypes.c_void_p(p))
'''


def mmapped_blocks(setup, **env):
    import os
    res = subprocess.run([sys.executable, '-c', PROBE.format(setup=setup)], capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith(('MALLOC_', 'TPDIFF_NO'))},
                              **env}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(res.stdout.split()[-1])


@glibc
def test_entry_points_keep_large_blocks_on_the_heap_and_a_plain_import_does_not():
    assert mmapped_blocks('') == 1  # glibc's default: a 40 MiB block gets its own mmap (page faults on reuse)
    assert mmapped_blocks('import tpdiff_plugin') == 1  # an import leaves the user's process alone
    assert mmapped_blocks('from tpdiff_plugin.cli import prepare_cpu; prepare_cpu()') == 0  # tpdiff, basicsr
    assert mmapped_blocks('from tpdiff_plugin.inference import Deblurrer; from torch import nn; '
                          'Deblurrer(nn.Identity())') == 0
    # the opt-out, and a user's own threshold, win
    assert mmapped_blocks('from tpdiff_plugin.cli import prepare_cpu; prepare_cpu()', TPDIFF_NO_MALLOPT='1') == 1
    assert mmapped_blocks('from tpdiff_plugin.cli import prepare_cpu; prepare_cpu()',
                          MALLOC_MMAP_THRESHOLD_='131072') == 1


def test_user_settings_are_read_from_the_env_variables_and_glibc_tunables():
    assert allocator.user_settings({}) == []
    assert allocator.user_settings({'MALLOC_TOP_PAD_': '0'}) == ['top_pad']
    env = {'GLIBC_TUNABLES': 'glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=2'}
    assert allocator.user_settings(env) == ['mmap_threshold', 'trim_threshold']


def test_opt_out_and_non_glibc_change_nothing(monkeypatch):
    monkeypatch.setitem(allocator._state, 'result', None)
    assert allocator.tune_malloc({'TPDIFF_NO_MALLOPT': '1'}) == 'malloc unchanged (TPDIFF_NO_MALLOPT is set)'
    monkeypatch.setitem(allocator._state, 'result', None)
    monkeypatch.setattr(allocator, '_glibc', lambda: None)
    assert allocator.tune_malloc({}) == 'malloc unchanged (not glibc)'
