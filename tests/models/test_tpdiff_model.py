"""TPDiffModel stages 1 and 2: what trains, what is frozen, where gradients go, validation priors, resume."""
import copy
import math
import os

import pytest
import torch

from basicsr.utils.misc import check_resume
from tpdiff_plugin.models.tpdiff_model import TPDiffModel
from tpdiff_plugin.utils.errors import UserError
from conftest import tiny_net_opts
from model_helpers import batch, build

# identity_init off (tiny_net_opts), so that gradients reach every layer from the first step
TINY_G = tiny_net_opts(dim=8, prior_hidden=4, dm_timesteps=3, prior_scale=4)
TINY_TPE = {'type': 'TexturePriorEncoder', 'prior_ch': 8, 'mem_slots': 16, 'prior_scale': 4, 'enc_ch': 4}


def make_opt(root, stage=1, **train):
    unet = {'type': 'ReblurUNet', 'base_ch': 4, 'num_levels': 3, 'identity_init': False}
    disc = {'type': 'PatchDiscriminator', 'base_ch': 4, 'num_layers': 2}
    opt = {
        'name': f'tpdiff_s{stage}', 'model_type': 'TPDiffModel', 'stage': stage, 'num_gpu': 0, 'dist': False,
        'rank': 0, 'world_size': 1, 'is_train': True, 'manual_seed': 0,
        'network_g': dict(TINY_G), 'network_tpe': dict(TINY_TPE), 'network_rb': dict(unet),
        'network_d_sharp': dict(disc), 'network_d_blur': dict(disc), 'network_d_wave': dict(disc, in_ch=9),
        'path': {'models': os.path.join(root, f's{stage}', 'models'),
                 'training_states': os.path.join(root, f's{stage}', 'training_states'), 'resume_state': None},
        'train': {
            'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.5, 0.999]},
            'optim_d': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.5, 0.999]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': [], 'gamma': 0.5},
            'total_iter': 10, 'pool_size': 4,
            'gan_opt': {'type': 'GANLoss', 'gan_type': 'lsgan', 'loss_weight': 1.0},
            'cycle_opt': {'type': 'L1Loss', 'loss_weight': 0.1},
            'wave_opt': {'type': 'WaveletGANLoss', 'gan_type': 'lsgan', 'loss_weight': 0.2},
        },
        'val': {'sample_seed': 0},
    }
    if stage == 2:
        opt['train']['diff_opt'] = {'type': 'L1Loss', 'loss_weight': 1.0}
    opt['train'].update(train)
    os.makedirs(opt['path']['models'], exist_ok=True)
    os.makedirs(opt['path']['training_states'], exist_ok=True)
    return opt


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


@pytest.fixture(scope='module')
def stage1_ckpt(tmp_path_factory):
    """A stage-1 run of 2 iterations, saved: the stage-2 tests load its TPE, DN and RN."""
    root = str(tmp_path_factory.mktemp('tpdiff'))
    model = build(make_opt(root, stage=1))
    for it in (1, 2):
        model.feed_data(batch(it))
        model.optimize_parameters(it)
    model.save(0, 2)
    models = os.path.join(root, 's1', 'models')
    return root, {label: os.path.join(models, f'net_{label}_2.pth') for label in ('g', 'tpe', 'rb')}


def output_with_memory_ema(model, lq):
    """DN (eval mode) on ``lq`` with the prior the TPE reads from its memory EMA."""
    g, tpe = model.bare('g'), model.bare('tpe')
    g.eval()
    with torch.no_grad():
        return g(lq, prior=tpe.read(lq, memory=tpe.memory_ema))


def stage1_d_paths(stage1_ckpt):
    """The stage-1 discriminators and training states of the ``stage1_ckpt`` run."""
    root, _ = stage1_ckpt
    models = os.path.join(root, 's1', 'models')
    return ({label: os.path.join(models, f'net_{label}_2.pth') for label in ('d_sharp', 'd_blur', 'd_wave')},
            os.path.join(root, 's1', 'training_states'))


def stage2_opt(stage1_ckpt, **train):
    root, paths = stage1_ckpt
    opt = make_opt(root, stage=2, **train)
    for label, path in paths.items():
        opt['path'][f'pretrain_network_{label}'] = path
    return opt


# ---------------------------------------------------------------------------------------------- stage 1
def test_stage1_trains_tpe_with_g_and_keeps_the_dm_frozen(tmp_path):
    model = build(make_opt(str(tmp_path), stage=1))
    assert isinstance(model, TPDiffModel)
    assert set(model.generator_labels) == {'g', 'rb', 'tpe'}
    dm = model.bare('g').dm
    g_ids = {id(p) for group in model.optimizer_g.param_groups for p in group['params']}
    assert {id(p) for p in model.net_tpe.parameters()} <= g_ids
    assert not any(id(p) in g_ids for p in dm.parameters())
    assert all(not p.requires_grad for p in dm.parameters())
    tpe_before, dm_before = snapshot(model.net_tpe), snapshot(dm)
    model.feed_data(batch(0))
    model.optimize_parameters(1)
    assert changed(tpe_before, model.net_tpe)  # the TPE learns from the image losses
    assert not changed(dm_before, dm)
    log = model.get_current_log()
    assert 'l_diff' not in log and all(math.isfinite(v) for v in log.values())


