"""Parsing of the ``train`` options that shape ``UnpairedCycleModel``'s objective beyond the paper's losses,
and the degradation applied to the synthetic blurry images of the sharp cycle.

Each option is documented in ``options/README.md``; here each is checked once, with a one-line UserError
naming it.
"""
import torch
import torch.nn.functional as F
from basicsr.utils import get_root_logger

from tpdiff_plugin.archs.arch_util import gaussian_lowpass
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.option_files import check_int, is_number


def int_option(train_opt, key, default, minimum=1):
    """``train.<key>`` (``default`` when absent), checked to be an integer >= ``minimum`` (the check
    ``basicsr train`` already made on the options file, for models built from Python)."""
    value = train_opt.get(key, default)
    check_int(value, f'train.{key}', minimum, source='')
    return int(value)


def channels_last_training(train_opt, device):
    """``train.channels_last`` (``auto``, default; true; false) as a bool for ``device``: every network of the
    model is kept in ``torch.channels_last`` memory. ``auto``: on CPU, where mkldnn's convolutions and their
    backward run faster so (a demo stage-2 iteration measured 1.02-1.29x faster, bench/README.md, issue 10), not on
    CUDA (unmeasured there)."""
    value = train_opt.get('channels_last', 'auto')
    if not (isinstance(value, bool) or value == 'auto'):  # 1 == True and 1.0 == True: test the type
        raise UserError(f'train.channels_last: must be auto, true or false, got {value!r}')
    return device.type == 'cpu' if value == 'auto' else value


def noise_range(value):
    """``train.sharp_cycle_noise`` as ``(low, high)`` in 0-255 units, or None."""
    if value is None:
        return None
    pair = value if isinstance(value, (list, tuple)) else [value, value]
    if len(pair) != 2 or not all(is_number(v) and v >= 0 for v in pair) or pair[0] > pair[1]:
        raise UserError(f'train.sharp_cycle_noise: must be a sigma >= 0 or a range [low, high] (0-255 units), '
                        f'got {value!r}')
    return float(pair[0]), float(pair[1])


def r1_weights(value, known, present):
    """``train.r1_weight`` (one gamma for every D, or ``{label: gamma}``) as ``{D label: gamma > 0}`` over the
    discriminators ``present``; ``known`` are the labels a mapping may name."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise UserError(f'train.r1_weight: unknown discriminator {unknown[0]!r} (known: {", ".join(known)})')
        weights = value
    else:
        weights = {label: value for label in present}
    out = {}
    for label, w in weights.items():
        if not is_number(w) or w < 0:
            raise UserError(f'train.r1_weight: must be a number >= 0 (or a mapping of them), got {w!r}')
        if w > 0 and label in present:
            out[label] = float(w)
    return out


def noisy_8bit(images, low, high):
    """``images [B, C, H, W]`` in [0, 1] plus Gaussian noise of a per-image sigma drawn from [low, high] (0-255
    units), rounded to 8 bits with a straight-through estimator (gradients pass as if not rounded)."""
    sigma = torch.empty(images.shape[0], 1, 1, 1, device=images.device).uniform_(low, high) / 255
    noisy = (images + torch.randn_like(images) * sigma).clamp(0, 1)
    return noisy + (torch.round(noisy * 255) / 255 - noisy).detach()


def wave_enabled(train_opt, has_d_wave):
    """Whether the wavelet adversarial term (``train.wave_opt`` with ``network_d_wave``) is on; the two must come
    together (one UserError naming the missing one). A ``loss_weight`` of 0 turns both off."""
    wave_opt = train_opt.get('wave_opt')
    if wave_opt and not has_d_wave:
        raise UserError('train.wave_opt is set but network_d_wave is missing: add a PatchDiscriminator '
                        'with in_ch: 9 as network_d_wave, or remove train.wave_opt')
    if has_d_wave and not wave_opt:
        raise UserError('network_d_wave is set but train.wave_opt is missing: add '
                        '{type: WaveletGANLoss, loss_weight: 0.2} or remove network_d_wave')
    if not wave_opt:
        return False
    if float(wave_opt.get('loss_weight', 1.0)) == 0:
        get_root_logger().info('train.wave_opt.loss_weight is 0: wavelet adversarial loss and D_W are off.')
        return False
    return True


def sharp_d_view(scale):
    """What D_S and D_W see of a sharp image, real s or DN's output (``train.sharp_d_scale``): the image averaged
    over ``scale`` x ``scale`` blocks (1: as it is). With 2, the discriminators cannot ask for detail at the 1-2
    pixel scale, which blur hides and noise buries; DN's output there is shaped by the cycle losses alone
    (bench/README.md, round 5: on the demo that made DN's invented fine detail worse, not better)."""
    if scale == 1:
        return lambda images: images
    return lambda images: F.avg_pool2d(images, scale)


def positive_number(value, name):
    if not is_number(value) or value <= 0:
        raise UserError(f'{name}: must be a number > 0, got {value!r}')
    return float(value)


def fine_detail(images, sigma):
    """``images [B, C, H, W]`` minus their Gaussian blur of ``sigma`` px: the detail finer than about 2 sigma
    (``train.fine_change_opt`` compares DN's output and its input there)."""
    return images - gaussian_lowpass(images, sigma)
