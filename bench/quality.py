"""Quality harness: train demo-size TP-Diff from scratch under named variants and compare them on images.

    make quality                                    # = .venv/bin/python bench/quality.py (every variant)
    .venv/bin/python bench/quality.py --variants recipe,supervised --iters 1200 --stage2-iters 400
    .venv/bin/python bench/quality.py --define 'r1_10=recipe,train.r1_weight=10' --variants r1_10,recipe
    .venv/bin/python bench/quality.py --quick       # 2 x 10 iterations of three variants (the smoke test)

Every variant starts from the same seed on the same data (the embedded demo set, built by ``tpdiff
make-demo`` into a scratch folder: ``--domains matched`` and, for the variants that ask for it,
``split``) and is validated on the demo validation pairs at every ``--eval-every`` iterations. One table
gives, per variant: val PSNR / SSIM of the last evaluation, its gain over the blurry input, the periodic
artifact measure (``tpdiff_plugin.utils.artifacts``: output's spectral peaks at 2- and 4-pixel periods
minus the input's, in dB; 0 = none added, a visible checkerboard is > +3), the PSNR / SSIM of the
"coarse part" (the input plus the output's change blurred by 1.5 px: it separates DN's sharpening at the scale
of the blur from detail invented at the 1-3 px scale), and the PSNR curve over iterations, so that
degradation with training shows. Kinds of variant:

- ``tpdiff``: TPDiffModel stage 1 for ``--iters`` iterations from ``options/demo/stage1.yml``, then
  stage 2 for ``--stage2-iters`` from ``options/demo/stage2.yml``, loading the stage-1 checkpoints the
  way the options name them (the discriminators and their optimizer state only if the options do).
  The curve runs through both stages; stage 2 validates with the DM's prior sampled from noise.
- ``cycle``: the plain UnpairedCycleModel (CycleGAN baseline): the same TPDiffNet with no prior
  (``use_dm: false``, zeros), the same losses, ``--iters + --stage2-iters`` iterations.
- ``supervised``: the ceiling: the same TPDiffNet (no prior), L1 on the *paired* version of the same blurry
  training tiles (``train_blur_gt.lmdb``), basicsr's SRModel, ``--iters + --stage2-iters`` iterations.
- ``identity``: no network; the output is the input.

Variants are option overrides (``section.key=value``, YAML values) on the demo options; ``--define
NAME=BASE,key=value,...`` adds one. ``--jobs 2`` trains two variants at a time, one thread each (the
machine's 2 cores); results do not depend on it. ``--json`` writes the curves, ``--out`` a PNG per
variant (blurry | output | sharp for every validation image, at the last evaluation). ``--warm-start DIR:ITER``
continues a ``--keep`` run's stage 1 from ITER under each variant's options (e.g. a learning-rate decay from
iteration 1000), so a late-training change costs only the iterations after ITER.
"""
import argparse
import copy
import glob
import json
import os
import re
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # see bench/README.md: spinning OpenMP threads on 2 cores

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
STAGE1 = os.path.join(REPO, 'options', 'demo', 'stage1.yml')
STAGE2 = os.path.join(REPO, 'options', 'demo', 'stage2.yml')
COARSE_SIGMA = 1.5  # px: the "coarse part" column keeps the output's change blurred by this (see coarse_part)