def test_stage1_dn_gets_the_tpe_prior_from_blur_and_unpaired_sharp(tmp_path):
    model = build(make_opt(str(tmp_path), stage=1))
    data = batch(3)
    model.feed_data(data)
    model._set_d_requires_grad(False)
    l_total, _ = model.generator_losses()
    l_total.backward()
    tpe = model.net_tpe
    # write path (sharp images) and read path (blurry images) both receive gradient through DN's prior
    for name in ('memory', 'write_q.weight', 'write_v.weight', 'enc_sharp.body.0.weight', 'read_q.weight',
                 'enc_blur.body.0.weight'):
        grad = dict(tpe.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # the DN output is the TPDiffNet output with prior = TPE(blur, sharp)
    with torch.no_grad():
        z = tpe(data['lq'], data['ref'])
        expected = model.net_g(data['lq'], prior=z)
        out, _ = model.deblur_train(data['lq'], data['ref'])
    assert torch.allclose(out, expected, atol=1e-6)


def test_stage1_validation_uses_memory_from_the_last_training_sharp_batch(tmp_path, monkeypatch):
    model = build(make_opt(str(tmp_path), stage=1, dm_target='batch'))
    train = batch(4)
    model.feed_data(train)
    model.optimize_parameters(1)
    assert 'TPE memory from training sharp batch' in model.prior_description()
    tpe, g = model.bare('tpe'), model.bare('g')
    written = []
    real_write = tpe.write
    monkeypatch.setattr(tpe, 'write', lambda sharp: written.append(sharp) or real_write(sharp))
    val_gt = torch.rand(1, 3, 28, 36)
    lq = torch.rand(1, 3, 28, 36)
    model.feed_data({'lq': lq, 'gt': val_gt})
    model.test()
    assert len(written) == 1 and torch.equal(written[0], train['ref'])  # never the validation GT
    assert torch.equal(model.last_sharp, train['ref'])
    g.eval()
    with torch.no_grad():
        expected = g(lq, prior=tpe.read(lq, memory=real_write(train['ref'])))
    g.train()
    assert torch.allclose(model.output, expected, atol=1e-6)


def test_stage1_validation_before_training_reads_the_raw_memory(tmp_path):
    opt = make_opt(str(tmp_path), stage=1)
    opt['is_train'] = False
    model = build(opt)
    assert model.net_labels == ['g', 'tpe']
    lq = torch.rand(1, 3, 20, 24)
    model.feed_data({'lq': lq})
    model.test()
    with torch.no_grad():
        expected = model.bare('g')(lq, prior=model.bare('tpe').read(lq))
    assert torch.allclose(model.output, expected, atol=1e-6)
    assert 'without sharp enhancement' in model.prior_description()


# ---------------------------------------------------------------------------------------------- stage 2
def test_stage2_needs_the_stage1_checkpoints(stage1_ckpt, tmp_path):
    opt = stage2_opt(stage1_ckpt)
    del opt['path']['pretrain_network_tpe']
    with pytest.raises(UserError, match='path.pretrain_network_tpe'):
        build(opt)
    opt = stage2_opt(stage1_ckpt)
    missing = str(tmp_path / 'missing_net_g.pth')
    opt['path']['pretrain_network_g'] = missing
    with pytest.raises(UserError, match='path.pretrain_network_g') as err:
        build(opt)
    assert missing in str(err.value)
    opt = stage2_opt(stage1_ckpt)
    opt['stage'] = 3
    with pytest.raises(UserError, match='"stage" must be 1 or 2'):
        build(opt)


def test_stage2_loads_stage1_nets_and_freezes_the_tpe_bit_identical(stage1_ckpt):
    _, paths = stage1_ckpt
    model = build(stage2_opt(stage1_ckpt), seed=42)
    for label in ('g', 'tpe', 'rb'):
        saved = torch.load(paths[label], weights_only=True)['params']
        assert all(torch.equal(v, model.bare(label).state_dict()[k]) for k, v in saved.items()), label
    tpe = model.net_tpe
    assert not tpe.training and all(not p.requires_grad for p in tpe.parameters())
    assert 'tpe' in model.frozen_labels and 'tpe' not in model.generator_labels
    all_opt = {id(p) for o in model.optimizers for group in o.param_groups for p in group['params']}
    assert not any(id(p) in all_opt for p in tpe.parameters())
    dm = model.bare('g').dm
    assert all(p.requires_grad for p in dm.parameters())
    assert {id(p) for p in dm.parameters()} <= all_opt

    tpe_before, dm_before = snapshot(tpe), snapshot(dm)
    for it in (1, 2, 3):
        model.feed_data(batch(10 + it))
        model.optimize_parameters(it)
    assert not changed(tpe_before, tpe)  # bit-identical
    assert not tpe.training
    assert len(changed(dm_before, dm)) == len(dm_before)  # every DM tensor moved
    log = model.get_current_log()
    assert math.isfinite(log['l_diff'])
    assert log['l_g_total'] == pytest.approx(sum(v for k, v in log.items() if k.startswith(('l_g_', 'l_cyc', 'l_diff'))
                                                 and k != 'l_g_total'), rel=1e-5)


def _dm_grads(model, loss):
    dm_params = list(model.bare('g').dm.parameters())
    grads = torch.autograd.grad(loss, dm_params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, dm_params)]


