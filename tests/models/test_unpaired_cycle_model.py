"""UnpairedCycleModel with ReblurUNet as both DN and RN: losses, weights, optimizers, pool, validation, resume."""
import copy
import math
import os

import pytest
import torch

from basicsr.metrics import calculate_psnr
from basicsr.models.sr_model import SRModel
from basicsr.utils import tensor2img
from basicsr.utils.misc import check_resume
from tpdiff_plugin.archs.arch_util import is_channels_last
from tpdiff_plugin.models.history_pool import ImageHistoryPool
from tpdiff_plugin.models.unpaired_cycle_model import UnpairedCycleModel
from tpdiff_plugin.utils.errors import UserError
from model_helpers import batch, build

G_TERMS = ('l_g_gan_sharp', 'l_g_gan_blur', 'l_cyc_blur', 'l_cyc_sharp', 'l_g_wave')
D_TERMS = ('l_d_sharp_real', 'l_d_sharp_fake', 'l_d_blur_real', 'l_d_blur_fake', 'l_d_wave_real', 'l_d_wave_fake')
LABELS = ('g', 'rb', 'd_sharp', 'd_blur', 'd_wave')


def make_opt(tmp_path=None, wave=True, pool_size=4, **train):
    # identity_init off: the tests follow gradients into every layer from the first step
    unet = {'type': 'ReblurUNet', 'base_ch': 4, 'num_levels': 3, 'identity_init': False}
    disc = {'type': 'PatchDiscriminator', 'base_ch': 4, 'num_layers': 2, 'norm': 'spectral'}
    root = str(tmp_path or '/nonexistent')
    opt = {
        'name': 'cycle_test', 'model_type': 'UnpairedCycleModel', 'num_gpu': 0, 'dist': False, 'rank': 0,
        'world_size': 1, 'is_train': True, 'manual_seed': 0,
        'network_g': dict(unet), 'network_rb': dict(unet), 'network_d_sharp': dict(disc),
        'network_d_blur': dict(disc),
        'path': {'models': os.path.join(root, 'models'), 'training_states': os.path.join(root, 'training_states'),
                 'resume_state': None},
        'train': {
            'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.5, 0.999]},
            'optim_d': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.5, 0.999]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': [2], 'gamma': 0.5},
            'total_iter': 10, 'pool_size': pool_size,
            'gan_opt': {'type': 'GANLoss', 'gan_type': 'lsgan', 'loss_weight': 1.0},
            'cycle_opt': {'type': 'L1Loss', 'loss_weight': 0.1},
        },
        'val': {'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 0}}},
    }
    if wave:
        opt['network_d_wave'] = dict(disc, in_ch=9)
        opt['train']['wave_opt'] = {'type': 'WaveletGANLoss', 'gan_type': 'lsgan', 'loss_weight': 0.2}
    opt['train'].update(train)
    if tmp_path is not None:
        os.makedirs(opt['path']['models'], exist_ok=True)
        os.makedirs(opt['path']['training_states'], exist_ok=True)
    return opt


def test_registered_and_one_iteration_logs_every_term():
    model = build(make_opt())
    assert isinstance(model, UnpairedCycleModel)
    assert model.net_labels == list(LABELS)
    model.feed_data(batch(0))
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert set(log) == set(G_TERMS) | set(D_TERMS) | {'l_g_total', 'l_d_total'}
    assert all(math.isfinite(v) for v in log.values())
    assert log['l_g_total'] == pytest.approx(sum(log[k] for k in G_TERMS), rel=1e-5)
    assert log['l_d_total'] == pytest.approx(0.5 * sum(log[k] for k in D_TERMS), rel=1e-5)