# What the first demo recipe did, which the demo options have since changed (the "shipped" row is this; each
# "shipped+<change>" row switches one structural change of issue 9 on). Stage-2-only keys are prefixed "s2:".
SHIPPED = {
    'data': 'split',
    'network_g.identity_init': False, 'network_rb.identity_init': False, 'network_g.icnr_init': False,
    'train.sharp_cycle_prior': 'own_batch', 'train.dm_target': 'batch',
    's2:path.pretrain_network_d_sharp': None, 's2:path.pretrain_network_d_blur': None,
    's2:path.pretrain_network_d_wave': None, 's2:path.resume_optim_d': None,
    # the losses and RN of the first recipe (the paper's weights)
    'network_rb.kernel_size': 0, 'train.gan_sharp_opt': None, 'train.cycle_sharp_opt': None,
    'train.wave_opt.loss_weight': 0.2, 'train.sharp_cycle_trains_rb': True, 'train.r1_weight': 0,
    'network_g.residual_lowpass': 0,  # DN's whole change, as the paper's network (round 6 band-limited it)
    # round 8: the plain D_S / D_B, one R1 weight (the first recipe had none), DN at D's learning rate
    'network_g.residual_notch': False, 'network_d_sharp.highpass_gain': 0, 'network_d_blur.highpass_gain': 0,
    'train.optim_g.lr': 2e-4,
    # rounds 9 and 10: a constant learning rate, no EMA of G, and a DM that starts with the whole game
    'train.scheduler': {'type': 'MultiStepLR', 'milestones': [], 'gamma': 0.5}, 'train.ema_decay': None,
    's2:train.dm_warmup_iter': None, 's2:train.dm_lr': None,
}
# the structural changes, as they appear in the demo options
CHANGES = {
    'identity_init': ('network_g.identity_init', 'network_rb.identity_init'),
    'icnr_init': ('network_g.icnr_init',),
    'matched_data': ('data',),
    'no_self_prior': ('train.sharp_cycle_prior',),
    'd_handover': ('s2:path.pretrain_network_d_sharp', 's2:path.pretrain_network_d_blur',
                   's2:path.pretrain_network_d_wave', 's2:path.resume_optim_d'),
    'ema_dm_target': ('train.dm_target',),
}


def _variants():
    shipped_all_changes = {k: v for k, v in SHIPPED.items() if not any(k in keys for keys in CHANGES.values())}
    v = {
        'identity': {'kind': 'identity'},
        'supervised': {'kind': 'supervised'},
        'cycle': {'kind': 'cycle'},
        'shipped': {'kind': 'tpdiff', **SHIPPED},
    }
    for name, keys in CHANGES.items():
        v[f'shipped+{name}'] = {'kind': 'tpdiff', **{k: x for k, x in SHIPPED.items() if k not in keys}}
    v['all_changes'] = {'kind': 'tpdiff', **shipped_all_changes}
    v['recipe'] = {'kind': 'tpdiff'}  # the demo options as they are
    return v


