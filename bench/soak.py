"""Kill-anywhere soak: a demo training run SIGKILLed at random moments, auto-resumed each time, must end
bit-identical to an uninterrupted run (issue 14; not part of CI: it takes minutes).

    .venv/bin/python bench/soak.py [--kills 50] [--iters 800] [--seed 0] [--work DIR]

What it does, on the CPU with one process and no dataloader workers (the setting whose resume is exact):
1. builds the demo set and a shrunk stage-1 demo options file (4-channel networks, 32 px patches, a
   checkpoint every ``--save-every`` iterations, validation every ``--val-every``);
2. trains it once without interruption (the reference);
3. trains it again, starting ``basicsr train --auto_resume`` over and over and SIGKILLing the process after a
   random delay (uniform in ``[--min-delay, --max-delay]`` seconds, so kills land in start-up, training
   steps, validation and checkpoint writes alike), ``--kills`` times; then lets it finish;
4. compares: every network and training state of the last checkpoint, and every logged loss line (the
   last one logged for each iteration), against the reference; and loads every checkpoint file left in the
   experiment (``weights_only=True``) and looks for stray temporary files.

It prints where each kill landed (the phase of the last log line), and exits 0 only if everything is
identical and nothing is corrupt.
"""
import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import torch  # noqa: E402
import yaml  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASICSR = os.path.join(os.path.dirname(sys.executable), 'basicsr')
LOSS_LINE = re.compile(r'iter:\s+(\d+), lr:.*?\]\s+(l_.*)$')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--kills', type=int, default=50, help='SIGKILLs to deliver before letting the run finish (50)')
    p.add_argument('--iters', type=int, default=800, help='training iterations (800: enough to absorb 50 kills)')
    p.add_argument('--save-every', type=int, default=10, help='checkpoint interval (10)')
    p.add_argument('--val-every', type=int, default=50, help='validation interval (50)')
    p.add_argument('--min-delay', type=float, default=2.0, help='shortest time before a kill, seconds (2)')
    p.add_argument('--max-delay', type=float, default=15.0, help='longest time before a kill, seconds (15)')
    p.add_argument('--seed', type=int, default=0, help='seed of the kill times (0)')
    p.add_argument('--work', default=None, help='work folder (default: a temporary one, removed at the end)')
    return p.parse_args(argv)


