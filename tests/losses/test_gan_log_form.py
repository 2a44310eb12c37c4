"""``gan_type: vanilla`` is the paper's log form: the losses on known logits, and discriminators that output logits.

Paper: L = E[log D(s)] + E[log(1 - D(DN(b)))] with D(x) = sigmoid(logit). basicsr's ``GANLoss('vanilla')`` is
``BCEWithLogitsLoss``: the discriminator minimises -log D(real) - log(1 - D(fake)) (the negated objective) and
the generator the non-saturating -log D(fake). ``WaveletGANLoss`` is the same loss on the wavelet bands.
"""
import math

import pytest
import torch
from torch import nn

from basicsr.archs import build_network
from basicsr.losses import build_loss

LOGITS = torch.tensor([-3.0, -0.5, 0.0, 1.25, 4.0]).view(1, 1, 1, 5)


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize('opt', [{'type': 'GANLoss', 'gan_type': 'vanilla', 'loss_weight': 0.7},
                                 {'type': 'WaveletGANLoss', 'gan_type': 'vanilla', 'loss_weight': 0.7}])
def test_vanilla_is_the_log_form_on_known_logits(opt):
    loss = build_loss(dict(opt))
    logits = LOGITS.flatten().tolist()
    d_real = _mean([-math.log(_sigmoid(v)) for v in logits])  # -E[log D(s)]
    d_fake = _mean([-math.log(1 - _sigmoid(v)) for v in logits])  # -E[log(1 - D(DN(b)))]
    assert loss(LOGITS, True, is_disc=True).item() == pytest.approx(d_real, rel=1e-6)
    assert loss(LOGITS, False, is_disc=True).item() == pytest.approx(d_fake, rel=1e-6)
    # the generator: the non-saturating -E[log D(DN(b))], with lambda
    assert loss(LOGITS, True, is_disc=False).item() == pytest.approx(0.7 * d_real, rel=1e-6)
    # the discriminator's two terms are the paper's objective, negated
    real, fake = torch.tensor([[[[2.0]]]]), torch.tensor([[[[-1.0]]]])
    paper = math.log(_sigmoid(2.0)) + math.log(1 - _sigmoid(-1.0))
    assert (loss(real, True, is_disc=True) + loss(fake, False, is_disc=True)).item() == pytest.approx(-paper, rel=1e-6)
    # lsgan (still available) gives other values on the same logits
    ls = build_loss(dict(opt, gan_type='lsgan'))
    assert ls(LOGITS, True, is_disc=True).item() == pytest.approx(_mean([(v - 1) ** 2 for v in logits]), rel=1e-6)


def test_vanilla_does_not_saturate_on_confident_logits():
    """Logits, not probabilities: a confident wrong logit costs about |logit|, not at most log 2 or 1."""
    loss = build_loss({'type': 'GANLoss', 'gan_type': 'vanilla'})
    assert loss(torch.full((1, 1, 2, 2), -20.0), True, is_disc=True).item() == pytest.approx(20.0, rel=1e-6)


@pytest.mark.parametrize('norm', ['spectral', 'instance', 'none'])
def test_patch_discriminator_outputs_logits(norm):
    """No sigmoid anywhere: the last layer is a conv, and its outputs take both signs and leave [0, 1]."""
    torch.manual_seed(0)
    disc = build_network({'type': 'PatchDiscriminator', 'in_ch': 3, 'base_ch': 8, 'num_layers': 2, 'norm': norm})
    assert not any(isinstance(m, (nn.Sigmoid, nn.Tanh)) for m in disc.modules())
    last = disc.body[-1]
    assert isinstance(last, nn.Conv2d)
    x = torch.rand(2, 3, 32, 32)
    disc.eval()  # spectral norm: no power iteration between the two calls
    with torch.no_grad():
        last.bias.fill_(-5.0)
        low = disc(x)
        last.bias.fill_(5.0)
        high = disc(x)
    assert low.max() < 0 and high.min() > 1  # neither is a probability
    assert torch.allclose(high - low, torch.full_like(low, 10.0))  # affine in the last conv's bias