VARIANTS = _variants()
DEFAULT_ORDER = ('identity', 'supervised', 'recipe', 'cycle', 'shipped', 'shipped+identity_init',
                 'shipped+icnr_init', 'shipped+matched_data', 'shipped+no_self_prior', 'shipped+d_handover',
                 'shipped+ema_dm_target', 'all_changes')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--variants', default=','.join(DEFAULT_ORDER), help='comma-separated names (see --list)')
    p.add_argument('--define', action='append', default=[], metavar='NAME=BASE,key=value,...',
                   help='a new variant: BASE\'s overrides plus these (YAML values; "s2:" prefix = stage 2 only)')
    p.add_argument('--list', action='store_true', help='print the variants and their overrides, then exit')
    p.add_argument('--iters', type=int, default=None,
                   help='stage-1 iterations (default: the stage-1 options\' total_iter, the demo\'s 400)')
    p.add_argument('--stage2-iters', type=int, default=None,
                   help='stage-2 iterations (default: the stage-2 options\' total_iter, the demo\'s 700)')
    p.add_argument('--eval-every', type=int, default=100, help='validate every N iterations (default 100)')
    p.add_argument('--stage1-opt', default=STAGE1, help='the options the variants start from (default: the demo\'s)')
    p.add_argument('--stage2-opt', default=STAGE2, help='stage 2\'s (default: the demo\'s)')
    p.add_argument('--seed', type=int, default=10, help='training seed (default 10, the demo options\')')
    p.add_argument('--data', default=None, help='a demo set built by make-demo (default: build one in a temp dir)')
    p.add_argument('--jobs', type=int, default=1, help='variants trained at once, one thread each (default 1)')
    p.add_argument('--threads', type=int, default=None, help='torch threads per job (default: torch\'s with --jobs 1)')
    p.add_argument('--device', default='cpu', choices=('cpu', 'cuda'), help='train on the CPU (default) or one GPU')
    p.add_argument('--quick', action='store_true', help='10 + 10 iterations of identity, recipe and supervised')
    p.add_argument('--log-every', type=int, default=0, help='print the training losses to stderr every N iterations')
    p.add_argument('--warm-start', default=None, metavar='DIR:ITER',
                   help='start every tpdiff variant\'s stage 1 from the checkpoints a --keep run saved at ITER in DIR '
                        '(its <name>-s1 folder): networks, optimizer states and image pools; the variant\'s own '
                        'options (learning rate, schedule, losses) apply from ITER on, and --iters is the total')
    p.add_argument('--json', default=None, help='write the results (curves included) to this file')
    p.add_argument('--out', default=None, help='write one PNG per variant (blurry | output | sharp) here')
    p.add_argument('--keep', default=None, metavar='DIR',
                   help='train in DIR and keep it: each variant\'s checkpoints (<name>-s1/, <name>-s2/ models and '
                        'training states, saved at every evaluation) and demo sets; default: a temporary folder')
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.stage2_iters, args.eval_every = 10, 10, 10
        if args.variants == p.get_default('variants'):
            args.variants = 'identity,recipe,supervised'
    for key, path in (('iters', args.stage1_opt), ('stage2_iters', args.stage2_opt)):
        if getattr(args, key) is None:
            setattr(args, key, _total_iter(path))
    if args.warm_start:
        folder, _, start = args.warm_start.rpartition(':')
        if not start.isdigit() or not os.path.isfile(os.path.join(folder, 'training_states', f'{start}.state')):
            p.error(f'--warm-start {args.warm_start}: expected DIR:ITER with DIR/training_states/ITER.state '
                    '(a --keep run\'s <name>-s1 folder)')
        if int(start) >= args.iters:
            p.error(f'--warm-start {args.warm_start}: ITER must be below --iters ({args.iters}), the stage-1 total')
        args.warm_folder, args.warm_iter = folder, int(start)
    else:
        args.warm_folder, args.warm_iter = None, 0
    return args


def _total_iter(path):
    """``train.total_iter`` of the options file ``path``: the budget a stage gets by default."""
    import yaml
    with open(path, encoding='utf-8') as f:
        return int(yaml.safe_load(f)['train']['total_iter'])


def _parse_value(text):
    import yaml
    value = yaml.safe_load(text)
    if not isinstance(value, str):
        return value
    try:  # YAML 1.1 reads 5e-5 (no dot) as text
        return float(value)
    except ValueError:
        return value


def define_variants(defines, variants):
    out = dict(variants)
    for spec in defines:
        name, _, rest = spec.partition('=')
        parts = [x for x in re.split(r',(?=\s*[\w:.]+=)', rest) if x]  # commas inside YAML values stay
        if not name or not parts or parts[0] not in out:
            raise SystemExit(f'--define {spec!r}: expected NAME=BASE,key=value,... with BASE one of {", ".join(out)}')
        v = dict(out[parts[0]])
        for item in parts[1:]:
            key, eq, value = item.partition('=')
            if not eq:
                raise SystemExit(f'--define {spec!r}: {item!r} is not key=value')
            v[key.strip()] = _parse_value(value)
        out[name] = v
    return out


def _set(opt, dotted, value):
    keys = dotted.split('.')
    node = opt
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