@pytest.mark.parametrize('joint', [True, False])
def test_stage2_gradient_paths_of_joint_and_separate_training(stage1_ckpt, joint):
    model = build(stage2_opt(stage1_ckpt, joint_train=joint))
    model.feed_data(batch(20))
    model._set_d_requires_grad(False)
    l_total, losses = model.generator_losses()
    image_loss = l_total - losses['l_diff']
    from_images = _dm_grads(model, image_loss)
    from_diff = _dm_grads(model, losses['l_diff'])
    from_total = _dm_grads(model, l_total)
    image_norm = sum(g.abs().sum() for g in from_images)
    assert sum(g.abs().sum() for g in from_diff) > 0
    if joint:
        assert image_norm > 0  # the image losses train the DM through the prior it hands to DN
    else:
        assert image_norm == 0  # DN saw a detached prior: the DM learns from L_diff alone
        for a, b in zip(from_total, from_diff):
            assert torch.equal(a, b)
    # DN itself is trained by the image losses in both cases
    unet_grad = torch.autograd.grad(image_loss, model.bare('g').output.weight, retain_graph=True)[0]
    assert unet_grad.abs().sum() > 0


def test_stage2_diff_weight_reaches_the_total(stage1_ckpt):
    totals = []
    for weight in (1.0, 3.0):
        model = build(stage2_opt(stage1_ckpt, diff_opt={'type': 'L1Loss', 'loss_weight': weight}))
        model.feed_data(batch(21))
        torch.manual_seed(5)  # the DM's noise
        with torch.no_grad():
            _, losses = model.generator_losses()
        totals.append({k: v.item() for k, v in losses.items()})
    assert totals[1]['l_diff'] == pytest.approx(3 * totals[0]['l_diff'], rel=1e-5)
    assert totals[1]['l_g_total'] - totals[0]['l_g_total'] == pytest.approx(2 * totals[0]['l_diff'], rel=1e-4)


def test_stage2_validation_samples_the_dm_from_noise(stage1_ckpt):
    model = build(stage2_opt(stage1_ckpt))
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    assert model.prior_description() == 'DM sampling (T=3)'
    lq = torch.rand(1, 3, 26, 30)
    outputs = []
    for _ in range(2):
        model.feed_data({'lq': lq, 'gt': lq})
        model.test()
        outputs.append(model.output)
    assert torch.equal(outputs[0], outputs[1])  # seeded by val.sample_seed: comparable validations
    g = model.bare('g')
    g.eval()
    with torch.no_grad():
        expected = g(lq, generator=torch.Generator().manual_seed(0))
        other_seed = g(lq, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(outputs[0], expected, atol=1e-6)
    assert not torch.allclose(outputs[0], other_seed, atol=1e-5)  # the prior really comes from the noise


def test_stage2_test_mode_builds_only_net_g(stage1_ckpt):
    opt = stage2_opt(stage1_ckpt)
    opt['is_train'] = False
    opt['path'] = {'pretrain_network_g': opt['path']['pretrain_network_g']}
    model = build(opt)
    assert model.net_labels == ['g']
    model.feed_data({'lq': torch.rand(1, 3, 17, 23)})
    model.test()
    assert model.output.shape == (1, 3, 17, 23)


def test_stage2_saves_every_network_and_resumes(stage1_ckpt):
    opt = stage2_opt(stage1_ckpt)
    model = build(opt)
    for it in (1, 2):
        model.feed_data(batch(30 + it))
        model.optimize_parameters(it)
    model.save(0, 2)
    for label in ('g', 'tpe', 'rb', 'd_sharp', 'd_blur', 'd_wave'):
        assert os.path.isfile(os.path.join(opt['path']['models'], f'net_{label}_2.pth')), label
    state_path = os.path.join(opt['path']['training_states'], '2.state')
    state = torch.load(state_path, weights_only=True)
    resumed_opt = copy.deepcopy(opt)
    resumed_opt['path']['resume_state'] = state_path
    check_resume(resumed_opt, 2)
    assert resumed_opt['path']['pretrain_network_tpe'].endswith(os.path.join('s2', 'models', 'net_tpe_2.pth'))
    fresh = build(resumed_opt, seed=7)
    fresh.resume_training(state)
    for label in model.net_labels:
        a, b = model.bare(label).state_dict(), fresh.bare(label).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), label
    for o1, o2 in zip(model.optimizers, fresh.optimizers):
        s1, s2 = o1.state_dict()['state'], o2.state_dict()['state']
        assert s1.keys() == s2.keys()
        assert all(torch.equal(s1[i]['exp_avg'], s2[i]['exp_avg']) for i in s1)
    assert all(torch.equal(a, b) for a, b in zip(model.pools['sharp'].images, fresh.pools['sharp'].images))
    # the next iteration's sharp-cycle chunk reads a memory written from it
    assert torch.equal(state['tpe_sharp_batch'], model.last_sharp)


