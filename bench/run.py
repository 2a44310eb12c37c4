"""TP-Diff benchmarks, measured side by side in one run (``make bench``; see bench/README.md).

    .venv/bin/python bench/run.py [--device cpu|cuda] [--quick] [--size HxW] [--repeats N] [--json OUT]

Rows (medians over interleaved repeats; machines are noisy, so only ratios from one run mean anything):
- inference of TP-Diff (paper size, 11.76M) vs Restormer and NAFNet-GoPro (spandrel, random weights, their
  published configurations) at one size: 256x256 by default on CPU (a 1280x720 Restormer forward takes
  minutes there), 1280x720 on CUDA, 64x64 with --quick; and the time and parameter ratios;
- the DM's sampling (E_c + all T denoiser steps) as a share of TP-Diff's inference time, the DM timed as its
  own call on the same padded input, interleaved with the rest;
- TP-Diff's achieved GFLOP/s (2 x MACs from mmengine's counter / time) against a dense matmul on the same
  machine (fp32 on CPU; bf16 on CUDA, the precision the networks run in there);
- FM-MSA's deformable filter at 32x256x256: torchvision.ops.deform_conv2d against the grid_sample form
  (``deform_filter(impl='auto')`` uses grid_sample on CPU and torchvision on CUDA);
- peak memory of one tile of the paper-size network, at ``tpdiff deblur``'s default tile for the device (CPU 384,
  GPU 512; CPU: RSS high-water mark of a fresh process) and the estimate for a 3840x2160 photo deblurred with
  such tiles (tile peak + image-sized buffers);
- one stage-2 training iteration of ``options/demo/stage2.yml`` (TPDiffModel built in-process with basicsr's
  ``build_model``, tiny synthetic data), split into data, G and D time; with ``--amp bf16`` the same iteration
  again under ``train.amp: bf16`` (extra rows: its G and D time and the fp32 / bf16 ratio of G + D).

CUDA runs use bf16 autocast and channels_last; ``--compile`` adds torch.compile (guarded: a network that
fails to compile runs eager, and the table says so). ``--deblur-4k`` also deblurs a synthetic 3840x2160
image with the paper-size network, tiled, and reports its time and peak RSS (CPU: tens of minutes).
"""
import argparse
import json
import math
import os
import platform
import sys
import time

# Before torch loads OpenMP: idle OpenMP threads yield instead of spinning. On a shared 2-core machine the
# spinning threads of two processes slowed small ops ~100x (measured; see bench/README.md).
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

ROW_NAMES = (
    'TP-Diff inference', 'Restormer inference', 'NAFNet-GoPro inference',
    'TP-Diff / Restormer time', 'TP-Diff / NAFNet-GoPro time', 'TP-Diff / Restormer params',
    'DM sampling share of TP-Diff', 'TP-Diff achieved throughput', 'dense matmul throughput',
    'TP-Diff / matmul throughput', 'deform filter torchvision', 'deform filter grid_sample',
    'torchvision / grid_sample time', 'deform filter gather', 'grid_sample / gather time', 'peak memory, one tile',
    'est. peak memory, 3840x2160 tiled',
)
TRAIN_ROW_NAMES = ('stage-2 train iter: data', 'stage-2 train iter: G', 'stage-2 train iter: D')
ROW_NAMES += TRAIN_ROW_NAMES
# added after the stage-2 rows by --amp bf16
AMP_ROW_NAMES = ('stage-2 train iter bf16: G', 'stage-2 train iter bf16: D', 'stage-2 train iter G+D fp32 / bf16')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--quick', action='store_true', help='small sizes, one repeat: about a minute on CPU')
    p.add_argument('--size', default=None, metavar='HxW',
                   help='inference size, height x width (default: 256x256 on CPU, 720x1280 = a 1280x720 frame on CUDA, '
                        '64x64 with --quick)')
    p.add_argument('--repeats', type=int, default=None, help='interleaved repeats (default 3; 1 with --quick)')
    p.add_argument('--threads', type=int, default=None, help='torch intra-op threads (default: torch\'s)')
    p.add_argument('--compile', action='store_true', help='CUDA: torch.compile the networks (guarded)')
    p.add_argument('--channels-last', action='store_true',
                   help='CPU: every network and input in channels_last (as Deblurrer runs TP-Diff on CPU; always on CUDA)')
    p.add_argument('--no-memory', action='store_true', help='skip the one-tile memory probe')
    p.add_argument('--no-train', action='store_true', help='skip the stage-2 training iteration')
    p.add_argument('--amp', default='none', choices=('none', 'bf16'),
                   help='also time the stage-2 training iteration under train.amp: bf16 (extra rows after fp32\'s)')
    p.add_argument('--deblur-4k', action='store_true', help='also deblur a 3840x2160 image, tiled (slow on CPU)')
    p.add_argument('--profile', action='store_true',
                   help='add rows: each component\'s and U-Net level\'s share of TP-Diff\'s forward (bench/components.py)')
    p.add_argument('--json', default=None, metavar='OUT', help='also write the rows as JSON')
    return p.parse_args(argv)


