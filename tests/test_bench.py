"""Smoke tests of bench/run.py --quick (every row, finite positive numbers, no timing asserts) and bench/quality.py."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, bench_module, run_cmd


def test_bench_quick_prints_every_row(tmp_path):
    PROFILE_ROWS = bench_module('components').ROW_NAMES
    run = bench_module('run')
    ROW_NAMES = run.ROW_NAMES + run.AMP_ROW_NAMES + PROFILE_ROWS  # --amp bf16: 3 more tiny training iterations (~3 s)
    out = tmp_path / 'bench.json'
    res = run_cmd([sys.executable, str(REPO / 'bench' / 'run.py'), '--quick', '--profile', '--amp', 'bf16', '--json',
                   str(out)], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    printed = {line.split('|')[0].strip(): line.split('|')[1].strip() for line in res.stdout.splitlines()
               if line.count('|') >= 3}
    rows = {r['row']: r for r in json.loads(out.read_text())['rows']}
    assert list(rows) == list(ROW_NAMES)
    skipped_in_quick = {'peak memory, one tile', 'est. peak memory, 3840x2160 tiled'}
    has_model = (REPO / 'options' / 'demo' / 'stage2.yml').is_file() and \
        (REPO / 'tpdiff_plugin' / 'models' / 'tpdiff_model.py').is_file()
    for name in ROW_NAMES:
        assert name in printed, name
        value = rows[name]['value']
        if name in skipped_in_quick or (name.startswith('stage-2') and not has_model):
            assert value is None and printed[name] == 'skipped'
            continue
        if name == 'profile: other':  # the forward's time outside the hooked modules: may round to ~0
            assert value is not None and math.isfinite(value), value
            continue
        assert value is not None and math.isfinite(value) and value > 0, (name, value)
        assert math.isclose(float(printed[name]), value, rel_tol=1e-2, abs_tol=1e-3), name
    # the parameter ratio is the two networks' own counts
    from basicsr.archs import build_network
    from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    expected = count(TPDiffNet()) / count(build_network({'type': 'PeerRestormer'}))
    assert math.isclose(rows['TP-Diff / Restormer params']['value'], expected, rel_tol=1e-9)
    assert 'T=8 steps' in rows['DM sampling share of TP-Diff']['note']
    # the component shares are exclusive and cover the hooked forward; the levels are parts of it
    components = [rows[n]['value'] for n in PROFILE_ROWS if not n.startswith('profile: level')]
    assert math.isclose(sum(components), 100, abs_tol=1e-6)
    assert sum(rows[n]['value'] for n in PROFILE_ROWS if n.startswith('profile: level')) < 100
    assert 'allocator: ' in res.stdout
    assert os.path.isfile(out)


def test_quality_quick_trains_and_scores_the_variants(tmp_path):
    """bench/quality.py --quick: identity, recipe and supervised, 10 + 10 iterations, scored on the demo val set."""
    out = tmp_path / 'quality.json'
    res = run_cmd([sys.executable, str(REPO / 'bench' / 'quality.py'), '--quick', '--json', str(out),
                   '--out', str(tmp_path / 'png')], cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    variants = {v['name']: v for v in result['variants']}
    assert list(variants) == ['identity', 'recipe', 'supervised']
    assert [c['iter'] for c in variants['recipe']['curve']] == [0, 10, 20]  # through stage 1 and stage 2
    assert [c['iter'] for c in variants['supervised']['curve']] == [0, 10, 20]
    # the stage-2 model is scored once before it trains (the prior's share of the hand-over); one-stage kinds have none
    start = variants['recipe']['stage2_start']
    assert start['iter'] == 10 and set(start) == set(variants['recipe']['curve'][1])
    assert all(math.isfinite(v) for v in start.values()) and 'stage2_start' not in variants['supervised']
    identity = variants['identity']['curve'][-1]
    assert identity == result['input'] and identity['artifact_db'] == 0
    assert 15 < identity['psnr'] < 40 and 0 < identity['ssim'] < 1
    for v in variants.values():
        assert all(math.isfinite(x) for c in v['curve'] for x in c.values())
    rows = [line for line in res.stdout.splitlines() if line.startswith('| ')]
    assert [r.split('|')[1].strip() for r in rows[1:]] == ['identity', 'recipe', 'supervised']
    assert sorted(os.listdir(tmp_path / 'png')) == ['identity.png', 'recipe.png', 'supervised.png']


def test_quality_variant_definitions():
    quality = bench_module('quality')
    variants = quality.define_variants(
        ['x=recipe,train.r1_weight=10,train.identity_opt={type: L1Loss, loss_weight: 0.5},train.optim_g.lr=5e-5'],
        quality.VARIANTS)
    assert variants['x'] == {'kind': 'tpdiff', 'train.r1_weight': 10,
                             'train.identity_opt': {'type': 'L1Loss', 'loss_weight': 0.5}, 'train.optim_g.lr': 5e-5}
    # every "shipped+change" row is the shipped recipe with exactly that change's keys taken out
    for change, keys in quality.CHANGES.items():
        row = variants[f'shipped+{change}']
        assert set(quality.SHIPPED) - set(row) == set(keys)
    opt = quality.build_options(quality.STAGE2, variants['shipped'], 2, '/data', '/tmp/q-test', 'v')
    assert 'pretrain_network_d_sharp' not in opt['path'] and opt['train']['dm_target'] == 'batch'
    # the first recipe had a constant rate, no EMA of G and no DM warm-up (rounds 9 and 10 added them)
    assert opt['train']['scheduler']['type'] == 'MultiStepLR' and not opt['train']['scheduler']['milestones']
    assert not {'ema_decay', 'dm_warmup_iter', 'dm_lr'} & set(opt['train'])
    assert opt['datasets']['train']['dataroot_blur'] == '/data/train_blur.lmdb'
    with pytest.raises(SystemExit):
        quality.define_variants(['y=nope,train.r1_weight=1'], quality.VARIANTS)


def test_quality_budget_defaults_to_the_options_total_iter(tmp_path):
    import yaml
    quality = bench_module('quality')
    opt = yaml.safe_load(open(quality.STAGE2, encoding='utf-8'))
    opt['train']['total_iter'] = 123
    path = tmp_path / 'stage2.yml'
    path.write_text(yaml.safe_dump(opt))
    args = quality.parse_args(['--stage2-opt', str(path)])
    assert args.stage2_iters == 123 and args.iters == yaml.safe_load(open(quality.STAGE1))['train']['total_iter']
    assert quality.parse_args(['--stage2-opt', str(path), '--stage2-iters', '5']).stage2_iters == 5
    assert (quality.parse_args(['--quick']).iters, quality.parse_args(['--quick']).stage2_iters) == (10, 10)


def test_quality_stretches_a_whole_budget_cosine_and_the_dm_warmup_to_the_runs_budget():
    quality = bench_module('quality')
    import yaml
    total1 = yaml.safe_load(open(quality.STAGE1, encoding='utf-8'))['train']['total_iter']
    assert total1 % 4 == 0  # periods of 3/4 and 1/4 of stage 1's budget: 751 + 250 of 1001 iterations
    cos = {'type': 'CosineAnnealingRestartLR', 'periods': [total1 * 3 // 4, total1 // 4], 'restart_weights': [1, 1]}
    opt = quality.build_options(quality.STAGE1, {'train.scheduler': cos}, 1, '/data', '/tmp/q-test', 'v', iters=1001)
    assert opt['train']['total_iter'] == 1001 and opt['train']['scheduler']['periods'] == [751, 250]
    # periods spelled out for another length stay as given; other schedulers are left alone
    own = dict(cos, periods=[2000])
    opt = quality.build_options(quality.STAGE1, {'train.scheduler': own}, 1, '/data', '/tmp/q-test', 'v', iters=1000)
    assert opt['train']['scheduler']['periods'] == [2000] and opt['train']['total_iter'] == 1000
    # the demo recipe's own cosine (one period over the stage) follows the run's budget as well
    opt = quality.build_options(quality.STAGE2, quality.VARIANTS['recipe'], 2, '/data', '/tmp/q-test', 'v', iters=1000)
    assert opt['train']['scheduler']['periods'] == [1000] and opt['train']['total_iter'] == 1000
    # and its DM-only start keeps its share of the budget, unless the variant sets its own
    train = yaml.safe_load(open(quality.STAGE2, encoding='utf-8'))['train']
    warmup, total = train['dm_warmup_iter'], train['total_iter']

    def warmup_at(iters, overrides=None):
        opt = quality.build_options(quality.STAGE2, overrides or {}, 2, '/data', '/tmp/q-test', 'v', iters=iters)
        return opt['train']['dm_warmup_iter']
    assert warmup_at(1000) == round(warmup * 1000 / total) and warmup_at(10) == round(warmup * 10 / total)
    assert warmup_at(total) == warmup and 0 < warmup_at(10) < 10  # a --quick stage 2 trains DN too
    assert warmup_at(1000, {'s2:train.dm_warmup_iter': 7}) == 7
    step = {'type': 'MultiStepLR', 'milestones': [], 'gamma': 0.5}
    opt = quality.build_options(quality.STAGE1, {'train.scheduler': step}, 1, '/data', '/tmp/q-test', 'v', iters=1000)
    assert opt['train']['scheduler'] == step


def test_quality_coarse_part_keeps_only_the_coarse_change():
    """coarse_part: a uniform change passes whole, a 2-px checkerboard change is removed, and the input is its own
    coarse part."""
    import numpy as np
    quality = bench_module('quality')
    rng = np.random.default_rng(0)
    blur = rng.integers(40, 200, (32, 32, 3)).astype(np.uint8)
    assert np.array_equal(quality.coarse_part(blur, blur), blur)
    brighter = blur + np.uint8(10)
    assert np.array_equal(quality.coarse_part(brighter, blur), brighter)
    checker = ((np.indices((32, 32)).sum(0) % 2) * 2 - 1)[..., None] * 20
    patterned = (blur.astype(int) + checker).astype(np.uint8)
    assert np.abs(quality.coarse_part(patterned, blur).astype(int) - blur).max() <= 3  # 20 grey levels -> at most 3


def test_heldout_scores_only_photos_the_training_set_never_saw(tmp_path, capsys):
    """bench/heldout.py: the pool's pairs from photos outside --trained-on, scored through Deblurrer."""
    import cv2
    import numpy as np
    from conftest import tiny_net, tiny_net_opts
    from tpdiff_plugin.data.demo_set import build_demo
    from tpdiff_plugin.utils.checkpoint import save_networks
    heldout = bench_module('heldout')
    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(3)
    cv2.imwrite(str(photos / 'mine.png'), cv2.resize(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8), (900, 600),
                                                     interpolation=cv2.INTER_NEAREST))
    build_demo(str(tmp_path / 'pool'), seed=0, photos_dir=str(photos))
    build_demo(str(tmp_path / 'demo'), seed=0)
    pairs = heldout.heldout_pairs(str(tmp_path / 'pool'), str(tmp_path / 'demo'))
    assert pairs and {k.split('-', 1)[0] for k, *_ in pairs} == {'mine'}  # the demo's own photos are left out
    key, lq, blur, sharp = pairs[0]
    assert lq.shape == (1, 3) + blur.shape[:2] and blur.shape == sharp.shape and not np.array_equal(blur, sharp)
    assert len(heldout.heldout_pairs(str(tmp_path / 'pool'), str(tmp_path / 'demo'), every=2)) == (len(pairs) + 1) // 2
    with pytest.raises(SystemExit, match='nothing is held out'):
        heldout.heldout_pairs(str(tmp_path / 'demo'), str(tmp_path / 'demo'))

    ident, moved = tmp_path / 'ident.pth', tmp_path / 'moved.pth'
    save_networks([tiny_net(identity_init=True)], ['params'], str(ident), tiny_net_opts(identity_init=True))
    save_networks([tiny_net()], ['params'], str(moved), tiny_net_opts())
    out = tmp_path / 'scores.json'
    heldout.main([str(ident), str(moved), '--pool', str(tmp_path / 'pool'), '--trained-on', str(tmp_path / 'demo'),
                  '--json', str(out)])
    rows = json.loads(out.read_text())['rows']
    assert [r['name'] for r in rows] == ['input (blurry)', str(ident), str(moved)]
    assert rows[1]['psnr'] == rows[0]['psnr'] and rows[1]['ssim'] == rows[0]['ssim'] and rows[1]['artifact_db'] == 0
    assert abs(rows[2]['psnr'] - rows[0]['psnr']) > 1e-3  # a net that changes the images scores differently
    assert f'{len(pairs)} held-out pairs from 1 photo(s)' in capsys.readouterr().out


