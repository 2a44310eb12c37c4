"""``train.self_enhance`` (models/self_enhancement.py): a frozen teacher's pseudo pairs train DN (TP-Diff-se).

The teacher here is a known good one: the exact inverse (in the Fourier domain) of a known circular blur, with the
blur's two taps as its weights, so T(b) is the sharp image the blurry one was made from.
"""
import copy
import os
import re

import pytest
import torch
from torch import nn

from basicsr.utils.registry import ARCH_REGISTRY
from tpdiff_plugin.option_check import validate_schema
from tpdiff_plugin.utils.errors import UserError
from conftest import tiny_net_opts
from model_helpers import build

TAPS = (0.75, 0.25)  # b = 0.75 s + 0.25 s shifted one pixel right (circularly): invertible, |H| >= 0.5


def known_blur(sharp, taps=TAPS):
    return taps[0] * sharp + taps[1] * torch.roll(sharp, 1, dims=-1)


class KnownBlurInverse(nn.Module):
    """Test teacher: undoes ``known_blur`` with the taps in its weights (exactly, up to float rounding)."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros(2))

    def forward(self, blur):
        h = torch.zeros(blur.shape[-1], device=blur.device)
        h[:2] = self.kernel
        return torch.fft.ifft(torch.fft.fft(blur, dim=-1) / torch.fft.fft(h), dim=-1).real


if 'KnownBlurInverse' not in ARCH_REGISTRY:
    ARCH_REGISTRY.register(KnownBlurInverse)

TINY_G = tiny_net_opts(dim=8, prior_hidden=4, dm_timesteps=3, prior_scale=4)  # as test_tpdiff_model's


@pytest.fixture(scope='module')
def teacher_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('teacher') / 'teacher.pth'
    torch.save({'params': {'kernel': torch.tensor(TAPS)}}, path)
    return str(path)


def make_opt(root, teacher_weights, stage=1, enhance=True, **se):
    disc = {'type': 'PatchDiscriminator', 'base_ch': 4, 'num_layers': 2}
    opt = {
        'name': f'se_s{stage}', 'model_type': 'TPDiffModel', 'stage': stage, 'num_gpu': 0, 'dist': False,
        'rank': 0, 'world_size': 1, 'is_train': True, 'manual_seed': 0, 'network_g': dict(TINY_G),
        'network_tpe': {'type': 'TexturePriorEncoder', 'prior_ch': 8, 'mem_slots': 16, 'prior_scale': 4, 'enc_ch': 4},
        'network_rb': {'type': 'ReblurUNet', 'base_ch': 4, 'num_levels': 2, 'identity_init': False},
        'network_d_sharp': dict(disc), 'network_d_blur': dict(disc),
        'path': {'models': os.path.join(root, f's{stage}', 'models'),
                 'training_states': os.path.join(root, f's{stage}', 'training_states'), 'resume_state': None},
        'train': {'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.5, 0.999]},
                  'optim_d': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.5, 0.999]},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [], 'gamma': 0.5},
                  'total_iter': 10, 'pool_size': 0,
                  'gan_opt': {'type': 'GANLoss', 'gan_type': 'lsgan', 'loss_weight': 1.0},
                  'cycle_opt': {'type': 'L1Loss', 'loss_weight': 0.1}},
    }
    if stage == 2:
        opt['train']['diff_opt'] = {'type': 'L1Loss', 'loss_weight': 1.0}
    if enhance:
        opt['train']['self_enhance'] = {'teacher': {'type': 'KnownBlurInverse'}, 'teacher_weights': teacher_weights,
                                        **se}
    for key in ('models', 'training_states'):
        os.makedirs(opt['path'][key], exist_ok=True)
    return opt


def data(seed, n=2, size=32):
    """Unpaired batch: ``lq`` is the known blur of sharp images other than ``ref``; also those sharp images."""
    g = torch.Generator().manual_seed(seed)
    sharp_of_lq = torch.rand(n, 3, size, size, generator=g)
    return {'lq': known_blur(sharp_of_lq), 'ref': torch.rand(n, 3, size, size, generator=g)}, sharp_of_lq


def dn_params(model):
    return [p for p in model.bare('g').parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------- the teacher
def test_the_teacher_is_exact_frozen_untrained_and_not_saved(tmp_path, teacher_weights):
    model = build(make_opt(str(tmp_path), teacher_weights))
    teacher = model.self_enhance.teacher
    batch, sharp_of_lq = data(1)
    torch.testing.assert_close(teacher(batch['lq']), sharp_of_lq, atol=1e-5, rtol=0)  # the known good teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimized = {id(p) for group in model.optimizer_g.param_groups for p in group['params']}
    assert not any(id(p) in optimized for p in teacher.parameters())
    for it in (1, 2):
        model.feed_data(data(it)[0])
        model.optimize_parameters(it)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert model.log_dict['l_self_enhance'] > 0
    model.save(0, 2)
    saved = sorted(os.listdir(os.path.join(str(tmp_path), 's1', 'models')))
    assert saved == sorted(f'net_{label}_2.pth' for label in ('g', 'tpe', 'rb', 'd_sharp', 'd_blur'))


@pytest.mark.parametrize('pairs', ['pseudo_sharp', 'reblurred'])
def test_the_loss_is_logged_and_its_gradient_reaches_dn(tmp_path, teacher_weights, pairs):
    model = build(make_opt(str(tmp_path), teacher_weights, pairs=pairs))
    model.feed_data(data(1)[0])
    _, losses = model.generator_losses()
    assert 'l_self_enhance' in losses
    grads = torch.autograd.grad(losses['l_self_enhance'], dn_params(model), allow_unused=True, retain_graph=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    rb = torch.autograd.grad(losses['l_self_enhance'], list(model.bare('rb').parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in rb)  # RN(T(b)) is a detached input


def test_each_pairs_mode_changes_the_loss(tmp_path, teacher_weights):
    """pseudo_sharp = L1(DN(b), T(b)); reblurred = L1(DN(RN(T(b))), T(b)); both is their sum; the total grows by
    exactly the term (the cycle's own losses are unchanged by the extra chunk)."""
    model = build(make_opt(str(tmp_path), teacher_weights))
    model.feed_data(data(1)[0])
    se, values = model.self_enhance, {}
    for label in model.discriminator_labels:  # eval: spectral norm's power iteration would move D between calls
        model.bare(label).eval()
    with torch.no_grad():
        model.self_enhance = None
        total_off, _ = model.generator_losses()
        model.self_enhance = se
        for pairs in ('pseudo_sharp', 'reblurred', 'both'):
            se.pairs = pairs
            total, losses = model.generator_losses()
            values[pairs] = float(losses['l_self_enhance'])
            assert float(total - total_off) == pytest.approx(values[pairs], rel=1e-4)
            if pairs == 'pseudo_sharp':  # DN(b) of the cycle against T(b), by hand
                target = se.teacher(model.lq).clamp(0, 1)
                assert values[pairs] == pytest.approx(float((model.fake_s - target).abs().mean()), rel=1e-5)
    assert len(set(values.values())) == 3
    assert values['both'] == pytest.approx(values['pseudo_sharp'] + values['reblurred'], rel=1e-4)


def test_the_pseudo_blurry_chunk_reads_the_memory_b_reads(tmp_path, teacher_weights, monkeypatch):
    """Its prior is b's (the memory written from the unpaired sharp batch, written once), not the sharp cycle's."""
    model = build(make_opt(str(tmp_path), teacher_weights, pairs='reblurred'))
    tpe, g = model.bare('tpe'), model.bare('g')
    first, _ = data(1)
    first['ref'] = torch.zeros_like(first['ref'])  # a sharp batch unlike the next one, so the two memories differ
    model.feed_data(first)
    model.optimize_parameters(1)
    batch, _ = data(2)
    model.feed_data(batch)
    model.other_sharp, model.last_sharp = model.last_sharp, batch['ref']  # as optimize_parameters(2) sets them
    written, seen = [], {}
    real_write = tpe.write
    monkeypatch.setattr(tpe, 'write', lambda sharp: written.append(sharp) or real_write(sharp))
    real_loss = model.self_enhance.loss
    monkeypatch.setattr(model.self_enhance, 'loss',
                        lambda dn_b, dn_p, target: seen.update(dn_p=dn_p) or real_loss(dn_b, dn_p, target))
    with torch.no_grad():
        model.generator_losses()
        target, pseudo = model.self_enhance.targets(batch['lq'], model.bare('rb'))
        expected = g(pseudo, prior=tpe.read(pseudo, real_write(batch['ref'])))
        sharp_cycle_prior = g(pseudo, prior=tpe.read(pseudo, real_write(model.other_sharp)))
    assert len(written) == 2  # s and the previous sharp batch, as without self-enhancement
    torch.testing.assert_close(seen['dn_p'], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(seen['dn_p'], sharp_cycle_prior, atol=1e-4)


def test_stage2_trains_with_the_teacher_through_the_dm_path(tmp_path, teacher_weights):
    stage1 = build(make_opt(str(tmp_path), teacher_weights, enhance=False))
    stage1.feed_data(data(1)[0])
    stage1.optimize_parameters(1)
    stage1.save(0, 1)
    opt = make_opt(str(tmp_path), teacher_weights, stage=2, pairs='both')
    for label in ('g', 'tpe', 'rb'):
        opt['path'][f'pretrain_network_{label}'] = os.path.join(str(tmp_path), 's1', 'models', f'net_{label}_1.pth')
    model = build(opt)
    before = [p.clone() for p in model.bare('g').dm.parameters()]
    model.feed_data(data(2)[0])
    model.optimize_parameters(1)
    assert {'l_self_enhance', 'l_diff'} <= set(model.log_dict)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.bare('g').dm.parameters()))
    assert all(p.grad is None for p in model.self_enhance.teacher.parameters())