def shrunk_demo_options(data, name, total_iter, save_every, val_every=None, stage_file='demo/stage1.yml'):
    """``options/<stage_file>`` shrunk to seconds: 32 px patches, 2 per batch, 4-channel networks, a checkpoint
    every ``save_every`` iterations, validation every ``val_every`` (None: no validation). ``data`` is a demo
    set built by ``tpdiff make-demo``; its training set has 35 blurry images, so one epoch is 17 iterations
    (drop_last). The reliability tests (``tests/test_determinism.py``) train this experiment too."""
    with open(os.path.join(REPO, 'options', stage_file), encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    opt['name'] = name
    train = opt['datasets']['train']
    train.update(dataroot_blur=os.path.join(data, 'train_blur.lmdb'), dataroot_sharp=os.path.join(data, 'train_sharp.lmdb'),
                 gt_size=32, batch_size_per_gpu=2, dataset_enlarge_ratio=1, num_worker_per_gpu=0)
    if val_every is None:
        opt['datasets'].pop('val', None)
        opt.pop('val', None)
    else:
        opt['datasets']['val'].update(dataroot_gt=os.path.join(data, 'val_sharp.lmdb'),
                                      dataroot_lq=os.path.join(data, 'val_blur.lmdb'))
        opt['val'].update(val_freq=val_every, save_img=False)
    opt['network_g'].update(dim=4, dm_feats=8, dm_timesteps=4, prior_ch=8, prior_hidden=4)
    opt['network_tpe'].update(prior_ch=8, mem_slots=8, enc_ch=4)
    for key in ('network_d_sharp', 'network_d_blur', 'network_d_wave'):
        opt[key].update(base_ch=4, num_layers=2)
    opt['network_rb'].update(base_ch=4, num_levels=2)
    opt['train'].update(total_iter=total_iter, pool_size=3)
    opt['logger'].update(print_freq=1, save_checkpoint_freq=save_every)
    return opt


def start(root, opt_path, resume):
    """``basicsr train`` in its own process group, its console output appended to ``root/console.txt`` (a pipe
    nobody reads until the end would fill up and block the run)."""
    cmd = [BASICSR, 'train', '-opt', opt_path] + (['--auto_resume'] if resume else [])
    with open(os.path.join(root, 'console.txt'), 'ab') as console:
        return subprocess.Popen(cmd, cwd=root, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)


def console_tail(root):
    with open(os.path.join(root, 'console.txt'), 'rb') as f:
        return f.read().decode(errors='replace')[-3000:]


def phase_of(exp_dir):
    """What the run was doing when killed, from the last line of its newest log."""
    logs = sorted(p for p in os.listdir(exp_dir) if p.startswith('train_') and p.endswith('.log')) \
        if os.path.isdir(exp_dir) else []
    if not logs:
        return 'start-up'
    with open(os.path.join(exp_dir, logs[-1]), encoding='utf-8') as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    last = lines[-1] if lines else ''
    if 'Saving models' in last:
        return 'checkpoint write'
    if 'Validation' in last or '# psnr' in last or '# ssim' in last:
        return 'validation'
    if LOSS_LINE.search(last):
        return 'training steps'
    return 'start-up'


def logged_losses(exp_dir):
    out = {}
    for name in sorted(p for p in os.listdir(exp_dir) if p.startswith('train_') and p.endswith('.log')):
        with open(os.path.join(exp_dir, name), encoding='utf-8') as f:
            for line in f:
                m = LOSS_LINE.search(line)
                if m:
                    out[int(m.group(1))] = m.group(2).strip()
    return out


def tensors_equal(a, b, where):
    """Deep comparison of two loaded checkpoints; returns the first difference, or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        return None if same else where
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f'{where}: keys differ'
        for k in a:
            diff = tensors_equal(a[k], b[k], f'{where}.{k}')
            if diff:
                return diff
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f'{where}: lengths differ'
        for i, (x, y) in enumerate(zip(a, b)):
            diff = tensors_equal(x, y, f'{where}[{i}]')
            if diff:
                return diff
        return None
    return None if a == b else where


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, REPO)
    from tpdiff_plugin.data.demo_set import build_demo
    from tpdiff_plugin.utils.checkpoint import read_checkpoint
    from tpdiff_plugin.utils.errors import UserError

    work = args.work or tempfile.mkdtemp(prefix='tpdiff-soak-')
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, 'demo')
    if not os.path.isdir(data):
        build_demo(data, seed=0, quiet=True)
    runs = {}
    for name in ('soak_ref', 'soak'):
        root = os.path.join(work, name)
        os.makedirs(root, exist_ok=True)
        path = os.path.join(root, f'{name}.yml')
        with open(path, 'w', encoding='utf-8') as f:
            yaml.safe_dump(shrunk_demo_options(data, name, args.iters, args.save_every, args.val_every), f)
        runs[name] = (root, path, os.path.join(root, 'experiments', name))

    t0 = time.time()
    root, path, ref_exp = runs['soak_ref']
    proc = start(root, path, resume=False)
    if proc.wait() != 0:
        print(console_tail(root), file=sys.stderr)
        return 1
    ref_time = time.time() - t0
    print(f'reference run: {args.iters} iterations in {ref_time:.0f} s', flush=True)

    rng = random.Random(args.seed)
    root, path, exp = runs['soak']
    phases, kills, starts = {}, 0, 0
    t0 = time.time()
    while True:
        proc = start(root, path, resume=starts > 0)
        starts += 1
        if kills >= args.kills:
            code = proc.wait()
            if code != 0:
                print(console_tail(root), file=sys.stderr)
                return 1
            break
        try:
            code = proc.wait(timeout=rng.uniform(args.min_delay, args.max_delay))
        except subprocess.TimeoutExpired:
            phase = phase_of(exp)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            phases[phase] = phases.get(phase, 0) + 1
            continue
        if code != 0:
            print(console_tail(root), file=sys.stderr)
            return 1
        break  # finished before the next kill
    print(f'killed run: {kills} SIGKILLs over {starts} starts, {time.time() - t0:.0f} s; kills landed in: '
          + ', '.join(f'{k} {v}' for k, v in sorted(phases.items())), flush=True)

    problems = [] if kills >= args.kills else [f'the run finished after {kills} of {args.kills} kills: raise --iters']
    last = args.iters - args.iters % args.save_every
    for folder, suffix in (('models', f'_{last}.pth'), ('training_states', f'{last}.state')):
        for name in sorted(os.listdir(os.path.join(ref_exp, folder))):
            if name.endswith(suffix):
                a = torch.load(os.path.join(ref_exp, folder, name), weights_only=True)
                other = os.path.join(exp, folder, name)
                if not os.path.isfile(other):
                    problems.append(f'{folder}/{name} missing in the killed run')
                    continue
                diff = tensors_equal(a, torch.load(other, weights_only=True), name)
                if diff:
                    problems.append(f'{folder}/{name} differs at {diff}')
    ref_losses, losses = logged_losses(ref_exp), logged_losses(exp)
    differing = [i for i in ref_losses if losses.get(i) != ref_losses[i]]
    if differing or sorted(ref_losses) != list(range(1, args.iters + 1)):
        problems.append(f'logged losses differ at {len(differing)} iteration(s), first {differing[:3]}')
    checked = 0
    for folder in ('models', 'training_states'):
        for name in os.listdir(os.path.join(exp, folder)):
            full = os.path.join(exp, folder, name)
            if name.startswith('.'):
                problems.append(f'stray temporary file {folder}/{name}')
                continue
            try:
                read_checkpoint(full, 'soak')
                checked += 1
            except UserError as e:
                problems.append(str(e))
    print(f'compared: the {last}-iteration networks and training state, {len(ref_losses)} logged loss lines; '
          f'loaded {checked} checkpoint files')
    print('RESULT: ' + ('bit-identical to the uninterrupted run, nothing corrupt' if not problems else
                        'FAILED\n  ' + '\n  '.join(problems)))
    if not args.work:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not problems else 1


if __name__ == '__main__':
    sys.exit(main())