def test_stage1_resume_keeps_the_sharp_batch_for_validation(tmp_path):
    opt = make_opt(str(tmp_path), stage=1)
    model = build(opt)
    data = batch(50)
    model.feed_data(data)
    model.optimize_parameters(1)
    model.save(0, 1)
    state = torch.load(os.path.join(opt['path']['training_states'], '1.state'), weights_only=True)
    resumed_opt = copy.deepcopy(opt)
    resumed_opt['path']['resume_state'] = 'set'
    check_resume(resumed_opt, 1)
    fresh = build(resumed_opt, seed=3)
    assert fresh.last_sharp is None
    fresh.resume_training(state)
    assert torch.equal(fresh.last_sharp, data['ref'])
    lq = torch.rand(1, 3, 24, 24)
    for m in (model, fresh):
        m.feed_data({'lq': lq})
        m.test()
    assert torch.equal(model.output, fresh.output)


def test_stage2_without_tpe_trains_the_dm_through_the_image_losses(stage1_ckpt):
    opt = stage2_opt(stage1_ckpt, use_tpe=False)
    model = build(opt)
    assert 'tpe' not in model.net_labels and model.cri_diff is None
    model.feed_data(batch(40))
    model._set_d_requires_grad(False)
    l_total, losses = model.generator_losses()
    assert 'l_diff' not in losses
    assert sum(g.abs().sum() for g in _dm_grads(model, l_total)) > 0


def test_stage2_without_dm_uses_the_tpe_memory_ema(stage1_ckpt):
    opt = stage2_opt(stage1_ckpt)
    opt['network_g']['use_dm'] = False
    opt['path']['strict_load_g'] = False
    model = build(opt)
    assert model.bare('g').dm is None and model.cri_diff is None
    model.feed_data(batch(41))
    model.optimize_parameters(1)
    assert 'l_diff' not in model.get_current_log()
    lq = torch.rand(1, 3, 24, 24)
    model.feed_data({'lq': lq})
    model.test()
    # sharp-free, as the stage-2 DM target
    assert torch.allclose(model.output, output_with_memory_ema(model, lq), atol=1e-6)
    assert 'w/o DM' in model.prior_description() and 'EMA' in model.prior_description()


# ---------------------------------------------------------------------------------------------- issue 9
def _record_writes(monkeypatch, tpe):
    written = []
    real_write = tpe.write
    monkeypatch.setattr(tpe, 'write', lambda sharp: written.append(sharp) or real_write(sharp))
    return written, real_write


def test_sharp_cycle_reads_a_memory_written_from_another_sharp_batch(tmp_path, monkeypatch):
    """No self-prior: RN(s) must not read a memory written from s itself (the textures DN must restore)."""
    model = build(make_opt(str(tmp_path), stage=1))
    assert model.sharp_cycle_prior == 'other_batch'
    tpe = model.bare('tpe')
    written, real_write = _record_writes(monkeypatch, tpe)
    b1, b2 = batch(1), batch(2)
    b1['ref'] = torch.zeros_like(b1['ref'])  # a sharp batch unlike the next one, so the two memories differ
    model.feed_data(b1)
    model.optimize_parameters(1)
    assert len(written) == 1 and torch.equal(written[0], b1['ref'])  # RN(s1) read the learned memory
    written.clear()
    model.feed_data(b2)
    model.optimize_parameters(2)
    assert len(written) == 2 and torch.equal(written[0], b2['ref']) and torch.equal(written[1], b1['ref'])
    # the DN output of the synthetic chunk is TPDiffNet on RN(s2) with the prior read from write(s1)
    fake = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out, _ = model.deblur_train(torch.cat([b2['lq'], fake]), b2['ref'])
        expected = model.bare('g')(fake, prior=tpe.read(fake, real_write(model.other_sharp)))
        self_prior = model.bare('g')(fake, prior=tpe.read(fake, real_write(b2['ref'])))
    torch.testing.assert_close(out[2:], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out[2:], self_prior, atol=1e-4)