# ---------------------------------------------------------------------------------------------- learning
def train_distance(root, teacher_weights, iters, **se):
    """L1 between DN's output and the teacher's (= the true sharp image) on held-out blurry images after
    ``iters`` iterations on the known blur. The adversarial terms are off (weight 0): with them a tiny run's
    outcome swings by more than the effect measured here."""
    opt = make_opt(root, teacher_weights, **se)
    opt['train']['gan_opt']['loss_weight'] = 0.0
    model = build(opt)
    for it in range(1, iters + 1):
        model.feed_data(data(it)[0])
        model.optimize_parameters(it)
    batch, sharp_of_lq = data(1000, n=4)
    g = model.bare('g')
    g.eval()
    with torch.no_grad():
        out = g(batch['lq'], prior=model.bare('tpe').read(batch['lq'], memory=model.inference_memory()))
    return float((out - sharp_of_lq).abs().mean())


def test_dn_moves_toward_a_good_teacher(tmp_path, teacher_weights):
    """12 iterations (measured: 0.084 with the option, 0.115 without, 0.103 at the start)."""
    start = train_distance(str(tmp_path / 'start'), teacher_weights, 0)
    off = train_distance(str(tmp_path / 'off'), teacher_weights, 12, enhance=False)
    on = train_distance(str(tmp_path / 'on'), teacher_weights, 12, pairs='pseudo_sharp')
    assert on < 0.9 * start and on < 0.85 * off, (on, off, start)