@pytest.mark.parametrize('option,terms,factor', [
    ('cycle_opt', ('l_cyc_blur', 'l_cyc_sharp'), 3.0),
    ('gan_opt', ('l_g_gan_sharp', 'l_g_gan_blur'), 2.5),
    ('wave_opt', ('l_g_wave',), 4.0),
])
def test_each_loss_weight_reaches_the_logged_total(option, terms, factor):
    """Multiplying one option's loss_weight by f moves l_g_total by (f - 1) times those terms, the rest fixed."""
    opt = make_opt()
    results = []
    for weight_factor in (1.0, factor):
        o = copy.deepcopy(opt)
        o['train'][option]['loss_weight'] *= weight_factor
        model = build(o, seed=3)
        model.feed_data(batch(7))
        with torch.no_grad():
            _, losses = model.generator_losses()
        results.append({k: v.item() for k, v in losses.items()})
    base, scaled = results
    for k in terms:
        assert scaled[k] == pytest.approx(factor * base[k], rel=1e-5)
    for k in set(G_TERMS) - set(terms):
        assert scaled[k] == pytest.approx(base[k], rel=1e-6)
    expected_shift = (factor - 1) * sum(base[k] for k in terms)
    assert scaled['l_g_total'] - base['l_g_total'] == pytest.approx(expected_shift, rel=1e-4, abs=1e-7)


def test_wave_weight_zero_turns_the_wavelet_branch_off():
    opt = make_opt()
    opt['train']['wave_opt']['loss_weight'] = 0
    model = build(opt)
    assert 'd_wave' not in model.net_labels and not hasattr(model, 'net_d_wave')
    model.feed_data(batch(0))
    model.optimize_parameters(1)
    assert 'l_g_wave' not in model.get_current_log() and 'l_d_wave_real' not in model.get_current_log()


def test_wave_options_must_come_together():
    opt = make_opt()
    del opt['network_d_wave']
    with pytest.raises(UserError, match='network_d_wave is missing'):
        build(opt)
    opt = make_opt()
    del opt['train']['wave_opt']
    with pytest.raises(UserError, match='train.wave_opt is missing'):
        build(opt)


def test_optimizers_hold_exactly_their_networks():
    model = build(make_opt())
    g_ids = {id(p) for g in model.optimizer_g.param_groups for p in g['params']}
    d_ids = {id(p) for g in model.optimizer_d.param_groups for p in g['params']}
    expect_g = {id(p) for label in ('g', 'rb') for p in model.net(label).parameters()}
    expect_d = {id(p) for label in ('d_sharp', 'd_blur', 'd_wave') for p in model.net(label).parameters()}
    assert g_ids == expect_g and d_ids == expect_d
    assert len(model.schedulers) == 2


def test_generator_step_gives_no_gradient_to_discriminators_and_d_step_none_to_generators():
    model = build(make_opt())
    model.feed_data(batch(1))
    model._set_d_requires_grad(False)
    l_g, _ = model.generator_losses()
    l_g.backward()
    for label in ('d_sharp', 'd_blur', 'd_wave'):
        assert all(p.grad is None for p in model.net(label).parameters()), label
    for label in ('g', 'rb'):
        assert all(p.grad is not None for p in model.net(label).parameters()), label
    model.optimizer_g.zero_grad(set_to_none=True)
    model._set_d_requires_grad(True)
    l_d, _ = model.discriminator_losses()
    l_d.backward()
    for label in ('g', 'rb'):
        assert all(p.grad is None for p in model.net(label).parameters()), label
    for label in ('d_sharp', 'd_blur', 'd_wave'):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net(label).parameters()), label


def test_each_update_changes_only_its_networks():
    model = build(make_opt())
    model.feed_data(batch(2))
    before = {label: [p.detach().clone() for p in model.net(label).parameters()] for label in LABELS}
    model.optimize_parameters(1)
    for label in LABELS:
        changed = any(not torch.equal(a, b) for a, b in zip(before[label], model.net(label).parameters()))
        assert changed, label


def test_history_pool():
    torch.manual_seed(0)
    off = ImageHistoryPool(0)
    x = torch.rand(3, 3, 4, 4)
    assert off.query(x) is not None and torch.equal(off.query(x), x) and off.images == []
    pool = ImageHistoryPool(4)
    first = torch.rand(4, 3, 4, 4)
    assert torch.equal(pool.query(first), first)  # filling: the new images come back
    assert len(pool.images) == 4
    seen_old = seen_new = 0
    for round_ in range(1, 21):
        offset = 10.0 * round_
        new = torch.rand(4, 3, 4, 4) + offset  # larger than anything stored before
        stored_before = torch.stack(pool.images).clone()
        out = pool.query(new)
        for img in out:
            if (img >= offset).all():
                seen_new += 1
            else:
                seen_old += 1
                assert any(torch.equal(img, s) for s in stored_before)
        assert len(pool.images) == 4
    assert seen_old > 10 and seen_new > 10  # about half each (80 draws)
    state = pool.state_dict()
    other = ImageHistoryPool(4)
    other.load_state_dict(state, torch.device('cpu'))
    assert all(torch.equal(a, b) for a, b in zip(other.images, pool.images))
    pool.query(torch.rand(2, 3, 8, 8))  # another patch size: the pool restarts rather than mixing sizes
    assert len(pool.images) == 2 and pool.images[0].shape == (3, 8, 8)


