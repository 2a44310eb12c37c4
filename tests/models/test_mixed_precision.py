"""``train.amp``: the default is today's fp32 bit for bit; ``bf16`` runs the training forwards and losses under
bf16 autocast (on CPU here) with fp32 weights, gradients and logged losses, close to fp32's losses, and checked
early. The NaN guard under bf16 is tested in test_numerical_guard.py (its model fixture runs both precisions)."""
import math

import pytest
import torch

from model_helpers import batch, build
from test_numerical_guard import same
from test_tpdiff_model import make_opt as tpdiff_opt, stage1_ckpt, stage2_opt  # noqa: F401  (fixture)
from test_unpaired_cycle_model import make_opt
from tpdiff_plugin.option_check import validate_schema
from tpdiff_plugin.utils.errors import UserError


def run(opt, iterations=2, seed=3):
    """A model of ``opt`` after ``iterations`` training iterations: (model, logged losses of each)."""
    model = build(opt, seed=seed)
    logs = []
    for it in range(1, iterations + 1):
        model.feed_data(batch(10 + it))
        model.optimize_parameters(it)
        logs.append(model.get_current_log())
    return model, logs


def params(model):
    return {label: {k: v.detach().clone() for k, v in model.bare(label).named_parameters()}
            for label in model.net_labels}


def test_default_and_none_are_the_fp32_run_bit_for_bit():
    """No key, ``amp: none`` and ``amp: ~`` give the same losses and weights, with no autocast anywhere."""
    base, base_logs = run(make_opt(r1_weight=1.0, fine_change_opt={'type': 'L1Loss', 'loss_weight': 1.0}))
    for value in ('none', None):
        model, logs = run(make_opt(r1_weight=1.0, fine_change_opt={'type': 'L1Loss', 'loss_weight': 1.0}, amp=value))
        assert model.amp == 'none'
        assert logs == base_logs  # python floats, compared exactly
        assert same(params(model), params(base))
    assert 'l_d_r1' in base_logs[0] and 'l_fine' in base_logs[0]


def _conv_output_dtypes(net):
    dtypes = set()
    handles = [m.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
               for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    return dtypes, handles


@pytest.mark.parametrize('stage', [1, 2])
def test_bf16_trains_in_bf16_with_fp32_weights_and_gradients(stage, stage1_ckpt, tmp_path):  # noqa: F811
    opt = tpdiff_opt(str(tmp_path), stage=1, amp='bf16', r1_weight=1.0) if stage == 1 else \
        stage2_opt(stage1_ckpt, amp='bf16', r1_weight=1.0)
    model = build(opt, seed=5)
    assert model.amp == 'bf16'
    dtypes, handles = _conv_output_dtypes(model.bare('g'))
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    for h in handles:
        h.remove()
    assert torch.bfloat16 in dtypes  # DN's convolutions ran in bf16
    log = model.get_current_log()
    assert all(isinstance(v, float) and math.isfinite(v) for k, v in log.items() if k.startswith('l_')), log
    assert 'l_d_r1' in log and (stage == 1 or 'l_diff' in log)
    for label in model.net_labels:  # weights, gradients and Adam moments stay fp32
        for name, p in model.bare(label).named_parameters():
            assert p.dtype == torch.float32, (label, name)
            assert p.grad is None or p.grad.dtype == torch.float32, (label, name)
    for optimizer in model.optimizers:
        for state in optimizer.state.values():
            assert all(v.dtype == torch.float32 for k, v in state.items() if k.startswith('exp_avg'))
    for label in model.generator_labels + model.discriminator_labels:  # every trainable net got gradients
        grads = [p.grad for p in model.bare(label).parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), label
        assert sum(g.abs().sum() for g in grads) > 0, label
    assert all(p.dtype == torch.float32 for pool in model.pools.values() for p in pool.images)

    # the loss terms handed to the guard, the backward and the log are fp32
    model._set_d_requires_grad(False)
    total, losses = model.amp_losses(model.generator_losses)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in losses.values())
    # D_W's input bands are computed in fp32 inside the autocast context
    images = torch.rand(2, 3, 16, 16)
    with model.autocast():
        bands = model.wave_bands(images)
        assert torch.nn.functional.conv2d(images, torch.ones(1, 3, 1, 1)).dtype == torch.bfloat16
    assert bands.dtype == torch.float32 and torch.equal(bands, model.cri_wave.highpass(images))

    # validation / test is not autocast: model.test() is DN's fp32 output
    lq = torch.rand(1, 3, 24, 24)
    model.feed_data({'lq': lq})
    model.test()
    assert model.output.dtype == torch.float32
    output = model.output
    model.amp = 'none'
    model.test()
    assert torch.equal(model.output, output)


@pytest.mark.parametrize('model_type', ['UnpairedCycleModel', 'TPDiffModel'])
def test_bf16_losses_are_close_to_fp32s(model_type, tmp_path):
    """The same weights and batches: every logged loss of 2 iterations within 5% (bf16 keeps ~3 digits; here all
    were within 1%). R1 runs in fp32: at iteration 1 (the discriminators not updated yet) it is fp32's (on CPU;
    in bf16 it was 0.1-0.5% off)."""
    extra = dict(r1_weight=1.0, identity_opt={'type': 'L1Loss', 'loss_weight': 0.5})
    make = (lambda **t: make_opt(**t, **extra)) if model_type == 'UnpairedCycleModel' else \
        (lambda **t: tpdiff_opt(str(tmp_path), stage=1, **t, **extra))
    _, fp32_logs = run(make())
    _, bf16_logs = run(make(amp='bf16'))
    for fp32_log, bf16_log in zip(fp32_logs, bf16_logs):
        assert fp32_log.keys() == bf16_log.keys()
        losses = [k for k in fp32_log if k.startswith('l_')]  # not the TPE usage statistics
        for k in losses:
            assert bf16_log[k] == pytest.approx(fp32_log[k], rel=5e-2, abs=1e-3), k
        assert any(bf16_log[k] != fp32_log[k] for k in losses)  # and bf16 did run: not the fp32 numbers
    assert bf16_logs[0]['l_d_r1'] == pytest.approx(fp32_logs[0]['l_d_r1'], rel=1e-5)


@pytest.mark.parametrize('value', ['fp16', 'BF16', True, 16, ['bf16']])
def test_a_bad_amp_value_is_one_user_error_at_build_and_at_option_check(value, tmp_path):
    with pytest.raises(UserError, match=r"^train\.amp: must be one of none, bf16, got "):
        build(make_opt(amp=value))
    for opt in (make_opt(amp=value), tpdiff_opt(str(tmp_path), stage=1, amp=value)):
        with pytest.raises(UserError, match=r"^x\.yml: train\.amp: must be one of none, bf16"):
            validate_schema(opt, 'x.yml')
    validate_schema(make_opt(amp='bf16'), 'x.yml')
    validate_schema(tpdiff_opt(str(tmp_path), stage=1, amp='none'), 'x.yml')
