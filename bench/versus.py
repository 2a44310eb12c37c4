"""This tree against an earlier revision, side by side in one run: ``python bench/versus.py --baseline REV``.

Issue 10 asks for speed-ups "measured in the same run" against today's code. Two versions of the package cannot
share one process (the registries would clash), so each measurement is a fresh worker process that imports
``tpdiff_plugin`` and ``bench/benchlib.py`` from one tree: this checkout or a ``git worktree`` of ``REV``
(removed afterwards). Workers alternate baseline, this tree, baseline, ... for ``--rounds`` rounds, so a noisy
machine slows both alike; the table gives medians and the ratio baseline / this tree (> 1: this tree is faster).

Measured per worker, after a warm-up:
- ``inference``: a paper-size ``TPDiffNet`` forward at ``--size`` on CPU in channels_last (as ``Deblurrer``
  runs it), ``--repeats`` times. The random weights are perturbed (seeded), so the output differs from the
  input (an untrained net is the identity); the table also gives the largest difference of the two trees'
  outputs (the issue's bound: 1e-4 on [0, 1] images).
- ``training``: training iterations of ``options/demo/stage<--stage>.yml`` (stage 2 by default; G and D steps,
  benchlib's synthetic data), the first ``--warmup-iters`` not counted.

Both workers run under the allocator settings of the tree they import (``utils.allocator.tune_malloc``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--baseline', default='HEAD', help='git revision to compare with (default HEAD)')
    p.add_argument('--what', default='inference,training', help='inference, training or both (comma-separated)')
    p.add_argument('--size', default='256x256', help='inference size HxW (default 256x256)')
    p.add_argument('--rounds', type=int, default=3, help='alternating worker rounds (default 3)')
    p.add_argument('--repeats', type=int, default=2, help='inference forwards per worker (default 2)')
    p.add_argument('--iters', type=int, default=4, help='training iterations counted per worker (default 4)')
    p.add_argument('--warmup-iters', type=int, default=2, help='training iterations not counted (default 2)')
    p.add_argument('--stage', type=int, choices=(1, 2), default=2, help='training: the demo stage (default 2)')
    p.add_argument('--threads', type=int, default=0, help='torch intra-op threads (default: torch\'s)')
    p.add_argument('--json', metavar='OUT', help='also write the results as JSON')
    p.add_argument('--worker', choices=('inference', 'training'), help=argparse.SUPPRESS)
    p.add_argument('--tree', help=argparse.SUPPRESS)
    p.add_argument('--save-output', help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- workers
def _import_tree(tree):
    """Put ``tree`` (and its bench/) first on sys.path and check that its package is the one imported."""
    sys.path[:0] = [tree, os.path.join(tree, 'bench')]
    import tpdiff_plugin
    where = os.path.dirname(os.path.dirname(os.path.abspath(tpdiff_plugin.__file__)))
    if os.path.realpath(where) != os.path.realpath(tree):
        raise SystemExit(f'versus: imported tpdiff_plugin from {where}, not from {tree}')
    from tpdiff_plugin.utils.allocator import tune_malloc
    tune_malloc()


def inference_worker(args):
    import time

    import torch
    from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
    from tpdiff_plugin.utils.measure import parse_size
    h, w = parse_size(args.size)
    torch.manual_seed(0)
    net = TPDiffNet().eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a net whose output is not its input: every weight moved a little, seeded
        for p in net.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    net.to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=torch.channels_last)
    noise = torch.randn(net.prior_shape(x), generator=torch.Generator().manual_seed(2))
    small = torch.rand(1, 3, 64, 64)
    times = []
    with torch.no_grad():
        net(small.contiguous(memory_format=torch.channels_last), noise=torch.randn(net.prior_shape(small)))
        out = net(x, noise=noise)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            net(x, noise=noise)
            times.append(time.perf_counter() - t0)
    if args.save_output:
        torch.save(out, args.save_output)
    return {'seconds': times, 'change': float((out - x).abs().mean())}


def training_worker(args):
    import torch
    import benchlib
    options = os.path.join(args.tree, 'options', 'demo', f'stage{args.stage}.yml')
    rows, batch, patch = benchlib.stage2_training_times(options,
                                                        torch.device('cpu'), args.warmup_iters + args.iters)
    n = args.warmup_iters
    return {'seconds': [g + d for g, d in zip(rows['G'][n:], rows['D'][n:])], 'G': rows['G'][n:],
            'D': rows['D'][n:], 'batch': batch, 'patch': patch}


def run_worker(args):
    _import_tree(args.tree)
    import torch
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = (inference_worker if args.worker == 'inference' else training_worker)(args)
    print('VERSUS ' + json.dumps(result))


# ---------------------------------------------------------------------------------------------- driver
def _spawn(args, what, tree, save_output=None):
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', what, '--tree', tree, '--size', args.size,
           '--repeats', str(args.repeats), '--iters', str(args.iters), '--warmup-iters', str(args.warmup_iters),
           '--threads', str(args.threads), '--stage', str(args.stage)]
    if save_output:
        cmd += ['--save-output', save_output]
    env = dict(os.environ, PYTHONPATH=tree)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('VERSUS ')]
    if proc.returncode or not lines:
        raise SystemExit(f'versus: the {what} worker of {tree} failed (exit {proc.returncode}):\n'
                         + '\n'.join(proc.stderr.splitlines()[-15:]))
    return json.loads(lines[-1][len('VERSUS '):])


def _log(msg):
    print(f'[versus] {msg}', file=sys.stderr, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    whats = [w.strip() for w in args.what.split(',') if w.strip()]
    bad = [w for w in whats if w not in ('inference', 'training')]
    if bad or not whats:
        raise SystemExit(f'--what: inference and/or training, got {args.what!r}')
    rev = subprocess.run(['git', 'rev-parse', '--short', args.baseline], cwd=REPO, capture_output=True, text=True)
    if rev.returncode:
        raise SystemExit(f'--baseline {args.baseline!r}: not a git revision of {REPO}')
    rev = rev.stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    here = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                          text=True).stdout.strip() + (' + uncommitted changes' if dirty else '')
    results = {}
    with tempfile.TemporaryDirectory(prefix='tpdiff_versus_') as tmp:
        base_tree = os.path.join(tmp, 'baseline')
        subprocess.run(['git', 'worktree', 'add', '--detach', base_tree, rev], cwd=REPO, check=True,
                       capture_output=True)
        try:
            trees = {'baseline': base_tree, 'this tree': REPO}
            for what in whats:
                per = {name: [] for name in trees}
                extra = {}
                for r in range(args.rounds):
                    for name, tree in trees.items():
                        save = os.path.join(tmp, f'{name.replace(" ", "_")}.pt') if what == 'inference' and r == 0 \
                            else None
                        res = _spawn(args, what, tree, save)
                        per[name] += res['seconds']
                        extra.setdefault(name, res)
                    _log(f'{what}: round {r + 1}/{args.rounds} done')
                results[what] = {name: statistics.median(v) for name, v in per.items()}
                results[what]['all'] = per
                results[what]['extra'] = {k: {kk: vv for kk, vv in v.items() if kk != 'seconds'}
                                          for k, v in extra.items()}
                if what == 'inference':
                    import torch
                    a, b = (torch.load(os.path.join(tmp, f), weights_only=True)
                            for f in ('baseline.pt', 'this_tree.pt'))
                    results[what]['max_abs_diff'] = float((a - b).abs().max())
        finally:
            subprocess.run(['git', 'worktree', 'remove', '--force', base_tree], cwd=REPO, capture_output=True)

    print(f'versus: baseline {rev} against this tree ({here}); {args.rounds} alternating rounds, medians')
    print(f'{"row":34} | {"baseline":>9} | {"this tree":>9} | {"ratio":>6} | note')
    print('-' * 100)
    for what, res in results.items():
        ratio = res['baseline'] / res['this tree']
        if what == 'inference':
            note = (f'TPDiffNet {args.size}, CPU, channels_last, perturbed random weights; outputs differ by at most '
                    f'{res["max_abs_diff"]:.1e}; {len(res["all"]["this tree"])} forwards each')
            label = 'inference forward (s)'
        else:
            ex = res['extra']['this tree']
            note = (f'demo/stage{args.stage}.yml G + D, batch {ex["batch"]} x {ex["patch"]}px; '
                    f'{len(res["all"]["this tree"])} iterations each after {args.warmup_iters} warm-up per worker')
            label = f'stage-{args.stage} training iteration (s)'
        print(f'{label:34} | {res["baseline"]:9.3f} | {res["this tree"]:9.3f} | {ratio:5.2f}x | {note}')
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({'baseline': rev, 'this_tree': here, 'results': results}, f, indent=1)


if __name__ == '__main__':
    main()