class _PairedSet(torch.utils.data.Dataset):
    def __init__(self, n=2):
        g = torch.Generator().manual_seed(5)
        self.items = [(torch.rand(3, 24, 20, generator=g), torch.rand(3, 24, 20, generator=g)) for _ in range(n)]
        self.opt = {'name': 'tiny_val'}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        lq, gt = self.items[i]
        return {'lq': lq, 'gt': gt, 'lq_path': f'img{i}.png', 'gt_path': f'img{i}.png'}


def test_validation_computes_basicsr_metrics_on_the_dn_output():
    model = build(make_opt())
    for label in ('g',):  # DN = identity: output equals the input, so PSNR is the input's
        torch.nn.init.zeros_(model.net(label).out_conv.weight)
        torch.nn.init.zeros_(model.net(label).out_conv.bias)
    dataset = _PairedSet()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1)
    model.validation(loader, current_iter=1, tb_logger=None, save_img=False)
    expected = sum(calculate_psnr(tensor2img([lq]), tensor2img([gt]), crop_border=0) for lq, gt in dataset.items) / 2
    assert model.metric_results['psnr'] == pytest.approx(expected, rel=1e-6)
    assert model.net_g.training  # back to training mode after validation


def test_validation_leaves_the_training_rng_streams_as_they_were():
    """Validating draws from torch's RNG (the DataLoader iterator's seed); the model puts the streams back, so
    a run resumed from a checkpoint saved at a validation iteration goes on like the uninterrupted one."""
    import random

    import numpy as np
    model = build(make_opt())
    loader = torch.utils.data.DataLoader(_PairedSet(), batch_size=1)
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    model.validation(loader, current_iter=1, tb_logger=None, save_img=False)
    after = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    # the control: upstream's validation (SRModel's) does move torch's stream
    torch.manual_seed(3)
    SRModel.validation(model, loader, current_iter=1, tb_logger=None, save_img=False)
    moved = torch.rand(4)
    torch.manual_seed(3)
    assert not torch.equal(moved, torch.rand(4))


def test_missing_networks_and_checkpoints_are_user_errors(tmp_path):
    opt = make_opt()
    del opt['network_rb']
    with pytest.raises(UserError, match='network_rb'):
        build(opt)
    opt = make_opt()
    missing = str(tmp_path / 'nope.pth')
    opt['path']['pretrain_network_rb'] = missing
    with pytest.raises(UserError, match='path.pretrain_network_rb') as err:
        build(opt)
    assert missing in str(err.value)
    opt = make_opt()
    del opt['train']['gan_opt']
    with pytest.raises(UserError, match='train.gan_opt'):
        build(opt)
    opt = make_opt()
    opt['train']['optim_d']['type'] = 'NoSuchOptim'
    with pytest.raises(UserError, match='NoSuchOptim'):
        build(opt)