def test_quality_training_loop_steps_the_options_scheduler(monkeypatch):
    """bench/quality.py's loop calls update_learning_rate as basicsr's does (else train.scheduler would be ignored)."""
    import types
    quality = bench_module('quality')
    calls = []

    class Model:
        opt = {'train': {'warmup_iter': 2}}

        def update_learning_rate(self, it, warmup_iter):
            calls.append(('lr', it, warmup_iter))

        def feed_data(self, batch):
            calls.append(('data', batch))

        def optimize_parameters(self, it):
            calls.append(('step', it))

    monkeypatch.setattr(quality, 'evaluate', lambda run, val: ({'psnr': 1.0}, None))
    args = types.SimpleNamespace(eval_every=100, log_every=0, keep=None)
    curve = []
    quality._train(Model(), iter(['b1', 'b2']), 2, 5, args, [], curve, 'x')
    assert calls == [('lr', 1, 2), ('data', 'b1'), ('step', 1), ('lr', 2, 2), ('data', 'b2'), ('step', 2)]
    assert curve == [{'iter': 7, 'psnr': 1.0}]


def test_quality_warm_start_continues_a_kept_run_with_the_variants_options(tmp_path):
    """--warm-start DIR:ITER: the networks, Adam moments and step counts of a --keep run at ITER carry on, the curve
    picks up at ITER (with the kept networks' score there), and the variant's own learning rate and schedule apply,
    the schedule counted in the run's iterations (a milestone at 3 halves the rate from iteration 4 on, as in a run
    from scratch)."""
    import torch
    quality = bench_module('quality')
    keep, warm = tmp_path / 'keep', tmp_path / 'warm'
    common = ['--stage2-iters', '0', '--eval-every', '2', '--threads', '1']
    assert quality.main(['--variants', 'recipe', '--iters', '2', '--keep', str(keep), '--json',
                         str(tmp_path / 'a.json'), *common]) == 0
    source = keep / 'recipe-s1'
    slow = 'slow=recipe,train.optim_g.lr=1e-5,train.scheduler={type: MultiStepLR, milestones: [3], gamma: 0.5}'
    assert quality.main(['--define', slow, '--variants', 'slow', '--iters', '4',
                         '--data', str(keep / 'demo-matched'), '--warm-start', f'{source}:2', '--keep', str(warm),
                         '--json', str(tmp_path / 'b.json'), *common]) == 0
    first = json.loads((tmp_path / 'a.json').read_text())['variants'][0]['curve']
    curve = json.loads((tmp_path / 'b.json').read_text())['variants'][0]['curve']
    assert [c['iter'] for c in curve] == [0, 2, 4]
    assert curve[0] == first[0] and curve[1] == first[1]  # the input, then the kept networks as they were
    assert curve[2] != curve[1]
    state = torch.load(warm / 'slow-s1' / 'training_states' / '4.state', weights_only=True)
    adam = state['optimizers'][0]
    assert {float(s['step']) for s in adam['state'].values()} == {4.0}  # 2 kept + 2 new steps, not 2
    assert adam['param_groups'][0]['lr'] == pytest.approx(0.5e-5)  # the variant's 1e-5, halved at the milestone
    assert state['optimizers'][1]['param_groups'][0]['lr'] == pytest.approx(1e-4)  # D: the options' 2e-4, halved
    assert sorted(os.listdir(warm / 'slow-s1' / 'models')) == sorted(
        n.replace('_2.pth', '_4.pth') for n in os.listdir(source / 'models') if n.endswith('_2.pth'))
    with pytest.raises(SystemExit):
        quality.parse_args(['--warm-start', f'{source}:3'])  # no such state
    with pytest.raises(SystemExit):
        quality.parse_args(['--warm-start', f'{source}:2', '--iters', '2'])  # nothing left to train