def build_options(path, overrides, stage, data_root, work, name, num_gpu=0, iters=None):
    """The options of ``path`` with the variant's overrides, pointed at ``data_root`` and ``work``.

    ``iters`` (this stage's budget in the run) becomes ``train.total_iter``. A cosine schedule whose periods
    add up to the file's ``total_iter`` (a decay over the whole budget) is stretched to ``iters`` in proportion,
    so it still ends at the end of the run; periods a variant spells out for another length are kept as given.
    The file's ``dm_warmup_iter`` (stage 2's DM-only start) is scaled the same way, so a short or long run keeps
    the recipe's share of DM-only iterations; a variant that sets it gets its own value.
    """
    import yaml
    with open(path, encoding='utf-8') as f:
        opt = yaml.safe_load(f)
    if iters:  # before the overrides, so a variant's own dm_warmup_iter replaces the scaled one
        _scale_warmup(opt['train'], iters)
    for key, value in overrides.items():
        if key in ('kind', 'data'):
            continue
        if key.startswith('s2:'):
            if stage != 2:
                continue
            key = key[3:]
        _set(opt, key, copy.deepcopy(value))
    if iters:
        _fit_schedule(opt['train'], iters)
    opt.update(name=name, is_train=True, dist=False, rank=0, world_size=1, num_gpu=num_gpu, auto_resume=False)
    train = opt['datasets']['train']
    train.update(phase='train', scale=1, num_worker_per_gpu=0,
                 dataroot_blur=os.path.join(data_root, 'train_blur.lmdb'),
                 dataroot_sharp=os.path.join(data_root, 'train_sharp.lmdb'))
    val = opt['datasets']['val']
    val.update(phase='val', scale=1, dataroot_lq=os.path.join(data_root, 'val_blur.lmdb'),
               dataroot_gt=os.path.join(data_root, 'val_sharp.lmdb'))
    models = os.path.join(work, name, 'models')
    states = os.path.join(work, name, 'training_states')
    os.makedirs(models, exist_ok=True)
    os.makedirs(states, exist_ok=True)
    opt['path'] = {k: v for k, v in (opt.get('path') or {}).items() if k.startswith(('strict_load', 'param_key'))
                   or (k.startswith(('pretrain_network', 'resume_optim')) and v)}
    opt['path'].update(models=models, training_states=states, resume_state=None, visualization=work)
    return opt


def _scale_warmup(train, iters):
    total = train.get('total_iter')
    if train.get('dm_warmup_iter') and total and total != iters:
        train['dm_warmup_iter'] = round(train['dm_warmup_iter'] * iters / total)


def _fit_schedule(train, iters):
    scheduler, total = train.get('scheduler') or {}, train.get('total_iter')
    periods = scheduler.get('periods')
    if scheduler.get('type') == 'CosineAnnealingRestartLR' and periods and sum(periods) == total != iters:
        scaled = [max(1, round(p * iters / total)) for p in periods]
        scaled[-1] += iters - sum(scaled)  # rounding: the periods add up to the budget exactly
        scheduler['periods'] = scaled
    train['total_iter'] = iters


def _stage1_paths(opt2, stage1_work, iters, every_network=False):
    """Point the stage-2 options' checkpoint paths (those the options set) at the harness's stage-1 run;
    ``every_network`` (a warm start): every network that run saved at ``iters``."""
    models = os.path.join(stage1_work, 'models')
    if every_network:
        for path in sorted(glob.glob(os.path.join(models, f'net_*_{iters}.pth'))):
            opt2['path'][f'pretrain_network_{os.path.basename(path)[4:-len(f"_{iters}.pth")]}'] = path
    for key in list(opt2['path']):
        if key.startswith('pretrain_network_'):
            label = key[len('pretrain_network_'):]
            opt2['path'][key] = os.path.join(models, f'net_{label}_{iters}.pth')
        elif key == 'resume_optim_d':
            opt2['path'][key] = os.path.join(stage1_work, 'training_states')