def test_own_batch_keeps_the_old_self_prior(tmp_path, monkeypatch):
    model = build(make_opt(str(tmp_path), stage=1, sharp_cycle_prior='own_batch'))
    written, _ = _record_writes(monkeypatch, model.bare('tpe'))
    for it in (1, 2):
        data = batch(it)
        model.feed_data(data)
        model.optimize_parameters(it)
        assert torch.equal(written[-1], data['ref']) and len(written) == it
    with pytest.raises(UserError, match='sharp_cycle_prior'):
        build(make_opt(str(tmp_path), stage=1, sharp_cycle_prior='mine'))


def test_tpe_memory_usage_is_logged(tmp_path):
    model = build(make_opt(str(tmp_path), stage=1))
    model.feed_data(batch(5, n=2, size=32))
    model.optimize_parameters(1)
    log = model.get_current_log()
    # 2 images of 8x8 tokens read from 16 entries
    assert 1 <= log['tpe_entries'] <= 16 and 1 <= log['tpe_perplexity'] <= log['tpe_entries'] + 1e-6
    assert 'tpe_entries' not in [k for k in log if k.startswith('l_')]  # not a loss: not in l_g_total
    assert log['l_g_total'] == pytest.approx(sum(v for k, v in log.items() if k.startswith(('l_g_', 'l_cyc'))
                                                 and k != 'l_g_total'), rel=1e-5)


def test_stage2_continues_with_the_stage1_discriminators_and_their_optimizer(stage1_ckpt):
    d_paths, states = stage1_d_paths(stage1_ckpt)
    opt = stage2_opt(stage1_ckpt, optim_d={'type': 'Adam', 'lr': 3e-4, 'betas': [0.5, 0.999]})
    opt['path'].update({f'pretrain_network_{label}': path for label, path in d_paths.items()})
    opt['path']['resume_optim_d'] = states  # the folder: its newest .state
    model = build(opt)
    for label, path in d_paths.items():
        saved = torch.load(path, weights_only=True)['params']
        assert all(torch.equal(v, model.bare(label).state_dict()[k]) for k, v in saved.items()), label
    saved = torch.load(os.path.join(states, '2.state'), weights_only=True)['optimizers'][1]
    loaded = model.optimizer_d.state_dict()
    assert loaded['state'].keys() == saved['state'].keys() and len(saved['state']) > 0
    assert all(torch.equal(loaded['state'][i]['exp_avg'], saved['state'][i]['exp_avg']) for i in saved['state'])
    assert all(g['lr'] == 3e-4 for g in model.optimizer_d.param_groups)  # this run's hyper-parameters
    model.feed_data(batch(60))
    model.optimize_parameters(1)  # the moments continue: step counts go on from stage 1's
    assert all(float(st['step']) == float(saved['state'][i]['step']) + 1
               for i, st in model.optimizer_d.state_dict()['state'].items())
    # fresh discriminators without the options
    plain = build(stage2_opt(stage1_ckpt))
    saved = torch.load(d_paths['d_sharp'], weights_only=True)['params']
    assert not all(torch.equal(v, plain.bare('d_sharp').state_dict()[k]) for k, v in saved.items())
    assert len(plain.optimizer_d.state_dict()['state']) == 0


def test_resume_optim_d_maps_moments_by_discriminator(stage1_ckpt, tmp_path):
    """A stage 2 without D_W (the w/o WaveLoss ablation) takes D_S's and D_B's moments from a 3-D state."""
    _, states = stage1_d_paths(stage1_ckpt)
    opt = stage2_opt(stage1_ckpt)
    del opt['network_d_wave'], opt['train']['wave_opt']
    opt['path']['resume_optim_d'] = os.path.join(states, '2.state')
    model = build(opt)
    state = torch.load(os.path.join(states, '2.state'), weights_only=True)
    assert list(state['d_param_counts']) == ['d_sharp', 'd_blur', 'd_wave']
    saved, loaded = state['optimizers'][1]['state'], model.optimizer_d.state_dict()['state']
    n = state['d_param_counts']['d_sharp'] + state['d_param_counts']['d_blur']
    assert len(loaded) == n and all(torch.equal(loaded[i]['exp_avg'], saved[i]['exp_avg']) for i in range(n))


def test_resume_optim_d_errors_name_the_option(stage1_ckpt, tmp_path):
    opt = stage2_opt(stage1_ckpt)
    opt['path']['resume_optim_d'] = str(tmp_path)  # a folder without .state files
    with pytest.raises(UserError, match='resume_optim_d.*no <iter>.state'):
        build(opt)
    _, states = stage1_d_paths(stage1_ckpt)
    state = torch.load(os.path.join(states, '2.state'), weights_only=True)
    state['d_param_counts'] = {k: v for k, v in state['d_param_counts'].items() if k != 'd_wave'}
    n_keep = sum(state['d_param_counts'].values())
    state['optimizers'][1]['param_groups'][0]['params'] = list(range(n_keep))
    state['optimizers'][1]['state'] = {i: v for i, v in state['optimizers'][1]['state'].items() if i < n_keep}
    torch.save(state, tmp_path / '5.state')  # a stage 1 that had no D_W
    opt['path']['resume_optim_d'] = str(tmp_path / '5.state')
    with pytest.raises(UserError, match='no optimizer state for d_wave'):
        build(opt)