def test_skipped_training_rows_keep_their_names_units_and_reason():
    """--no-train (or no TPDiffModel): the stage-2 rows, and --amp bf16's, are printed as skipped with the units of
    the values they stand for (ms; the fp32 / bf16 ratio in x) and the reason in the note."""
    run = bench_module('run')
    for amp, names in (('none', run.TRAIN_ROW_NAMES), ('bf16', run.TRAIN_ROW_NAMES + run.AMP_ROW_NAMES)):
        table = run.Table()
        run.skip_training_rows(table, amp, 'skipped (--no-train)')
        assert [r['row'] for r in table.rows] == list(names)
        assert [r['unit'] for r in table.rows] == ['ms'] * (len(names) - 1) + ['x' if amp == 'bf16' else 'ms']
        assert all(r['value'] is None and r['note'] == 'skipped (--no-train)' for r in table.rows)
    assert run.ROW_NAMES[-3:] == run.TRAIN_ROW_NAMES


def _git_copy_of_the_code(dest):
    """The package, bench/ and the options in a fresh one-commit git repository at ``dest`` (so the test needs no
    git checkout of its own and leaves the checkout's worktree list alone)."""
    ignore = shutil.ignore_patterns('__pycache__', '*.pyc')
    for name in ('tpdiff_plugin', 'bench'):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    os.symlink('tpdiff_plugin/options', dest / 'options')
    git = ['git', '-c', 'user.name=test', '-c', 'user.email=test@example.com']
    for cmd in (['init', '-q'], ['add', '-A'], ['commit', '-q', '-m', 'copy']):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)
    return dest