def _states_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_save_and_resume_round_trip(tmp_path):
    """Save at iter k, rebuild from the .state the way basicsr's train pipeline does, compare everything."""
    opt = make_opt(tmp_path, pool_size=3)
    model = build(opt, seed=1)
    k = 3
    for it in range(1, k + 1):
        model.update_learning_rate(it)
        model.feed_data(batch(it))
        model.optimize_parameters(it)
    model.save(epoch=0, current_iter=k)
    for label in LABELS:
        assert os.path.isfile(os.path.join(opt['path']['models'], f'net_{label}_{k}.pth'))
    state_path = os.path.join(opt['path']['training_states'], f'{k}.state')
    resume_state = torch.load(state_path, map_location='cpu', weights_only=True)
    assert resume_state['iter'] == k and len(resume_state['image_pools']['sharp']) == 3

    resumed_opt = copy.deepcopy(opt)
    resumed_opt['path']['resume_state'] = state_path
    check_resume(resumed_opt, resume_state['iter'])  # sets path.pretrain_network_<x> for every network_<x>
    fresh = build(resumed_opt, seed=99)  # different init: everything must come from the files
    fresh.resume_training(resume_state)

    for label in LABELS:
        assert _states_equal(model.bare(label).state_dict(), fresh.bare(label).state_dict()), label
    for o1, o2 in zip(model.optimizers, fresh.optimizers):
        assert _states_equal(o1.state_dict(), o2.state_dict())
    for s1, s2 in zip(model.schedulers, fresh.schedulers):
        assert s1.state_dict() == s2.state_dict()
    for name in ('sharp', 'blur'):
        assert _states_equal(model.pools[name].images, fresh.pools[name].images)

    # and training continues identically
    for m in (model, fresh):
        torch.manual_seed(123)
        m.update_learning_rate(k + 1)
        m.feed_data(batch(k + 1))
        m.optimize_parameters(k + 1)
    assert model.get_current_log() == fresh.get_current_log()
    assert model.get_current_learning_rate() == fresh.get_current_learning_rate() == [5e-4]
    for label in LABELS:
        assert _states_equal(model.bare(label).state_dict(), fresh.bare(label).state_dict()), label


def test_ema_copy_is_saved_and_used_for_validation(tmp_path):
    opt = make_opt(tmp_path, ema_decay=0.5)
    model = build(opt)
    model.feed_data(batch(0))
    model.optimize_parameters(1)
    g = dict(model.net_g.named_parameters())
    for name, p in model.net_g_ema.named_parameters():
        assert not torch.equal(p, g[name])  # half-way between the old and the new weights
    model.save(0, 1)
    saved = torch.load(os.path.join(opt['path']['models'], 'net_g_1.pth'), weights_only=True)
    assert set(saved) == {'params', 'params_ema', 'network_opt', 'tpdiff_version'}
    assert _states_equal(saved['params_ema'], model.net_g_ema.state_dict())
    # each checkpoint carries the options block its network was built from (issue 15 item 2)
    assert saved['network_opt'] == opt['network_g']
    for label in ('rb', 'd_sharp', 'd_wave'):
        saved = torch.load(os.path.join(opt['path']['models'], f'net_{label}_1.pth'), weights_only=True)
        assert saved['network_opt'] == opt[f'network_{label}'], label


# ------------------------------------------------------------------ training options beyond the paper's
def _grad_norm(loss, params):
    grads = torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)
    return sum(0 if g is None else g.abs().sum().item() for g in grads)


def test_identity_loss_runs_dn_on_the_sharp_batch():
    model = build(make_opt(identity_opt={'type': 'L1Loss', 'loss_weight': 0.5}))
    data = batch(11)
    model.feed_data(data)
    seen = []
    model.bare('g').register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
    model._set_d_requires_grad(False)
    _, losses = model.generator_losses()
    dn_in, dn_out = seen[0]
    assert dn_in.shape[0] == 6 and torch.equal(dn_in[4:], data['ref'])  # chunks: b, RN(s), s
    assert losses['l_idt'].item() == pytest.approx(0.5 * (dn_out[4:] - data['ref']).abs().mean().item(), rel=1e-5)
    assert losses['l_g_total'].item() == pytest.approx(sum(v.item() for k, v in losses.items() if k != 'l_g_total'),
                                                       rel=1e-5)
    assert _grad_norm(losses['l_idt'], model.bare('g').parameters()) > 0
    assert _grad_norm(losses['l_idt'], model.bare('rb').parameters()) == 0