def _diff_targets(model, monkeypatch, data):
    captured = []
    real = model.cri_diff
    monkeypatch.setattr(model, 'cri_diff', lambda z_hat, z: captured.append(z) or real(z_hat, z))
    model.feed_data(data)
    with torch.no_grad():
        model.generator_losses()
    return captured[-1]


@pytest.mark.parametrize('target', ['ema_memory', 'batch'])
def test_stage2_dm_target_depends_on_the_sharp_batch_only_with_batch(stage1_ckpt, monkeypatch, target):
    model = build(stage2_opt(stage1_ckpt, dm_target=target))
    lq = torch.rand(2, 3, 32, 32)
    a = _diff_targets(model, monkeypatch, {'lq': lq, 'ref': torch.rand(2, 3, 32, 32)})
    b = _diff_targets(model, monkeypatch, {'lq': lq, 'ref': torch.rand(2, 3, 32, 32)})
    tpe = model.bare('tpe')
    if target == 'ema_memory':
        assert torch.equal(a[:2], b[:2])  # the real blurry chunk's target is a function of lq alone
        torch.testing.assert_close(a[:2], tpe.read(lq, memory=tpe.memory_ema))
        assert int(tpe.memory_ema_updates) > 0  # stage 1 wrote it
    else:
        assert not torch.allclose(a[:2], b[:2])


def test_stage1_validation_reads_the_memory_ema_by_default(tmp_path):
    model = build(make_opt(str(tmp_path), stage=1))
    for it in (1, 2):
        model.feed_data(batch(it))
        model.optimize_parameters(it)
    tpe = model.bare('tpe')
    assert int(tpe.memory_ema_updates) == 3  # s1; s2 and s1 again for the sharp-cycle chunk
    assert 'EMA of 3 training writes' in model.prior_description()
    lq = torch.rand(1, 3, 24, 24)
    model.feed_data({'lq': lq})
    model.test()
    torch.testing.assert_close(model.output, output_with_memory_ema(model, lq))


def test_stage1_validation_leaves_the_memory_ema_alone(tmp_path):
    """With dm_target: batch, validation writes a memory from the last training sharp batch: that write is not
    a training write, so the memory EMA (and its count) must not change."""
    model = build(make_opt(str(tmp_path), stage=1, dm_target='batch'))
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    tpe = model.bare('tpe')
    ema, updates = tpe.memory_ema.clone(), int(tpe.memory_ema_updates)
    assert updates == 1 and tpe.training
    model.feed_data({'lq': torch.rand(1, 3, 24, 24)})
    model.test()
    assert int(tpe.memory_ema_updates) == updates and torch.equal(tpe.memory_ema, ema)
    assert tpe.training  # back in training mode for the next iteration


def test_default_networks_start_as_the_identity_in_training(tmp_path):
    """With the class defaults (identity_init) an untrained DN and RN return their inputs exactly."""
    opt = make_opt(str(tmp_path), stage=1)
    for key in ('network_g', 'network_rb'):
        del opt[key]['identity_init']
    model = build(opt)
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(model.bare('rb')(x), x)
        assert torch.equal(model.bare('g')(x, prior=model.bare('tpe')(x, x)), x)
    model.feed_data({'lq': x})
    model.test()
    assert torch.equal(model.output, x)


@pytest.mark.parametrize('switch', [('filter_type', t) for t in ('predicted', 'feature_deform', 'plain', 'separable',
                                                                 'none')] + [('tm_ffn_modulation', 'before_dwconv')],
                         ids=lambda s: s[1])
def test_stage2_filter_ablations_start_from_the_default_stage1_net_and_train(stage1_ckpt, switch):
    """What options/ablations/tpdiff_stage2_filter_*.yml (and _ffn_before_dwconv) do: DN with another filter or
    TM-FFN placement loads the default stage-1 DN with strict_load_g false (the layers that fit, a layer of
    another shape skipped) and trains, its own layers included."""
    _, paths = stage1_ckpt
    opt = stage2_opt(stage1_ckpt)
    opt['network_g'][switch[0]] = switch[1]
    opt['path']['strict_load_g'] = False
    model = build(opt)
    net = model.bare('g')
    saved = torch.load(paths['g'], weights_only=True)['params']
    own = net.state_dict()
    shared = [k for k, v in saved.items() if k in own and own[k].shape == v.shape]
    assert all(torch.equal(own[k], saved[k]) for k in shared)
    assert len(shared) < len(saved) and 'patch_embed.weight' in shared  # another network, partly loaded
    before = snapshot(net)
    model.feed_data(batch(50))
    model.optimize_parameters(1)
    assert all(math.isfinite(v) for v in model.get_current_log().values())
    moved = changed(before, net)
    # the variant's own layers train: its filter (the qkv projection without one), or TM-FFN's prior layers
    own_layers = {'none': '.attn.qkv.', 'before_dwconv': '.ffn.prior_convs.'}.get(switch[1], '.attn.filter.')
    assert [k for k in own if own_layers in k] and all(k in moved for k in own if own_layers in k)
    assert 'patch_embed.weight' in moved


