"""utils/allocator.py: glibc malloc keeps large blocks and freed memory on the heap for our entry points, not for a
plain import."""
import subprocess
import sys

import pytest

from tpdiff_plugin.utils import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None or not hasattr(allocator._glibc(), 'mallinfo2'),
                           reason='needs glibc >= 2.33 (mallinfo2)')

HEADER = '''
import ctypes, sys
{setup}
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                                'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
'''
# Prints, for each size in {mibs} MiB, how many blocks a malloc of that size mmaps (glibc's default threshold is
# <= 32 MiB).
PROBE = HEADER + '''
for mib in {mibs}:
    before = libc.mallinfo2().hblks
    p = libc.malloc(mib << 20)
    print(libc.mallinfo2().hblks - before)
    libc.free(ctypes.c_void_p(p))
'''
# Three 500 MiB blocks (below the 1 GiB mmap threshold: on the heap; never written, so no RSS), freed from the
# top down: prints the heap's size in MiB afterwards (1.5 GiB stays unless the heap was trimmed).
HEAP = HEADER + '''
blocks = [libc.malloc(500 << 20) for _ in range(3)]
for p in reversed(blocks):
    libc.free(ctypes.c_void_p(p))
print(libc.mallinfo2().arena >> 20)
'''


def run_probe(code, env):
    import os
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith(('MALLOC_', 'TPDIFF_NO'))},
                              **env}, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.split()


def mmapped_blocks(setup, mibs=(40,), **env):
    counts = [int(n) for n in run_probe(PROBE.format(setup=setup, mibs=list(mibs)), env)[-len(mibs):]]
    return counts[0] if len(counts) == 1 else counts


@glibc
def test_entry_points_keep_large_blocks_on_the_heap_and_a_plain_import_does_not():
    assert mmapped_blocks('') == 1  # glibc's default: a 40 MiB block gets its own mmap (page faults on reuse)
    assert mmapped_blocks('import tpdiff_plugin') == 1  # an import leaves the user's process alone
    # tpdiff, basicsr: blocks under 1 GiB stay on the heap. A 512x512 tile of the paper-size net allocates ~566 MiB
    # sampling buffers; a 512 MiB threshold mapped them again and cost 0.22x the user time in page faults
    # (bench/README.md, issue 10)
    assert mmapped_blocks('from tpdiff_plugin.cli import prepare_cpu; prepare_cpu()', mibs=(40, 600, 1100)) == [0, 0, 1]
    assert mmapped_blocks('from tpdiff_plugin.inference import Deblurrer; from torch import nn; '
                          'Deblurrer(nn.Identity())') == 0
    # the opt-out, and a user's own threshold, win
    assert mmapped_blocks('from tpdiff_plugin.cli import prepare_cpu; prepare_cpu()', TPDIFF_NO_MALLOPT='1') == 1
    assert mmapped_blocks('from tpdiff_plugin.cli import prepare_cpu; prepare_cpu()',
                          MALLOC_MMAP_THRESHOLD_='131072') == 1


@glibc
def test_freed_memory_up_to_2047_mib_stays_on_the_heap_top():
    # 1 GiB (the first value) let the heap be trimmed and faulted in again in every tile of a 4K paper-size
    # deblur: sys 0.12x user time against 0.01x (bench/README.md, issue 10)
    setup = 'from tpdiff_plugin.cli import prepare_cpu; prepare_cpu()'
    assert int(run_probe(HEAP.format(setup=setup), {})[-1]) >= 1500
    assert int(run_probe(HEAP.format(setup=setup), {'MALLOC_TRIM_THRESHOLD_': str(1 << 30)})[-1]) < 1500  # the user's
    assert allocator.TRIM_THRESHOLD == 2047 << 20 < 2 ** 31  # mallopt takes a C int


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