def test_sharp_cycle_weight_and_its_gradient_to_rb():
    data = batch(12)
    logs = {}
    for trains_rb in (True, False):
        opt = make_opt(cycle_sharp_opt={'type': 'L1Loss', 'loss_weight': 2.0}, sharp_cycle_trains_rb=trains_rb)
        model = build(opt, seed=1)
        model.feed_data(data)
        model._set_d_requires_grad(False)
        _, losses = model.generator_losses()
        rb_grad = _grad_norm(losses['l_cyc_sharp'], model.bare('rb').parameters())
        assert (rb_grad > 0) == trains_rb  # false: the sharp cycle trains DN only
        assert _grad_norm(losses['l_cyc_sharp'], model.bare('g').parameters()) > 0
        logs[trains_rb] = {k: v.item() for k, v in losses.items()}
    assert logs[True] == pytest.approx(logs[False], rel=1e-6)  # the values are the same, only the gradient differs
    base = build(make_opt(), seed=1)
    base.feed_data(data)
    with torch.no_grad():
        _, plain = base.generator_losses()
    assert logs[True]['l_cyc_sharp'] == pytest.approx(20 * plain['l_cyc_sharp'].item(), rel=1e-5)  # 2.0 vs 0.1
    assert logs[True]['l_cyc_blur'] == pytest.approx(plain['l_cyc_blur'].item(), rel=1e-5)


def test_sharp_cycle_noise_degrades_only_dn_input_of_the_sharp_cycle():
    """DN's sharp-cycle input is RN(s) plus noise of the asked sigma, on the 8-bit grid; RN still gets gradient."""
    data = batch(15, n=4, size=32)
    model = build(make_opt(sharp_cycle_noise=[2, 2]), seed=1)
    model.feed_data(data)
    seen = []
    model.bare('g').register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model._set_d_requires_grad(False)
    _, losses = model.generator_losses()
    dn_in = seen[0]
    with torch.no_grad():
        clean = model.bare('rb')(data['ref'])
    assert torch.equal(dn_in[:4], data['lq'])  # the real blurry chunk is untouched
    inside = (clean > 0.05) & (clean < 0.95)  # away from the clamp to [0, 1]
    assert inside.float().mean() > 0.3
    noise = (dn_in[4:] - clean).detach()[inside]
    assert torch.allclose(dn_in[4:] * 255, torch.round(dn_in[4:] * 255), atol=1e-3)  # rounded to 8 bits
    # sigma 2/255 plus rounding (uniform, std 1/sqrt(12)/255): std of the difference ~ 2.02/255
    assert noise.std().item() * 255 == pytest.approx(math.sqrt(4 + 1 / 12), rel=0.1)
    assert abs(noise.mean().item()) * 255 < 0.2
    assert _grad_norm(losses['l_cyc_sharp'], model.bare('rb').parameters()) > 0  # straight-through rounding
    assert torch.equal(model.fake_b, clean)  # D_B and the pool see RN(s) itself

    # the default leaves DN's input exactly RN(s)
    plain = build(make_opt(), seed=1)
    plain.feed_data(data)
    seen.clear()
    plain.bare('g').register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        plain.generator_losses()
        assert torch.equal(seen[0][4:], plain.bare('rb')(data['ref']))


def _sharp_cycle_inputs(model, data, iterations):
    """``(clean RN(s), mask of its pixels away from 0 and 1, {iteration: DN's sharp-cycle input})``: the sharp
    half of DN's input batch in ``generator_losses`` at each of ``iterations``."""
    model.feed_data(data)
    seen = []
    hook = model.bare('g').register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    with torch.no_grad():
        clean = model.bare('rb')(data['ref'])
    inputs = {}
    for it in iterations:
        model.current_iter = it
        seen.clear()
        with torch.no_grad():
            model.generator_losses()
        inputs[it] = seen[0][len(data['ref']):]
    hook.remove()
    return clean, (clean > 0.05) & (clean < 0.95), inputs


