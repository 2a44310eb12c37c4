"""Learning check: stage-1 TP-Diff learns to deblur a known blur, well past what the identity scores.

The paper's DN learns deblurring from RN's synthetic pairs: the sharp cycle s -> RN -> DN ~ s. Here RN is
held at a known blur (a 5 px horizontal box, set exactly through ReblurUNet's kernel mode: zero last-conv
weights, logits 0 on the kernel's taps and -30 elsewhere), so what is tested is that the model's training
step turns that cycle into a DN that deblurs *held-out* images blurred the same way. The identity DN (the
untrained one: ``identity_init``) scores exactly the blurry input, so it fails the margin
(``test_the_identity_fails_the_margin``): a test that any DN passes would prove nothing.

Only the sharp cycle carries weight (``cycle_sharp_opt`` 1, everything else 0, ``sharp_cycle_trains_rb:
false``), so RN gets no gradient and stays the known blur; the discriminators still train every iteration.
32 px blocky images (strong edges), tiny networks, 120 CPU iterations (about 20 s on one core).
"""
import math

import torch
import torch.nn.functional as F

from basicsr.models import build_model

ITERS = 120
K = 5  # the blur: a K px horizontal box
MARGIN_DB = 3.0  # measured: +10.5 dB after 120 iterations (+13.6 dB after 200)


def _opt(root):
    disc = {'type': 'PatchDiscriminator', 'base_ch': 4}
    off = {'type': 'GANLoss', 'gan_type': 'lsgan', 'loss_weight': 0.0}
    return {
        'name': 'learning', 'model_type': 'TPDiffModel', 'stage': 1, 'num_gpu': 0, 'dist': False, 'rank': 0,
        'world_size': 1, 'is_train': True,
        'network_g': {'type': 'TPDiffNet', 'dim': 8, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
                      'heads': [1, 1, 1, 1], 'ffn_expansion_factor': 2.0, 'prior_ch': 8, 'prior_scale': 4,
                      'prior_hidden': 4, 'dm_feats': 8, 'dm_blocks': 1, 'dm_cond_blocks': 1, 'dm_timesteps': 3},
        'network_tpe': {'type': 'TexturePriorEncoder', 'prior_ch': 8, 'mem_slots': 16, 'prior_scale': 4,
                        'enc_ch': 4},
        'network_rb': {'type': 'ReblurUNet', 'base_ch': 4, 'num_levels': 2, 'kernel_size': K},
        'network_d_sharp': disc, 'network_d_blur': disc,
        'path': {'models': str(root), 'training_states': str(root)},
        'train': {
            'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.9, 0.999]},
            'optim_d': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.5, 0.999]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': [], 'gamma': 0.5},
            'total_iter': ITERS, 'pool_size': 0,
            'gan_opt': off, 'cycle_opt': {'type': 'L1Loss', 'loss_weight': 0.0},
            'cycle_sharp_opt': {'type': 'L1Loss', 'loss_weight': 1.0}, 'sharp_cycle_trains_rb': False,
        },
    }


def _kernel():
    k = torch.zeros(K, K)
    k[K // 2, :] = 1 / K
    return k


def _blur(x):
    """The known blur, as RN applies it (replicate padding, the same taps)."""
    return F.conv2d(F.pad(x, (K // 2,) * 4, mode='replicate'), _kernel().expand(3, 1, K, K), groups=3)


def _images(n, gen):
    return F.interpolate(torch.rand(n, 3, 8, 8, generator=gen), size=32, mode='nearest')


def _psnr(x, y):
    return 10 * math.log10(1 / F.mse_loss(x, y).item())


def _trained_model(root, iters):
    """A stage-1 model with RN set to the known blur, trained ``iters`` iterations on unpaired batches."""
    torch.manual_seed(0)
    model = build_model(_opt(root))
    rb = model.get_bare_model(model.net_rb)
    with torch.no_grad():
        rb.out_conv.bias.copy_(torch.where(_kernel().flatten() > 0, 0.0, -30.0))
    rb_before = {k: v.clone() for k, v in rb.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    for it in range(1, iters + 1):
        model.feed_data({'lq': _blur(_images(2, gen)), 'ref': _images(2, gen)})  # two draws: unpaired
        model.optimize_parameters(it)
        assert all(math.isfinite(v) for v in model.get_current_log().values())
    assert all(torch.equal(v, rb.state_dict()[k]) for k, v in rb_before.items())  # RN stayed the known blur
    return model


def _gain_db(model):
    """PSNR of DN's output over the blurry input's, on 8 held-out images (own seed) with the known blur."""
    sharp = _images(8, torch.Generator().manual_seed(2))
    blurry = _blur(sharp)
    model.feed_data({'lq': blurry, 'gt': sharp})
    model.test()  # the validation path: eval mode, the prior from the TPE's training memory
    return _psnr(model.output.clamp(0, 1), sharp) - _psnr(blurry, sharp)


def test_stage1_learns_to_deblur_a_known_blur(tmp_path):
    gain = _gain_db(_trained_model(tmp_path, ITERS))
    assert gain > MARGIN_DB, gain


def test_the_identity_fails_the_margin(tmp_path):
    """The control: the untrained DN is the identity and gains nothing, so the test above can fail."""
    gain = _gain_db(_trained_model(tmp_path, 0))
    assert abs(gain) < 1e-3, gain
    assert not gain > MARGIN_DB
