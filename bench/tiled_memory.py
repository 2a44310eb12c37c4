"""Time and memory of a tiled CPU deblur under glibc malloc settings, one fresh process per setting (issue 10).

    .venv/bin/python bench/tiled_memory.py [--net demo|paper] [--size 2160x3840] [--tile 512] [--threads 2]
                                           [--settings defaults,tune_malloc,...] [--rounds 1]

Each setting runs in its own child process (so no setting leaks into another): the network of ``--net``
(``options/demo/stage2.yml``'s ``network_g`` or the paper-size ``TPDiffNet``, random weights), a CPU
``Deblurrer(tile=--tile, tile_overlap=32)`` (``tpdiff deblur``'s tiling path, channels_last as on CPU), and one
smooth random ``HxWx3`` uint8 image deblurred with ``deblur_array`` (``image_to_tensor`` -> tiles ->
``tensor_to_image``, as ``tpdiff deblur`` does between reading and writing the file). The child reports the
deblur's wall, user and system seconds (``getrusage`` around the call), its RSS before the deblur (torch, the
network, the image), the process's peak RSS (``VmHWM``) at the end and after the first tile, and a hash of the
output, which must be the same under every setting. A setting is environment variables for the child (glibc
reads ``MALLOC_*_`` at start-up; ``tune_malloc`` leaves a parameter the user set alone) and what happens after
each tile: nothing (as the Deblurrer does) or ``malloc_trim(pad)`` (through the ``progress`` callback). Rounds interleave the settings. Results and the settings' story: bench/README.md (issue 10).
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MIB = 1 << 20


def _env(mmap, trim, pad, **extra):
    """glibc's start-up variables for an mmap threshold, trim threshold and top pad in MiB."""
    return {'MALLOC_MMAP_THRESHOLD_': str(mmap * MIB), 'MALLOC_TRIM_THRESHOLD_': str(trim * MIB),
            'MALLOC_TOP_PAD_': str(pad * MIB), **extra}