def test_versus_compares_a_baseline_worktree_with_this_tree(tmp_path):
    """bench/versus.py against HEAD: two workers (a git worktree of HEAD and the tree itself) each time a forward
    and save its output; with the same network code the outputs agree to float rounding, and the table has its
    row. Bad arguments are one clear error each."""
    script = str(_git_copy_of_the_code(tmp_path / 'repo') / 'bench' / 'versus.py')
    out = tmp_path / 'versus.json'
    res = run_cmd([sys.executable, script, '--baseline', 'HEAD', '--what', 'inference', '--size', '32x32',
                   '--rounds', '1', '--repeats', '1', '--json', str(out)], cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())['results']['inference']
    assert result['baseline'] > 0 and result['this tree'] > 0
    assert result['max_abs_diff'] < 1e-4  # HEAD's network code against this tree's: float rounding at most
    assert result['extra']['this tree']['change'] > 1e-4  # perturbed weights: the output is not the input
    assert 'inference forward (s)' in res.stdout
    for args, message in ((['--what', 'speed'], '--what'), (['--baseline', 'no-such-rev'], '--baseline')):
        bad = run_cmd([sys.executable, script, *args], cwd=tmp_path, timeout=60)
        assert bad.returncode != 0 and message in bad.stderr, bad.stderr[-500:]