def test_sharp_cycle_noise_ramp_grows_the_sigma_from_zero():
    """With sharp_cycle_noise_ramp N, DN's sharp-cycle input at iteration i carries noise of sigma i/N of the
    asked one (only the 8-bit rounding at iteration 0), and the full sigma from iteration N on."""
    model = build(make_opt(sharp_cycle_noise=[4, 4], sharp_cycle_noise_ramp=100), seed=1)
    clean, inside, inputs = _sharp_cycle_inputs(model, batch(15, n=4, size=32), (0, 50, 100, 400))
    stds = {it: (x - clean)[inside].std().item() * 255 for it, x in inputs.items()}
    rounding = math.sqrt(1 / 12)
    assert stds[0] == pytest.approx(rounding, rel=0.15)  # no noise yet, only the rounding
    assert stds[50] == pytest.approx(math.sqrt(2 ** 2 + 1 / 12), rel=0.1)  # half way: sigma 2
    assert stds[100] == pytest.approx(math.sqrt(4 ** 2 + 1 / 12), rel=0.1)
    assert stds[400] == pytest.approx(stds[100], rel=0.1)  # capped at the asked sigma
    with pytest.raises(UserError, match='train.sharp_cycle_noise_ramp must be an integer >= 0'):
        build(make_opt(sharp_cycle_noise=[4, 4], sharp_cycle_noise_ramp=-5))


def test_sharp_cycle_noise_start_switches_the_noise_on_later():
    """With sharp_cycle_noise_start S (and ramp N), DN's sharp-cycle input is RN(s) itself up to iteration S (not
    even rounded), then rounded and noisy, the noise's sigma growing over the next N iterations."""
    model = build(make_opt(sharp_cycle_noise=[4, 4], sharp_cycle_noise_start=200, sharp_cycle_noise_ramp=100), seed=1)
    clean, inside, inputs = _sharp_cycle_inputs(model, batch(15, n=4, size=32), (1, 200, 201, 250, 300, 900))
    stds = {it: (x - clean)[inside].std().item() * 255 for it, x in inputs.items()}
    assert stds[1] == 0 and stds[200] == 0  # RN(s) exactly
    assert stds[250] > 1  # then noise (the rounding alone would be 0.29)
    assert (inputs[201] * 255 - (inputs[201] * 255).round()).abs().max() < 1e-3  # on the 8-bit grid from S + 1 on
    assert stds[201] == pytest.approx(math.sqrt(0.04 ** 2 + 1 / 12), rel=0.15)
    assert stds[250] == pytest.approx(math.sqrt(2 ** 2 + 1 / 12), rel=0.1)
    assert stds[300] == pytest.approx(math.sqrt(4 ** 2 + 1 / 12), rel=0.1)
    assert stds[900] == pytest.approx(stds[300], rel=0.1)
    with pytest.raises(UserError, match='train.sharp_cycle_noise_start must be an integer >= 0'):
        build(make_opt(sharp_cycle_noise=[4, 4], sharp_cycle_noise_start=-1))


@pytest.mark.parametrize('value', [-1, [3, 1], [1, 2, 3], 'high', True])
def test_sharp_cycle_noise_rejects_bad_values(value):
    with pytest.raises(UserError, match='train.sharp_cycle_noise'):
        build(make_opt(sharp_cycle_noise=value))


def _discriminators_in_eval_mode(model):
    """Every D of ``model`` in eval mode: spectral norm's power iteration then stays put, so two computations
    of the same D terms agree."""
    for label in model.discriminator_labels:
        model.bare(label).eval()


def test_r1_penalty_is_the_squared_gradient_of_d_on_real_images():
    model = build(make_opt(r1_weight=10.0))
    data = batch(13)
    model.feed_data(data)
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert log['l_d_r1'] > 0
    assert log['l_d_total'] == pytest.approx(0.5 * sum(log[k] for k in D_TERMS) + log['l_d_r1'], rel=1e-5)
    # a reference: gamma/2 * sum over the Ds of the mean over images of |dD(x)/dx|^2 on their real inputs
    _discriminators_in_eval_mode(model)
    expected = 0
    reals = (('d_sharp', data['ref']), ('d_blur', data['lq']), ('d_wave', model.cri_wave.highpass(data['ref'])))
    for label, x in reals:
        x = x.clone().requires_grad_(True)
        g, = torch.autograd.grad(model.bare(label)(x).sum(), x)
        expected += 5.0 * g.square().sum(dim=(1, 2, 3)).mean().item()
    penalty = model.r1_penalty()
    assert penalty.item() == pytest.approx(expected, rel=1e-5)
    assert _grad_norm(penalty, model.bare('d_blur').parameters()) > 0  # it trains D (double backward)
    with pytest.raises(UserError, match='r1_weight'):
        build(make_opt(r1_weight=-1))