def test_start_iter_defers_the_term(tmp_path, teacher_weights):
    off = train_distance(str(tmp_path / 'off'), teacher_weights, 3, enhance=False)
    late = train_distance(str(tmp_path / 'late'), teacher_weights, 3, pairs='both', start_iter=4)
    at_3 = train_distance(str(tmp_path / 'at_3'), teacher_weights, 3, pairs='both', start_iter=3)
    assert late == off  # not switched on within the run: the run without the option, bit for bit
    assert at_3 != off


# ---------------------------------------------------------------------------------------------- bad options
BAD = [({'pairs': 'sharp'}, 'train.self_enhance.pairs'),
       ({'teacher_weights': None}, 'train.self_enhance.teacher_weights'),
       ({'teacher_weights': 'nowhere/teacher.pth'}, 'train.self_enhance.teacher_weights: no such checkpoint'),
       ({'teachr': {}}, 'train.self_enhance.teachr: unknown option; did you mean "teacher"'),
       ({'start_iter': -1}, 'train.self_enhance.start_iter'),
       ({'teacher': {'type': 'NoSuchNet'}}, 'train.self_enhance.teacher.type'),
       ({'teacher': 'KnownBlurInverse'}, 'train.self_enhance.teacher'),
       ({'loss_opt': {'type': 'NoSuchLoss'}}, 'train.self_enhance.loss_opt.type'),
       ({'param_key': 3}, 'train.self_enhance.param_key')]


@pytest.mark.parametrize('change, message', BAD, ids=[next(iter(change)) for change, _ in BAD])
def test_bad_options_name_the_key_early_and_at_build(tmp_path, teacher_weights, change, message):
    opt = make_opt(str(tmp_path), teacher_weights)
    opt['train']['self_enhance'].update(change)
    with pytest.raises(UserError, match='^' + re.escape(f'x.yml: {message}')):
        validate_schema(copy.deepcopy(opt), 'x.yml')
    with pytest.raises(UserError, match='^' + re.escape(message)):
        build(opt)


@pytest.mark.parametrize('content', ['garbage', 'misfit', 'no_key'])
def test_unloadable_teacher_weights_name_the_key(tmp_path, teacher_weights, content):
    path = tmp_path / 'bad.pth'
    if content == 'garbage':
        path.write_bytes(b'not a checkpoint')
    else:
        torch.save({'params' if content == 'misfit' else 'weights': {'kernel': torch.zeros(3)}}, path)
    opt = make_opt(str(tmp_path), str(path))
    validate_schema(copy.deepcopy(opt), 'x.yml')  # a file is there: only loading it can tell
    with pytest.raises(UserError, match=r'^train\.self_enhance\.teacher_weights: .*bad\.pth'):
        build(opt)