class Table:
    def __init__(self):
        self.rows = []

    def add(self, name, value, unit, note=''):
        self.rows.append({'row': name, 'value': value, 'unit': unit, 'note': note})

    def skip(self, name, unit, note):
        self.add(name, None, unit, note)

    def print(self):
        print(f'{"row":<36} | {"value":>10} | {"unit":<8} | note')
        print('-' * 100)
        for r in self.rows:
            v = r['value']
            if v is None:
                text = 'skipped'
            elif abs(v) >= 100:
                text = f'{v:.1f}'
            elif abs(v) >= 1:
                text = f'{v:.3f}'
            else:
                text = f'{v:.4f}'
            print(f'{r["row"]:<36} | {text:>10} | {r["unit"]:<8} | {r["note"]}', flush=True)


def skip_training_rows(table, amp, why):
    """The stage-2 rows (and ``--amp bf16``'s) as skipped, with the units their values would have."""
    for n in TRAIN_ROW_NAMES + (AMP_ROW_NAMES if amp == 'bf16' else ()):
        table.skip(n, 'x' if n == AMP_ROW_NAMES[-1] else 'ms', why)


def log(msg):
    print(f'[bench] {msg}', file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    import torch
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA device here')
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    repeats = args.repeats or (1 if args.quick else 3)
    import benchlib
    from benchlib import interleaved, median

    import tpdiff_plugin  # noqa: F401  (registers everything)
    from tpdiff_plugin.utils.allocator import tune_malloc
    malloc_note = tune_malloc()  # as our entry points do; one process, so every network below runs under it
    from basicsr.archs import build_network
    from tpdiff_plugin.archs.adaptive_filter import deform_filter
    from tpdiff_plugin.archs.peers_arch import PUBLISHED_CONFIGS
    from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
    from tpdiff_plugin.tools.deblur import DEFAULT_TILE
    from tpdiff_plugin.utils.errors import UserError
    from tpdiff_plugin.utils.measure import PeakMemory, count_macs, parse_size
    import logging
    try:
        size = parse_size(args.size) if args.size else (64, 64) if args.quick else (720, 1280) if cuda else (256, 256)
    except UserError as e:
        raise SystemExit(str(e)) from None
    logging.getLogger('basicsr').setLevel(logging.WARNING)

    cpu_name = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
                    platform.processor()) if os.path.exists('/proc/cpuinfo') else platform.processor()
    where = torch.cuda.get_device_name(device) if cuda else f'{cpu_name}, {torch.get_num_threads()} threads'
    print(f'bench: device {args.device} ({where}), torch {torch.__version__}, inference at {size[0]}x{size[1]} (HxW)'
          f'{" [--quick]" if args.quick else ""}, {repeats} interleaved repeat(s), medians; random weights')
    print(f'allocator: {malloc_note} (set once for this process: every network is measured under it; '
          f'TPDIFF_NO_MALLOPT=1 to measure glibc\'s defaults)')
    table = Table()
    amp = (lambda: torch.autocast('cuda', dtype=torch.bfloat16)) if cuda else None
    from contextlib import nullcontext
    ctx = amp or nullcontext

    # ------------------------------------------------------------------ networks
    torch.manual_seed(0)
    nets = {'TP-Diff': TPDiffNet()}
    peer_notes = {}
    for name in ('Restormer', 'NAFNet-GoPro'):
        try:
            nets[name] = build_network(dict(PUBLISHED_CONFIGS[name]))
        except Exception as e:  # noqa: BLE001  (spandrel missing: the rows say so)
            peer_notes[name] = str(e).splitlines()[0]
    params = {k: sum(p.numel() for p in n.parameters()) for k, n in nets.items()}
    compiled_note = {}
    for name, net in nets.items():
        net.eval().to(device)
        if cuda or args.channels_last:
            net.to(memory_format=torch.channels_last)
    h, w = size
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    if cuda or args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tp = nets['TP-Diff']
    noise = torch.randn(tp.prior_shape(x), generator=torch.Generator().manual_seed(2)).to(device)
    # The DM alone, on the padded image exactly as TPDiffNet.forward calls it (eager, same precision): timed
    # as its own call interleaved with the others, so that the share does not depend on hooks or compile.
    from tpdiff_plugin.archs.arch_util import pad_to_multiple
    x_dm = pad_to_multiple(x, tp.pad_multiple)
    noise_dm = torch.randn(tp.dm.prior_ch, x_dm.shape[-2] // tp.prior_scale, x_dm.shape[-1] // tp.prior_scale,
                           generator=torch.Generator().manual_seed(2))[None].to(device)

    def dm_call():
        with torch.no_grad(), ctx():
            return tp.dm(x_dm, noise=noise_dm)
    runners = {}
    for name, net in nets.items():
        fn = net
        if args.compile and cuda:
            try:
                fn = torch.compile(net)
                compiled_note[name] = 'torch.compile'
            except Exception as e:  # noqa: BLE001
                compiled_note[name] = f'eager (compile failed: {type(e).__name__})'
        if name == 'TP-Diff':
            runners[name] = (lambda f: (lambda inp, z: f(inp, noise=z)))(fn)
        else:
            runners[name] = (lambda f: (lambda inp, z: f(inp)))(fn)

    def call(name, inp=None, z=None):
        with torch.no_grad(), ctx():
            return runners[name](x if inp is None else inp, noise if z is None and name == 'TP-Diff' else z)

    # warm-up: a small image first (kernels, allocator); on CUDA also the real size (autotuning, compile)
    small = torch.rand(1, 3, 64, 64, device=device)
    for name, net in list(nets.items()):
        try:
            call(name, small, torch.randn(tp.prior_shape(small), device=device) if name == 'TP-Diff' else None)
            if cuda:
                call(name)
        except Exception as e:  # noqa: BLE001  (a compiled net that fails at run time goes eager)
            if name in compiled_note and compiled_note[name] == 'torch.compile':
                compiled_note[name] = f'eager (compiled run failed: {type(e).__name__})'
                runners[name] = (lambda f, tpd=(name == 'TP-Diff'): (lambda inp, z: f(inp, noise=z) if tpd
                                                                      else f(inp)))(net)
                call(name, small, torch.randn(tp.prior_shape(small), device=device) if name == 'TP-Diff' else None)
            else:
                raise
    dm_call()

    # ------------------------------------------------------------------ inference, interleaved with the matmul
    n_mm = 512 if args.quick else 2048
    mm_dtype = torch.bfloat16 if cuda else torch.float32
    matmul = benchlib.matmul_call(n_mm, device, mm_dtype)
    matmul()
    calls = {name: (lambda nm=name: call(nm)) for name in nets}
    calls['DM'] = dm_call
    calls['matmul'] = lambda: [matmul() for _ in range(5)]
    log(f'inference at {h}x{w}: {", ".join(nets)} + the DM alone + matmul, {repeats} round(s)')
    times = interleaved(calls, repeats, device, on_round=lambda r: log(f'round {r + 1}/{repeats} done'))
    t = {k: median(v) for k, v in times.items()}
    dm_share = t['DM'] / t['TP-Diff']

    note_size = f'{h}x{w} (HxW), median of {repeats}' + ('' if (h, w) == (720, 1280) else
                                                    ' (not a 1280x720 frame: CPU budget; --size 720x1280 on GPU)')
    precision = 'bf16 autocast, channels_last' if cuda else 'fp32' + (', channels_last' if args.channels_last else '')
    table.add('TP-Diff inference', t['TP-Diff'], 's',
              f'{params["TP-Diff"] / 1e6:.2f}M params, {note_size}, {precision}'
              + (f', {compiled_note["TP-Diff"]}' if 'TP-Diff' in compiled_note else ''))
    for name in ('Restormer', 'NAFNet-GoPro'):
        if name in t:
            table.add(f'{name} inference', t[name], 's', f'{params[name] / 1e6:.2f}M params, spandrel, {note_size}'
                      + (f', {compiled_note[name]}' if name in compiled_note else ''))
        else:
            table.skip(f'{name} inference', 's', peer_notes.get(name, 'not available'))
    for name, target in (('Restormer', 'target <= 1'), ('NAFNet-GoPro', '')):
        if name in t:
            table.add(f'TP-Diff / {name} time', t['TP-Diff'] / t[name], 'x',
                      f'same size, same run; {target}'.rstrip('; '))
        else:
            table.skip(f'TP-Diff / {name} time', 'x', 'peer not available')
    if 'Restormer' in params:
        table.add('TP-Diff / Restormer params', params['TP-Diff'] / params['Restormer'], 'x',
                  f'{params["TP-Diff"] / 1e6:.2f}M / {params["Restormer"] / 1e6:.2f}M; target < 0.5')
    else:
        table.skip('TP-Diff / Restormer params', 'x', 'peer not available')
    table.add('DM sampling share of TP-Diff', 100 * dm_share, '%',
              f'T={tp.dm.timesteps} steps (E_c + T denoiser calls), {t["DM"] * 1e3:.1f} ms of '
              f'{t["TP-Diff"] * 1e3:.0f} ms (medians); target <= 15% (at 1280x720)')

    # ------------------------------------------------------------------ GFLOP/s
    probe = 64
    counter_net = TPDiffNet().eval()  # MACs do not depend on the weights; counted on CPU at 64x64, scaled
    macs = count_macs(counter_net, (torch.rand(1, 3, probe, probe),))[0] * (h * w) / (probe * probe)
    del counter_net
    achieved = 2 * macs / t['TP-Diff'] / 1e9
    mm_gflops = 5 * 2 * n_mm ** 3 / t['matmul'] / 1e9
    table.add('TP-Diff achieved throughput', achieved, 'GFLOP/s',
              f'2 x {macs / 1e9:.1f} GMAC (mmengine count incl. T DM steps) / {t["TP-Diff"]:.3f} s')
    table.add('dense matmul throughput', mm_gflops, 'GFLOP/s',
              f'{n_mm}x{n_mm} {str(mm_dtype).replace("torch.", "")} torch.mm, interleaved with the networks')
    table.add('TP-Diff / matmul throughput', achieved / mm_gflops, 'x', 'share of the machine\'s dense-matmul speed')

    # ------------------------------------------------------------------ deformable filter
    dc, dh = 32, (64 if args.quick else 256)
    xd, off, mask, wd = benchlib.deform_inputs(dc, dh, dh, device)

    def deform(impl):
        with torch.no_grad():
            return deform_filter(xd, off, mask, wd, impl=impl)
    impls = ('torchvision', 'grid_sample', 'gather')
    for impl in impls:
        deform(impl)
    d_rep = 2 if args.quick else 5
    dt = interleaved({impl: (lambda i=impl: deform(i)) for impl in impls}, d_rep, device)
    auto = 'torchvision' if cuda else 'gather without autograd (inference), grid_sample with it (training)'
    ref = deform('torchvision')
    agree = {impl: float((ref - deform(impl)).abs().max()) for impl in impls[1:]}
    table.add('deform filter torchvision', 1e3 * median(dt['torchvision']), 'ms',
              f'{dc}x{dh}x{dh}, 3x3 modulated, 1 offset group, no autograd, median of {d_rep}')
    table.add('deform filter grid_sample', 1e3 * median(dt['grid_sample']), 'ms',
              f'max |difference| to torchvision {agree["grid_sample"]:.1e}')
    faster = 'grid_sample' if median(dt['grid_sample']) < median(dt['torchvision']) else 'torchvision'
    table.add('torchvision / grid_sample time', median(dt['torchvision']) / median(dt['grid_sample']), 'x',
              f'faster here: {faster}')
    table.add('deform filter gather', 1e3 * median(dt['gather']), 'ms',
              f'one embedding_bag; max |difference| to torchvision {agree["gather"]:.1e}')
    table.add('grid_sample / gather time', median(dt['grid_sample']) / median(dt['gather']), 'x',
              f'deform_filter(impl="auto") on {device.type}: {auto}')

    # ------------------------------------------------------------------ memory of one tile, 4K estimate
    tile = DEFAULT_TILE[device.type]  # tpdiff deblur's default on this device
    ph, pw = -(-2160 // 8) * 8, -(-3840 // 8) * 8
    # image-sized buffers of `tpdiff deblur` on a 4K photo: 8-bit image in and out, float32 input, output
    # accumulator, float32 result and its rounding (numpy), float32 weight map, the DM noise at 1/4
    buffers_mib = (2 * 3 * ph * pw + 4 * 3 * ph * pw * 4 + ph * pw * 4
                   + tp.prior_ch * (ph // tp.prior_scale) * (pw // tp.prior_scale) * 4) / 2 ** 20
    if args.no_memory or args.quick:
        why = '--quick' if args.quick else '--no-memory'
        table.skip('peak memory, one tile', 'MiB', f'skipped ({why})')
        table.skip('est. peak memory, 3840x2160 tiled', 'MiB', f'skipped ({why})')
    else:
        log(f'memory of one {tile}x{tile} tile (paper size)')
        if cuda:
            xt = torch.rand(1, 3, tile, tile, device=device)
            zt = torch.randn(tp.prior_shape(xt), device=device)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            call('TP-Diff', xt, zt)
            torch.cuda.synchronize(device)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
            table.add('peak memory, one tile', peak, 'MiB', f'{tile}x{tile}; torch.cuda.max_memory_allocated - '
                      'before, bf16 autocast')
            table.add('est. peak memory, 3840x2160 tiled', peak + buffers_mib, 'MiB',
                      f'{tile} px tiles: tile peak + {buffers_mib:.0f} MiB of image-sized buffers (host and device)')
        else:
            probe_res = benchlib.tile_memory_subprocess(tile, channels_last=args.channels_last)
            table.add('peak memory, one tile', probe_res['peak_mib'], 'MiB',
                      f'{tile}x{tile}; RSS high-water mark of a fresh process, fp32; '
                      f'{probe_res["base_mib"]:.0f} MiB before the forward (torch + network); '
                      f'forward took {probe_res["seconds"]:.1f} s')
            total = probe_res['peak_mib'] + buffers_mib
            fits = 'fits in 24 GiB' if total < 24 * 1024 else 'does NOT fit in 24 GiB'
            table.add('est. peak memory, 3840x2160 tiled', total, 'MiB',
                      f'{tile} px tiles: tile peak + {buffers_mib:.0f} MiB of image-sized buffers (8-bit in/out, '
                      f'float input, accumulator, result, weight map, noise); {fits}')

    # ------------------------------------------------------------------ stage-2 training iteration
    stage2 = os.path.join(REPO, 'options', 'demo', 'stage2.yml')
    from basicsr.utils.registry import MODEL_REGISTRY
    skip = 'skipped (--no-train)' if args.no_train else None
    if not skip and (not os.path.isfile(stage2) or 'TPDiffModel' not in MODEL_REGISTRY):
        skip = 'skipped: options/demo/stage2.yml or the TPDiffModel registration is missing'
    if skip:
        skip_training_rows(table, args.amp, skip)
    else:
        iters = 3 if args.quick else 6
        log(f'stage-2 training, {iters} iterations (the first is a warm-up)')
        rows, batch, patch = benchlib.stage2_training_times(stage2, device, iters)
        for n, key in zip(TRAIN_ROW_NAMES, ('data', 'G', 'D')):
            table.add(n, 1e3 * median(rows[key][1:]), 'ms',
                      f'demo/stage2.yml, batch {batch} x {patch}px, synthetic folder data, median of {iters - 1}')
        if args.amp == 'bf16':  # the same iteration again under train.amp: bf16, in the same process
            log(f'stage-2 training under train.amp: bf16, {iters} iterations (the first is a warm-up)')
            amp_rows, _, _ = benchlib.stage2_training_times(stage2, device, iters, amp='bf16')
            for n, key in zip(AMP_ROW_NAMES, ('G', 'D')):
                table.add(n, 1e3 * median(amp_rows[key][1:]), 'ms', 'as the rows above, train.amp: bf16')
            ratio = sum(median(rows[k][1:]) for k in ('G', 'D')) / sum(median(amp_rows[k][1:]) for k in ('G', 'D'))
            table.add(AMP_ROW_NAMES[-1], ratio, 'x', '> 1: train.amp: bf16 is faster; measured after the fp32 rows')

    # ------------------------------------------------------------------ optional: per-component profile
    if args.profile:
        import components
        log(f'profile: TP-Diff at {h}x{w} under forward hooks, {repeats} forward(s)')
        components.add_rows(table, tp, lambda: call('TP-Diff'), device, repeats, size)

    # ------------------------------------------------------------------ optional: a real 4K deblur
    if args.deblur_4k:
        from tpdiff_plugin.inference import Deblurrer
        log(f'deblurring a synthetic 3840x2160 image, tile {tile} (slow on CPU)')
        deblurrer = Deblurrer(TPDiffNet(), device=device, tile=tile, tile_overlap=32, half=cuda)
        img = torch.rand(1, 3, 2160, 3840)
        with PeakMemory(device) as peak:
            t0 = time.perf_counter()
            deblurrer(img, progress=lambda d, n: log(f'tile {d}/{n}'))
            seconds = time.perf_counter() - t0
        table.add('deblur 3840x2160, tiled', seconds, 's', f'paper size, tile {tile}, overlap 32')
        table.add('peak memory, 3840x2160 tiled', peak.mib, 'MiB', 'measured (process RSS high-water mark delta)'
                  if not cuda else 'measured (cuda max allocated delta)')

    print()
    table.print()
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({'device': args.device, 'where': where, 'size': size, 'repeats': repeats,
                       'rows': [{**r, 'value': None if r['value'] is None or not math.isfinite(r['value'])
                                 else r['value']} for r in table.rows]}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