# name: (environment for the child, malloc_trim after each tile, description). The trim: None (none, as the
# Deblurrer does) or the pad in bytes.
SETTINGS = {
    'defaults': ({'TPDIFF_NO_MALLOPT': '1'}, None, 'glibc defaults (TPDIFF_NO_MALLOPT=1)'),
    'tune_malloc': ({}, None, 'tune_malloc() and the Deblurrer as in this checkout'),
    '1g': (_env(1024, 1024, 1024), None, 'mmap 1 GiB, trim 1 GiB, top pad 1 GiB (tune_malloc before 2026-11-27 pm)'),
    'trim2g': (_env(1024, 2047, 1024), None, 'mmap 1 GiB, trim 2047 MiB (the most mallopt takes), top pad 1 GiB'),
    '1g_trim': (_env(1024, 1024, 1024), 0, 'the same + malloc_trim(0) after each tile'),
    '1g_trim1g': (_env(1024, 1024, 1024), 1024 * MIB,
                  'the same + malloc_trim(1 GiB) after each tile (frees the holes, keeps 1 GiB on top)'),
    '1g_trim_arena1': (_env(1024, 1024, 1024, MALLOC_ARENA_MAX='1'), 0,
                       'the same + malloc_trim(0) after each tile + MALLOC_ARENA_MAX=1'),
    'mmap512_1g': (_env(512, 1024, 1024), None, 'mmap 512 MiB, trim 1 GiB, top pad 1 GiB'),
    'mmap512_1g_trim': (_env(512, 1024, 1024), 0, 'the same + malloc_trim(0) after each tile'),
    'mmap512_1g_trim1g': (_env(512, 1024, 1024), 1024 * MIB, 'the same + malloc_trim(1 GiB) after each tile'),
    'mmap512': (_env(512, 256, 64), None, 'mmap 512 MiB, trim 256 MiB, top pad 64 MiB'),
    'mmap512_trim': (_env(512, 256, 64), 0, 'the same + malloc_trim(0) after each tile'),
    'mmap256': (_env(256, 256, 64), None, 'mmap 256 MiB, trim 256 MiB, top pad 64 MiB'),
    'mmap64': (_env(64, 128, 64), None, 'mmap 64 MiB, trim 128 MiB, top pad 64 MiB'),
    'hugetlb': ({'TPDIFF_NO_MALLOPT': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, None,
                'glibc defaults + GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (THP for malloc; start-up only)'),
}

CHILD = r'''
import ctypes, hashlib, json, os, resource, sys, time
import numpy as np
import torch
torch.set_num_threads(int(sys.argv[1]))
sys.path.insert(0, sys.argv[6])
from tpdiff_plugin.inference import Deblurrer, build_restorer
from tpdiff_plugin.utils.allocator import tune_malloc
from tpdiff_plugin.utils.measure import _proc_status_kib
from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
net_name, (h, w), tile = sys.argv[2], map(int, sys.argv[3].split('x')), int(sys.argv[4])
trim = int(sys.argv[5]) if sys.argv[5] != 'none' else -1

def rss(field):
    return _proc_status_kib(field) / 1024

torch.manual_seed(0)
net = TPDiffNet() if net_name == 'paper' else build_restorer(os.path.join(sys.argv[6], 'options/demo/stage2.yml'))
deblurrer = Deblurrer(net, device='cpu', tile=tile, tile_overlap=32)  # calls tune_malloc() as tpdiff deblur does
note = tune_malloc()
rng = np.random.default_rng(0)
import cv2
img = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
libc = ctypes.CDLL(None)
tiles = []

hwm = []

def progress(done, total):
    tiles.append(total)
    hwm.append(round(rss('VmHWM')))
    if trim >= 0:
        libc.malloc_trim(ctypes.c_size_t(trim))

from tpdiff_plugin.inference import image_to_tensor, tensor_to_image
base = rss('VmRSS')
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
x, info = image_to_tensor(img)
out = tensor_to_image(deblurrer(x, progress=progress), info)
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({'wall': wall, 'user': r1.ru_utime - r0.ru_utime, 'sys': r1.ru_stime - r0.ru_stime,
                  'base_mib': base, 'peak_mib': rss('VmHWM'), 'hwm_per_tile_mib': hwm or [rss('VmHWM')],
                  'tiles': tiles[-1] if tiles else 1,
                  'malloc': note, 'hash': hashlib.sha1(out.tobytes()).hexdigest()[:12]}))
'''


def run_setting(name, args):
    env_extra, trim, _ = SETTINGS[name]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('MALLOC_') and k not in ('TPDIFF_NO_MALLOPT', 'GLIBC_TUNABLES')}
    env.update(env_extra, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY='PASSIVE')
    cmd = [sys.executable, '-c', CHILD, str(args.threads), args.net, args.size, str(args.tile),
           'none' if trim is None else str(trim), REPO]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {'error': (res.stderr.strip().splitlines() or ['failed'])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--net', default='demo', choices=('demo', 'paper'))
    p.add_argument('--size', default='2160x3840', metavar='HxW', help='image height x width (default: 3840x2160)')
    p.add_argument('--tile', type=int, default=512)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--settings', default='defaults,tune_malloc', help=f'comma-separated, of: {", ".join(SETTINGS)}')
    p.add_argument('--rounds', type=int, default=1, help='interleaved rounds over the settings')
    p.add_argument('--json', default=None, metavar='OUT', help='also write the results as JSON')
    args = p.parse_args(argv)
    names = [n.strip() for n in args.settings.split(',') if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f'--settings: unknown {", ".join(unknown)}; known: {", ".join(SETTINGS)}')
    print(f'tiled deblur: {args.net} network, {args.size} (HxW) uint8, tile {args.tile} overlap 32, '
          f'{args.threads} thread(s), one fresh process per setting and round', flush=True)
    print(f'{"setting":<20} | {"wall s":>7} | {"user s":>7} | {"sys s":>6} | {"sys/user":>8} | {"base GiB":>8} | '
          f'{"peak GiB":>8} | {"tile 1":>6} | tiles | output | malloc')
    print('-' * 120, flush=True)
    results = []
    for r in range(args.rounds):
        for name in names:
            res = run_setting(name, args)
            results.append({'setting': name, 'round': r + 1, **res})
            if 'error' in res:
                print(f'{name:<20} | failed: {res["error"]}', flush=True)
                continue
            print(f'{name:<20} | {res["wall"]:7.1f} | {res["user"]:7.1f} | {res["sys"]:6.2f} | '
                  f'{res["sys"] / max(res["user"], 1e-9):8.3f} | {res["base_mib"] / 1024:8.2f} | '
                  f'{res["peak_mib"] / 1024:8.2f} | {res["hwm_per_tile_mib"][0] / 1024:6.2f} | {res["tiles"]:5d} | '
                  f'{res["hash"]} | {res["malloc"]}', flush=True)
    for name in names:
        print(f'  {name}: {SETTINGS[name][2]}')
    hashes = {r['hash'] for r in results if 'hash' in r}
    print(f'outputs: {"identical" if len(hashes) == 1 else "DIFFER: " + ", ".join(sorted(hashes))} across settings')
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({'args': vars(args), 'results': results}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