def _warm_start(model, stage1_work, iters):
    """Give ``model`` (built with ``_stage1_paths(..., every_network=True)``) the optimizer states and image
    pools saved with those networks. The learning rates restart from the options' (the scheduler is the
    variant's own, stepped from ``iters``), so a warm start can change the schedule."""
    from tpdiff_plugin.utils.checkpoint import read_checkpoint
    state = read_checkpoint(os.path.join(stage1_work, 'training_states', f'{iters}.state'), '--warm-start')
    if len(state['optimizers']) != len(model.optimizers):
        raise SystemExit(f'--warm-start: {stage1_work} has {len(state["optimizers"])} optimizers, the variant '
                         f'{len(model.optimizers)}')
    for optimizer, saved in zip(model.optimizers, state['optimizers']):
        own = [(g['lr'], g.get('initial_lr', g['lr'])) for g in optimizer.param_groups]  # the variant's rates
        optimizer.load_state_dict(saved)  # (which would also bring back the saved run's rates)
        for group, (lr, initial) in zip(optimizer.param_groups, own):
            group['lr'], group['initial_lr'] = lr, initial
    model.load_extra_training_state({k: v for k, v in state.items() if k != 'rng_states'})
    # basicsr steps the schedulers once per iteration after the first, so iteration ITER + 1 must find them stepped
    # ITER - 1 times: then a milestone (or a cosine period) counts in the run's own iterations, not from the warm start
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Detected call of `lr_scheduler.step()` before')
        for scheduler in model.schedulers:
            for _ in range(iters - 1):
                scheduler.step()


def _loader(dataset_opt, seed):
    import torch
    from basicsr.data import build_dataset
    dataset = build_dataset(dataset_opt)
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=dataset_opt['batch_size_per_gpu'], shuffle=True,
                                       drop_last=True, num_workers=0, generator=g)


def _batches(loader):
    while True:
        yield from loader