def test_d_update_every_skips_the_discriminator_steps_in_between():
    model = build(make_opt(d_update_every=2))
    d = model.bare('d_sharp')
    history = []
    for it in (1, 2, 3):
        before = snapshot_params(d)
        model.feed_data(batch(20 + it))
        model.optimize_parameters(it)
        history.append(any(not torch.equal(before[k], v) for k, v in d.named_parameters()))
        log = model.get_current_log()
        assert ('l_d_total' in log) == (it != 2)
    assert history == [True, False, True]
    with pytest.raises(UserError, match='d_update_every'):
        build(make_opt(d_update_every=0))


def snapshot_params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_r1_weight_per_discriminator():
    """A mapping weighs each D's R1 term; Ds not named get none (the demo recipe spares D_B)."""
    model = build(make_opt(r1_weight={'d_sharp': 2.0, 'd_wave': 0}))
    assert model.r1_weights == {'d_sharp': 2.0}
    data = batch(14)
    model.feed_data(data)
    model.bare('d_sharp').eval()
    x = data['ref'].clone().requires_grad_(True)
    g, = torch.autograd.grad(model.bare('d_sharp')(x).sum(), x)
    assert model.r1_penalty().item() == pytest.approx(1.0 * g.square().sum(dim=(1, 2, 3)).mean().item(), rel=1e-5)
    assert _grad_norm(model.r1_penalty(), model.bare('d_blur').parameters()) == 0
    with pytest.raises(UserError, match="unknown discriminator 'd_sharpp'"):
        build(make_opt(r1_weight={'d_sharpp': 1.0}))
    with pytest.raises(UserError, match='r1_weight'):
        build(make_opt(r1_weight={'d_blur': 'strong'}))


def _with_checkerboard(image, amplitude):
    """``image`` plus a +-``amplitude`` pattern of period 2 px: gone after averaging 2x2 blocks."""
    h, w = image.shape[-2:]
    sign = ((torch.arange(h)[:, None] + torch.arange(w)[None]) % 2) * 2.0 - 1.0
    return image + amplitude * sign


@pytest.mark.parametrize('scale, blind', [(1, False), (2, True)])
def test_sharp_d_scale_hides_the_finest_detail_from_d_sharp_and_d_wave(scale, blind):
    """With sharp_d_scale 2, D_S and D_W judge DN's output averaged over 2x2 blocks, so a 2-px checkerboard on it
    changes neither adversarial term; with the default 1 both see it."""
    model = build(make_opt(sharp_d_scale=scale))
    _discriminators_in_eval_mode(model)
    model.feed_data(batch(30, size=64))  # D_W needs 12 px after the 2x2 average and the wavelet split
    plain = model.generator_losses()[1]
    deblur = model.deblur_train
    model.deblur_train = lambda blur, sharp: (lambda o: (_with_checkerboard(o[0], 0.05), o[1]))(deblur(blur, sharp))
    patterned = model.generator_losses()[1]
    for key in ('l_g_gan_sharp', 'l_g_wave'):
        assert math.isclose(plain[key].item(), patterned[key].item(), rel_tol=1e-5, abs_tol=1e-7) == blind, key
    assert patterned['l_cyc_blur'].item() != plain['l_cyc_blur'].item()  # the pattern did reach the output


def test_sharp_d_scale_pools_the_discriminators_real_inputs_and_r1():
    """D_S's real term, D_W's and their R1 penalties are computed on the 2x2-averaged sharp batch."""
    model = build(make_opt(sharp_d_scale=2, r1_weight={'d_sharp': 2.0}))
    _discriminators_in_eval_mode(model)
    data = batch(31, size=64)
    model.feed_data(data)
    model.generator_losses()
    pooled = torch.nn.functional.avg_pool2d(data['ref'], 2)
    losses = model.discriminator_losses()[1]
    expected_real = model.gan_sharp_loss(model.bare('d_sharp')(pooled), True, is_disc=True)
    assert losses['l_d_sharp_real'].item() == pytest.approx(expected_real.item(), rel=1e-5)
    expected_wave = model.cri_wave(model.bare('d_wave')(model.cri_wave.highpass(pooled)), True, is_disc=True)
    assert losses['l_d_wave_real'].item() == pytest.approx(expected_wave.item(), rel=1e-5)
    x = pooled.clone().requires_grad_(True)
    g, = torch.autograd.grad(model.bare('d_sharp')(x).sum(), x)
    assert model.r1_penalty().item() == pytest.approx(1.0 * g.square().sum(dim=(1, 2, 3)).mean().item(), rel=1e-5)
    with pytest.raises(UserError, match='train.sharp_d_scale'):
        build(make_opt(sharp_d_scale=0))