# ---------------------------------------------------------------------------------------------- issue 13
@pytest.mark.parametrize('name', ['memory_bank', 'sparse_coding', 'vq'])
def test_stage2_prior_generators_train_against_the_dm_target_and_deblur_without_the_tpe(stage1_ckpt, name, tmp_path):
    """What options/analysis/tpdiff_stage2_prior_*.yml do: net_g's generator replaces the DM, copies the TPE
    memory the DM's target is read from (memory bank, sparse coding), is trained by L_diff against that target
    (VQ also by its codebook and commitment terms), and a test-mode model deblurs with net_g alone."""
    opt = stage2_opt(stage1_ckpt)
    opt['network_g'].update(prior_generator=name, mem_slots=TINY_TPE['mem_slots'])
    opt['path']['strict_load_g'] = False  # the stage-1 DN holds a DM, not this generator
    model = build(opt)
    net, tpe = model.bare('g'), model.bare('tpe')
    assert net.dm is None and model.cri_diff is not None
    if name != 'vq':
        assert torch.equal(net.prior_gen.memory, tpe.memory_ema)
    assert name in model.prior_description()
    before = snapshot(net.prior_gen)
    model.feed_data(batch(60))
    model.optimize_parameters(1)
    log = model.get_current_log()
    assert 'l_diff' in log and ('l_vq' in log) == (name == 'vq')
    trained = set(changed(before, net.prior_gen))
    assert {k for k, _ in net.prior_gen.named_parameters()} <= trained
    assert 'memory' not in trained  # the TPE's entries, retrieved, not learned
    # the target is the DM's: the TPE reading its memory EMA, from the blurry batch alone
    data = batch(61)
    with torch.no_grad():
        _, extra = model.deblur_train(data['lq'], data['ref'])
        z_hat = net(data['lq'], return_prior=True)[1]
        assert torch.allclose(extra['l_diff'], model.cri_diff(z_hat, tpe.read(data['lq'], memory=tpe.memory_ema)))
    model.save(0, 1)
    test_opt = {**opt, 'is_train': False, 'path': {'pretrain_network_g': os.path.join(opt['path']['models'],
                                                                                      'net_g_1.pth')}}
    tester = build(test_opt)
    assert tester.net_labels == ['g']
    x = torch.rand(1, 3, 17, 23)
    tester.feed_data({'lq': x})
    tester.test()
    with torch.no_grad():
        assert torch.allclose(tester.output, model.bare('g').eval()(x), atol=1e-6)


def test_prior_generator_options_are_checked(tmp_path):
    from tpdiff_plugin.option_check import validate_schema
    opt = make_opt(str(tmp_path), stage=2)
    opt['network_g']['prior_generator'] = 'memorybank'
    with pytest.raises(UserError, match=r'network_g.prior_generator: .memorybank. is not one of dm, memory_bank'):
        validate_schema(opt, 'x.yml')
    opt['network_g'].update(prior_generator='sparse_coding', mem_slots=8)
    with pytest.raises(UserError, match=r'network_g.mem_slots \(8\) and network_tpe.mem_slots \(16\) differ'):
        validate_schema(opt, 'x.yml')


# ---------------------------------------------------------------------------------------------- the DM's start
def test_dm_warmup_trains_only_the_dm_then_the_whole_game(stage1_ckpt):
    d_paths, _ = stage1_d_paths(stage1_ckpt)
    opt = stage2_opt(stage1_ckpt, dm_warmup_iter=2)
    opt['path'].update({f'pretrain_network_{label}': path for label, path in d_paths.items()})
    model = build(opt)
    g = model.bare('g')
    dn = {k: v for k, v in snapshot(g).items() if not k.startswith('dm.')}
    others = {label: snapshot(model.bare(label)) for label in ('tpe', 'rb', 'd_sharp', 'd_blur', 'd_wave')}
    dm_before = snapshot(g.dm)
    for it in (1, 2):
        model.feed_data(batch(70 + it))
        model.optimize_parameters(it)
        log = model.get_current_log()
        assert set(k for k in log if k.startswith('l_')) == {'l_diff'} and math.isfinite(log['l_diff'])
        assert 'tpe_entries' in log
    assert len(changed(dm_before, g.dm)) == len(dm_before)  # every DM tensor moved
    assert all(torch.equal(v, g.state_dict()[k]) for k, v in dn.items())  # DN did not
    for label, before in others.items():
        assert changed(before, model.bare(label)) == [], label
    assert all(len(p.images) == 0 for p in model.pools.values())  # no fakes pushed for the discriminators
    model.feed_data(batch(73))
    model.optimize_parameters(3)  # the warm-up is over: the whole stage-2 game
    assert {'l_g_gan_sharp', 'l_cyc_blur', 'l_d_total', 'l_diff'} <= set(model.get_current_log())
    assert any(not torch.equal(v, g.state_dict()[k]) for k, v in dn.items())
    assert changed(others['d_sharp'], model.bare('d_sharp')) != []