def val_pairs(data_root, blur_set, sharp_set, keys=None):
    """``[(key, lq [1, 3, H, W] RGB in [0, 1], blurry uint8 BGR, sharp uint8 BGR)]`` of the pairs stored under the
    same keys in ``<data_root>/<blur_set>.lmdb`` and ``<sharp_set>.lmdb``: ``keys`` (default: all, sorted)."""
    import torch
    from tpdiff_plugin.data.image_sets import read_images
    blur = read_images(os.path.join(data_root, f'{blur_set}.lmdb'))
    sharp = read_images(os.path.join(data_root, f'{sharp_set}.lmdb'))
    return [(key, torch.from_numpy(blur[key][:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255., blur[key],
             sharp[key]) for key in (sorted(blur) if keys is None else keys)]


def _val_images(data_root):
    """The demo validation pairs (``val_pairs``)."""
    return val_pairs(data_root, 'val_blur', 'val_sharp')


def coarse_part(out, blur, sigma=COARSE_SIGMA):
    """``blur`` plus only the coarse part of the change ``out - blur`` (its Gaussian blur of ``sigma`` px), as 8-bit
    BGR: what the output would score without its change at the 1-3 px scale (round 5 of bench/README.md)."""
    import cv2
    import numpy as np
    change = out.astype(np.float64) - blur.astype(np.float64)
    return np.clip(np.round(blur + cv2.GaussianBlur(change, (0, 0), sigma)), 0, 255).astype(np.uint8)


def evaluate(run_net, val):
    """Mean PSNR / SSIM (basicsr's, RGB, no crop) and artifact dB of ``run_net(lq)`` on the val pairs, and the
    PSNR / SSIM of the coarse part of its change (``coarse_part``)."""
    import numpy as np
    import torch
    from basicsr.metrics import calculate_psnr, calculate_ssim
    from basicsr.utils import tensor2img
    from tpdiff_plugin.utils.artifacts import periodic_artifact_db
    rows, images = [], []
    for key, lq, blur_bgr, gt_bgr in val:
        with torch.no_grad():
            out = tensor2img(run_net(lq).clamp(0, 1))  # BGR uint8, as basicsr validation
        coarse = coarse_part(out, blur_bgr)
        rows.append((calculate_psnr(out, gt_bgr, 0), calculate_ssim(out, gt_bgr, 0), periodic_artifact_db(out, blur_bgr),
                     calculate_psnr(coarse, gt_bgr, 0), calculate_ssim(coarse, gt_bgr, 0)))
        images.append(np.concatenate([blur_bgr, out, gt_bgr], axis=1))
    mean = np.mean(rows, axis=0)
    return {'psnr': float(mean[0]), 'ssim': float(mean[1]), 'artifact_db': float(mean[2]),
            'coarse_psnr': float(mean[3]), 'coarse_ssim': float(mean[4])}, images


def _model_runner(model):
    def run(lq):
        model.feed_data({'lq': lq})
        model.test()
        return model.output
    return run


def _log_scores(name, it, label, metrics):
    """One stderr line of a variant's scores at curve iteration ``it`` (printed with ``--log-every``)."""
    print(f'  {name} [{it}] {label} ' + ' '.join(f'{k}={v:.4f}' for k, v in metrics.items()),
          file=sys.stderr, flush=True)


def _train(model, loader_iter, iters, start, args, val, curve, name, model_start=0):
    """``iters`` iterations; evaluates (and with ``--keep`` saves) every ``--eval-every``; ``--log-every``
    prints the losses to stderr. ``start`` numbers the curve, ``model_start`` the model's own iterations (its
    schedule and checkpoints: a warm start's ITER; a new stage's 0). Returns the last evaluation's images."""
    import math
    last = None
    warmup = model.opt['train'].get('warmup_iter', -1)
    for it in range(model_start + 1, model_start + iters + 1):
        model.update_learning_rate(it, warmup_iter=warmup)  # as basicsr's train loop: the options' scheduler
        batch = next(loader_iter)
        model.feed_data(batch)
        model.optimize_parameters(it)
        if args.log_every and it % args.log_every == 0:
            log = model.get_current_log()
            print(f'  {name} [{start + it - model_start}] ' + ' '.join(f'{k}={v:.3g}' for k, v in log.items()),
                  file=sys.stderr, flush=True)
        if it % args.eval_every == 0 or it == model_start + iters:
            metrics, last = evaluate(_model_runner(model), val)
            curve.append({'iter': start + it - model_start, **metrics})
            if args.log_every:
                _log_scores(name, start + it - model_start, 'val', metrics)
            if args.keep:
                model.save(0, it)
            if not all(math.isfinite(v) for v in metrics.values()):
                break
    return last


def run_variant(name, spec, args, data_roots, work):
    """Train one variant; returns its result dict (curve, final metrics, seconds, final images)."""
    import logging

    import torch
    import tpdiff_plugin  # noqa: F401  (registers the plugin, mends basicsr)
    from basicsr.models import build_model
    logging.getLogger('basicsr').setLevel(logging.WARNING)  # network summaries would bury the table
    from basicsr.utils import set_random_seed
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    kind = spec.get('kind', 'tpdiff')
    data_root = data_roots[spec.get('data', 'matched')]
    val = _val_images(data_root)
    t0 = time.time()
    curve = []
    identity_metrics, images = evaluate(lambda lq: lq, val)
    curve.append({'iter': 0, **identity_metrics})
    if kind == 'identity':
        return {'name': name, 'kind': kind, 'curve': curve, 'seconds': 0.0, 'images': images}
    result = {'name': name, 'kind': kind}
    total = args.iters + args.stage2_iters
    num_gpu = 1 if args.device == 'cuda' else 0
    one_stage = kind in ('cycle', 'supervised')  # they train the whole budget in one run
    opt = build_options(args.stage1_opt, spec, 1, data_root, work, f'{name}-s1', num_gpu,
                        iters=total if one_stage else args.iters)
    if one_stage:
        opt['network_g']['use_dm'] = False
        for key in ('network_tpe', 'stage'):
            opt.pop(key, None)
        opt['model_type'] = 'UnpairedCycleModel'
    if kind == 'supervised':
        opt['model_type'] = 'SRModel'
        train = opt['datasets']['train']
        train.update(type='PairedImageDataset', dataroot_lq=train.pop('dataroot_blur'),
                     dataroot_gt=os.path.join(data_root, 'train_blur_gt.lmdb'), io_backend={'type': 'lmdb'})
        train.pop('dataroot_sharp')
        # only what SRModel reads: none of the unpaired game's losses and options
        opt['train'] = {k: v for k, v in opt['train'].items()
                        if k in ('optim_g', 'scheduler', 'total_iter', 'warmup_iter', 'ema_decay')}
        opt['train']['pixel_opt'] = {'type': 'L1Loss', 'loss_weight': 1.0}
        opt['train']['optim_g']['betas'] = [0.9, 0.99]  # basicsr's supervised default (0.5 is for GANs)
        for key in [k for k in opt if k.startswith('network_') and k != 'network_g']:
            opt.pop(key)
    warm = args.warm_iter if kind == 'tpdiff' else 0
    if warm:
        _stage1_paths(opt, args.warm_folder, warm, every_network=True)
    set_random_seed(args.seed + warm)
    model = build_model(opt)
    loader = _batches(_loader(opt['datasets']['train'], args.seed + warm))
    if kind != 'tpdiff':
        images = _train(model, loader, total, 0, args, val, curve, name) or images
    else:
        if warm:
            _warm_start(model, args.warm_folder, warm)
            metrics, images = evaluate(_model_runner(model), val)  # where the curve picks up (0 stays the input)
            curve.append({'iter': warm, **metrics})
        images = _train(model, loader, args.iters - warm, warm, args, val, curve, name, model_start=warm) or images
        if args.stage2_iters > 0:
            model.save(0, args.iters)
            opt2 = build_options(args.stage2_opt, spec, 2, data_root, work, f'{name}-s2', num_gpu,
                                 iters=args.stage2_iters)
            _stage1_paths(opt2, os.path.join(work, f'{name}-s1'), args.iters)
            set_random_seed(args.seed + 1)
            model = build_model(opt2)
            # scored before any stage-2 step: the change from stage 1's last point is the prior's alone (stage 1
            # validates with the TPE memory's prior, stage 2 with its DM's sample); round 9 found the drop there
            handover, _ = evaluate(_model_runner(model), val)
            result['stage2_start'] = {'iter': args.iters, **handover}
            if args.log_every:
                _log_scores(name, args.iters, 'stage 2 before training:', handover)
            images = _train(model, loader, args.stage2_iters, args.iters, args, val, curve, name) or images
    result.update(curve=curve, seconds=time.time() - t0, images=images)
    return result


def _run_in_child(name, spec, args, data_roots, work):
    import contextlib
    import io
    import traceback
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):  # basicsr prints network summaries; keep the table readable
            return run_variant(name, spec, args, data_roots, work)
    except Exception as e:  # one broken variant must not lose the others' hours of training
        return {'name': name, 'kind': spec.get('kind', 'tpdiff'), 'error': f'{type(e).__name__}: {e}',
                'traceback': traceback.format_exc()}


def format_table(results, input_metrics):
    lines = [f'input (blurry): {input_metrics["psnr"]:.2f} dB / {input_metrics["ssim"]:.4f} SSIM', '',
             '| variant | PSNR | SSIM | gain dB | artifact dB | coarse part | best PSNR (iter) | PSNR curve (iter: dB) | min |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in results:
        if 'error' in r:
            lines.append(f'| {r["name"]} | failed: {r["error"]} | | | | | | | |')
            continue
        last = r['curve'][-1]
        best = max(r['curve'], key=lambda c: c['psnr'])
        curve = ' '.join(f'{c["iter"]}:{c["psnr"]:.2f}' for c in r['curve'])
        lines.append(f'| {r["name"]} | {last["psnr"]:.2f} | {last["ssim"]:.4f} | {last["psnr"] - input_metrics["psnr"]:+.2f} '
                     f'| {last["artifact_db"]:+.2f} | {last["coarse_psnr"]:.2f} / {last["coarse_ssim"]:.4f} '
                     f'| {best["psnr"]:.2f} ({best["iter"]}) | {curve} | '
                     f'{r["seconds"] / 60:.1f} |')
    return '\n'.join(lines)


def main(argv=None):
    args = parse_args(argv)
    variants = define_variants(args.define, VARIANTS)
    if args.list:
        for name, spec in variants.items():
            print(f'{name}: {json.dumps(spec)}')
        return 0
    names = [n for n in args.variants.split(',') if n]
    unknown = [n for n in names if n not in variants]
    if unknown:
        print(f'unknown variant(s): {", ".join(unknown)} (known: {", ".join(variants)})', file=sys.stderr)
        return 2
    if args.threads is None and args.jobs > 1:
        args.threads = 1
    import tpdiff_plugin  # noqa: F401
    from tpdiff_plugin.data.demo_set import build_demo
    with tempfile.TemporaryDirectory(prefix='tpdiff-quality-') as tmp:
        work = os.path.abspath(args.keep) if args.keep else tmp
        os.makedirs(work, exist_ok=True)
        data_roots = {}
        for domains in sorted({variants[n].get('data', 'matched') for n in names}):
            if args.data and domains == 'matched':
                data_roots[domains] = args.data
            else:
                data_roots[domains] = os.path.join(work, f'demo-{domains}')
                build_demo(data_roots[domains], seed=0, domains=domains)
        print(f'quality harness: {len(names)} variants, {args.iters} + {args.stage2_iters} iterations, '
              f'eval every {args.eval_every}, seed {args.seed}, {args.jobs} job(s)', flush=True)
        t0 = time.time()
        results = {}
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, mp_context=get_context('spawn')) as pool:
                futures = {n: pool.submit(_run_in_child, n, variants[n], args, data_roots, work) for n in names}
                for n in names:
                    results[n] = futures[n].result()
                    _report_one(results[n])
        else:
            for n in names:
                results[n] = _run_in_child(n, variants[n], args, data_roots, work)
                _report_one(results[n])
        ordered = [results[n] for n in names]
        good = [r for r in ordered if 'error' not in r]
        if not good:
            return 1
        input_metrics = good[0]['curve'][0]
        print()
        print(format_table(ordered, input_metrics))
        print(f'\n(gain: last PSNR minus the input\'s; artifact: periodic peaks added over the input, dB; '
              f'coarse part: PSNR / SSIM of the input plus the change blurred by {COARSE_SIGMA} px; min: training minutes; total {(time.time() - t0) / 60:.1f} min)')
        if args.out:
            import cv2
            import numpy as np
            os.makedirs(args.out, exist_ok=True)
            for r in good:
                cv2.imwrite(os.path.join(args.out, f'{r["name"]}.png'), np.concatenate(r['images'], axis=0))
        if args.json:
            with open(args.json, 'w', encoding='utf-8') as f:
                json.dump({'args': vars(args), 'input': input_metrics,
                           'variants': [{k: v for k, v in r.items() if k != 'images'} for r in ordered]}, f, indent=1)
    return 0 if len(good) == len(ordered) else 1


def _report_one(r):
    if 'error' in r:
        print(f'  FAILED: {r["name"]}: {r["error"]}\n{r["traceback"]}', flush=True)
        return
    curve = ' '.join(f'{c["iter"]}:{c["psnr"]:.2f}/{c["artifact_db"]:+.1f}' for c in r['curve'])
    print(f'  done: {r["name"]} ({r["seconds"] / 60:.1f} min) PSNR/artifact dB by iteration: {curve}', flush=True)
    if 'stage2_start' in r:
        print(f'        stage 2 before training (its DM\'s prior): {r["stage2_start"]["psnr"]:.2f} dB', flush=True)


if __name__ == '__main__':
    sys.exit(main())