def test_fine_change_loss_weighs_only_dn_changes_at_the_finest_scale():
    """l_fine = L1 between the detail finer than sigma of DN(b) and of b: a 2-px checkerboard on DN's output
    raises it, a uniform brightness shift does not; its gradient reaches DN and not RN."""
    from torchvision.transforms.functional import gaussian_blur
    model = build(make_opt(fine_change_opt={'type': 'L1Loss', 'loss_weight': 2.0}, fine_change_sigma=1.0))
    _discriminators_in_eval_mode(model)
    data = batch(32, size=64)
    model.feed_data(data)
    captured = {}
    deblur = model.deblur_train

    def recording(blur, sharp, change=lambda x: x):
        out, extra = deblur(blur, sharp)
        out = change(out)
        captured['fake_s'] = out[:blur.shape[0] // 2]
        return out, extra
    model.deblur_train = recording
    plain = model.generator_losses()[1]

    def detail(x):
        return x - gaussian_blur(x, [7, 7], [1.0, 1.0])
    expected = 2.0 * (detail(captured['fake_s']) - detail(data['lq'])).abs().mean()
    assert plain['l_fine'].item() == pytest.approx(expected.item(), rel=1e-5)
    assert plain['l_g_total'].item() == pytest.approx(sum(v.item() for k, v in plain.items() if k != 'l_g_total'),
                                                      rel=1e-5)
    assert _grad_norm(plain['l_fine'], model.bare('g').parameters()) > 0
    assert _grad_norm(plain['l_fine'], model.bare('rb').parameters()) == 0
    model.deblur_train = lambda blur, sharp: recording(blur, sharp, lambda x: x + 0.05)
    assert model.generator_losses()[1]['l_fine'].item() == pytest.approx(plain['l_fine'].item(), rel=1e-4)
    model.deblur_train = lambda blur, sharp: recording(blur, sharp, lambda x: _with_checkerboard(x, 0.05))
    assert model.generator_losses()[1]['l_fine'].item() > plain['l_fine'].item() + 0.05
    for bad in (0, -1, 'wide'):
        with pytest.raises(UserError, match='train.fine_change_sigma'):
            build(make_opt(fine_change_opt={'type': 'L1Loss'}, fine_change_sigma=bad))


def _layouts(net):
    """{is_channels_last(w)} over the network's conv weights whose two memory formats differ (k > 1, C_in > 1)."""
    return {is_channels_last(p) for p in net.parameters() if p.dim() == 4 and p.shape[-1] > 1 and p.shape[1] > 1}


def test_channels_last_training_option_places_every_network_and_trains_alike():
    """train.channels_last: auto (CPU: on), true, false; the same losses either way (float rounding only), and a
    bad value is one error naming the option."""
    logs = {}
    for value in ('auto', True, False):
        model = build(make_opt(channels_last=value, ema_decay=0.9))
        assert model.channels_last is (value != False)  # noqa: E712  (auto on this CPU)
        placed = {label: _layouts(model.net(label)) for label in model.net_labels}
        placed['g_ema'] = _layouts(model.net_g_ema)
        assert set(placed) == {*LABELS, 'g_ema'}, placed
        assert all(layouts == {value != False} for layouts in placed.values()), placed  # noqa: E712
        for it in (1, 2):
            model.feed_data(batch(it))
            model.optimize_parameters(it)
        logs[value] = model.get_current_log()
    for key, v in logs[False].items():
        assert logs[True][key] == pytest.approx(v, rel=1e-4, abs=1e-6), key
        assert logs['auto'][key] == logs[True][key], key
    for bad in ('yes', 1, 1.0, None):
        with pytest.raises(UserError, match='train.channels_last'):
            build(make_opt(channels_last=bad))