def test_dm_warmup_lowers_l_diff_on_a_fixed_batch(stage1_ckpt):
    """A learning test: 60 warm-up steps bring the DM's prior closer to the TPE's, on the batch they see (measured:
    1.02 -> 0.52, where the target's per-channel mean scores 0.94)."""
    model = build(stage2_opt(stage1_ckpt, dm_warmup_iter=60, dm_lr=3e-3))
    data = batch(80)
    model.feed_data(data)
    z, _ = model._prior_target(model.lq, model.ref)
    g = model.bare('g')

    def distance():  # the DM's sampled prior (from noise, as at inference) against the target
        with torch.no_grad():
            return (g.generate_prior(model.lq, generator=torch.Generator().manual_seed(0)) - z).abs().mean().item()

    start = distance()
    for it in range(1, 61):
        model.feed_data(data)
        model.optimize_parameters(it)
    assert distance() < 0.6 * start
    # and the trivial prior (the target's mean everywhere) is beaten too
    assert distance() < (z - z.mean(dim=(0, 2, 3), keepdim=True)).abs().mean().item()


def test_dm_lr_is_a_parameter_group_of_optim_g_that_the_scheduler_scales(stage1_ckpt):
    opt = stage2_opt(stage1_ckpt, dm_lr=5e-3, scheduler={'type': 'MultiStepLR', 'milestones': [2], 'gamma': 0.5})
    model = build(opt)
    groups = model.optimizer_g.param_groups
    assert [g['lr'] for g in groups] == [1e-3, 5e-3]
    dm = {id(p) for p in model.bare('g').dm.parameters()}
    assert {id(p) for p in groups[1]['params']} == dm
    assert not dm & {id(p) for p in groups[0]['params']} and len(groups[0]['params']) > 0
    for it in (1, 2, 3):
        model.update_learning_rate(it)
        model.feed_data(batch(90 + it))
        model.optimize_parameters(it)
    assert [g['lr'] for g in groups] == pytest.approx([5e-4, 2.5e-3])
    plain = build(stage2_opt(stage1_ckpt))
    assert len(plain.optimizer_g.param_groups) == 1


def test_dm_warmup_keeps_the_ema_dm_equal_to_the_dm(stage1_ckpt):
    model = build(stage2_opt(stage1_ckpt, dm_warmup_iter=2, ema_decay=0.9))
    ema_dn = {k: v for k, v in snapshot(model.net_g_ema).items() if not k.startswith('dm.')}
    for it in (1, 2):
        model.feed_data(batch(100 + it))
        model.optimize_parameters(it)
    dm, ema_dm = model.bare('g').dm.state_dict(), model.net_g_ema.dm.state_dict()
    assert all(torch.equal(v, ema_dm[k]) for k, v in dm.items())
    assert all(torch.equal(v, model.net_g_ema.state_dict()[k]) for k, v in ema_dn.items())


@pytest.mark.parametrize('stage, train, network_g, match', [
    (1, {'dm_warmup_iter': 5}, {}, 'dm_warmup_iter is a stage-2 option'),
    (1, {'dm_lr': 1e-3}, {}, 'dm_lr is a stage-2 option'),
    (2, {'dm_lr': '2e-4'}, {}, 'train.dm_lr: must be a number > 0'),  # YAML 1.1 reads 2e-4 as text
    (2, {'dm_warmup_iter': -1}, {}, 'dm_warmup_iter'),
    (2, {'dm_warmup_iter': 5, 'use_tpe': False}, {}, 'dm_warmup_iter.*train.use_tpe'),
    (2, {'dm_lr': 1e-3}, {'use_dm': False}, 'dm_lr: network_g.use_dm is false'),
])
def test_dm_start_options_are_checked(stage1_ckpt, tmp_path, stage, train, network_g, match):
    opt = stage2_opt(stage1_ckpt, **train) if stage == 2 else make_opt(str(tmp_path), stage=1, **train)
    opt['network_g'].update(network_g)
    opt['path']['strict_load_g'] = not network_g  # the w/o-DM net loads the stage-1 DN without its DM
    with pytest.raises(UserError, match=match):
        build(opt)
