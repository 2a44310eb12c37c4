"""UnpairedCycleModel's numerical guard: a NaN/Inf loss skips the update, is logged, and too many in a row stop
training with a one-line error while the checkpoints already written stay intact."""
import logging
import math
import sys
import textwrap

import pytest
import torch

from conftest import run_cmd
from test_determinism import demo_data, tiny_options, write_options  # noqa: F401  (fixture)
from model_helpers import batch, build
from test_unpaired_cycle_model import make_opt
from tpdiff_plugin.utils.errors import UserError


def nan_batch(seed):
    data = batch(seed)
    data['lq'][0, 0, 3, 5] = float('nan')
    return data


def snapshot(model):
    # parameters (spectral norm's power-iteration buffers move on every D forward, by design)
    nets = {label: {k: v.detach().clone() for k, v in model.bare(label).named_parameters()}
            for label in model.net_labels}
    optim = [{i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for i, s in o.state_dict()['state'].items()}
             for o in model.optimizers]
    pools = {k: [t.clone() for t in p.images] for k, p in model.pools.items()}
    return nets, optim, pools


def same(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.fixture
def warnings_log():
    """Text of the warnings on basicsr's logger (it does not propagate to the root logger caplog reads)."""
    import io
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger('basicsr')
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


@pytest.fixture(params=['none', 'bf16'], ids=['fp32', 'amp_bf16'])
def model(request):
    """A trained-once model, in fp32 and under ``train.amp: bf16`` (the guard must cover both)."""
    m = build(make_opt(pool_size=4, max_bad_iters=3, amp=request.param))
    m.feed_data(batch(0))
    m.optimize_parameters(1)  # optimizers and pools hold state already
    return m


def test_nan_input_skips_every_update_and_names_the_terms(model, warnings_log):
    before = snapshot(model)
    model.feed_data(nan_batch(1))
    model.optimize_parameters(2)
    assert same(before, snapshot(model))  # no G step, no D step, no pool push, Adam state untouched
    assert model.bad_iters == 1
    assert 'iter 2: non-finite' in warnings_log.getvalue() and 'l_cyc_blur' in warnings_log.getvalue() and 'l_g_total' in warnings_log.getvalue()
    assert 'l_cyc_sharp' not in warnings_log.getvalue().split('non-finite')[1].split(';')[0]  # only the bad terms
    assert math.isnan(model.get_current_log()['l_g_total'])

    model.feed_data(batch(2))  # a good batch updates everything again and resets the count
    model.optimize_parameters(3)
    after = snapshot(model)
    assert not same(before[0]['g'], after[0]['g']) and not same(before[0]['d_sharp'], after[0]['d_sharp'])
    assert model.bad_iters == 0


def test_bad_discriminator_loss_skips_only_the_d_step_and_the_pool_push(model, monkeypatch, warnings_log):
    gan = model.cri_gan

    def nan_for_d(pred, target, is_disc=False):
        loss = gan(pred, target, is_disc=is_disc)
        return loss * float('inf') if is_disc else loss

    monkeypatch.setattr(model, 'cri_gan', nan_for_d)
    before = snapshot(model)
    model.feed_data(batch(1))
    model.optimize_parameters(2)
    after = snapshot(model)
    assert not same(before[0]['g'], after[0]['g'])  # the G step (finite) happened
    assert all(same(before[0][d], after[0][d]) for d in model.discriminator_labels)
    assert same(before[1][1], after[1][1])  # optim_d state unchanged
    assert same(before[2], after[2])  # pools as before the iteration
    assert 'l_d_sharp_real' in warnings_log.getvalue() and 'skipped the D update' in warnings_log.getvalue()
    assert model.bad_iters == 1


def test_too_many_bad_iterations_in_a_row_stop_training(model):
    for it in (2, 3):
        model.feed_data(nan_batch(it))
        model.optimize_parameters(it)
    model.feed_data(batch(4))
    model.optimize_parameters(4)  # a good one in between: the count starts again
    for it in (5, 6):
        model.feed_data(nan_batch(it))
        model.optimize_parameters(it)
    model.feed_data(nan_batch(7))
    with pytest.raises(UserError, match=r'train.max_bad_iters: 3 iterations in a row \(up to iter 7\)'):
        model.optimize_parameters(7)


@pytest.mark.parametrize('value', [0, -1, 'ten', 2.5])
def test_max_bad_iters_must_be_a_positive_integer(value):
    with pytest.raises(UserError, match='train.max_bad_iters'):
        build(make_opt(max_bad_iters=value))


def test_basicsr_train_stops_with_exit_2_and_keeps_the_last_checkpoint(tmp_path, demo_data):
    """End to end: from the 25th item on (iteration 13) the dataset yields NaN blurry patches."""
    opt = tiny_options(demo_data, 'nan', total_iter=30, save_freq=5)
    opt['train']['max_bad_iters'] = 4
    opt_path = write_options(tmp_path, opt)
    script = textwrap.dedent(f"""
        import sys, torch
        import tpdiff_plugin
        from tpdiff_plugin.data.unpaired_image_dataset import UnpairedImageDataset
        get, calls = UnpairedImageDataset._item, [0]  # every item, fetched one by one or as a batch
        def poisoned(self, index, batch):
            item = get(self, index, batch)
            calls[0] += 1
            if calls[0] > 24:
                item['lq'] = item['lq'] * float('nan')
            return item
        UnpairedImageDataset._item = poisoned
        from tpdiff_plugin.cli import basicsr_main
        sys.exit(basicsr_main(['train', '-opt', {str(opt_path)!r}]))
    """)
    res = run_cmd([sys.executable, '-c', script], cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('error: train.max_bad_iters: 4 iterations in a row (up to iter 16)'), last
    exp = tmp_path / 'experiments' / 'nan'
    assert sorted(p.name for p in (exp / 'training_states').glob('*.state')) == ['10.state', '15.state', '5.state']
    assert not (exp / 'models' / 'net_g_latest.pth').exists()
    for it in (10, 15):
        ckpt = torch.load(exp / 'models' / f'net_g_{it}.pth', weights_only=True)['params']
        assert all(torch.isfinite(v).all() for v in ckpt.values())
    # iterations 13-15 changed nothing, so the checkpoint at 15 holds the weights of iteration 12
    state = torch.load(exp / 'training_states' / '15.state', weights_only=True)
    assert state['bad_iters'] == 3
    assert all(s['step'] == 12 for s in state['optimizers'][0]['state'].values())
