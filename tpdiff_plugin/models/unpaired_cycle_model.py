"""UnpairedCycleModel: the unpaired blurry <-> sharp cycle that TP-Diff trains (and our CycleGAN baseline).

Networks (options ``network_<label>``; checkpoints ``net_<label>_<iter>.pth``):
  g        DN, the deblurring network b -> s (any registered net; TPDiffNet for TP-Diff)
  rb       RN, the reblurring network s -> b (ReblurUNet)
  d_sharp  D_S on sharp images; d_blur: D_B on blurry images
  d_wave   D_W on wavelet detail bands of sharp images (optional, with ``train.wave_opt``)

One iteration (batch: ``lq`` = blurry b, ``ref`` = an unpaired sharp s):
  G step (``optim_g``: DN + RN, D frozen)
    b~ = RN(s);  [s^, s~~(, s=)] = DN([b, b~(, s)]);  b^^ = RN(s^)
    l_g_gan_sharp = GAN(D_S(s^), real)      l_g_gan_blur = GAN(D_B(b~), real)
    l_cyc_blur = L1(b^^, b)                 l_cyc_sharp = L1(s~~, s)
    l_g_wave = WaveGAN(D_W(Phi(s^)), real)  (+ subclass terms, e.g. l_diff)
    l_idt = L1(s=, s)                       (only with ``train.identity_opt``)
    l_g_total = sum of the above; every term already carries its ``loss_weight`` (basicsr convention),
    so the paper's 1 GAN + 0.1 CYC + 0.2 Wave are the ``loss_weight`` of gan_opt / cycle_opt / wave_opt.
  D step (``optim_d``: every D; every ``train.d_update_every``-th iteration)
    fakes pass through the history pools (``train.pool_size``, CycleGAN's 50; 0 = off), then
    l_d_<d>_real / l_d_<d>_fake = GAN(D(real), real) / GAN(D(fake), fake); l_d_total = half their sum
    (+ l_d_r1 with ``train.r1_weight``).

Training options beyond the paper's losses (all off by default, so the paper options train the paper's
objective; the demo recipe and ``bench/quality.py`` use them):
  cycle_sharp_opt        its own loss for the sharp cycle s -> RN -> DN (default: ``cycle_opt``). That
                         cycle is the supervised signal DN gets from RN's synthetic pairs (b~, s).
  gan_sharp_opt          its own GAN loss for D_S, i.e. DN's adversarial term l_g_gan_sharp (default:
                         ``gan_opt``, which then serves D_B / RN only).
  sharp_cycle_trains_rb  false: DN's input b~ in the sharp cycle is detached, so that cycle trains DN only
                         and RN cannot make its blur easier to undo instead of more realistic (default true).
  sharp_cycle_noise      sigma of Gaussian noise (0-255 units; a number or a [low, high] range drawn per image)
                         added to b~ = RN(s), then rounded to 8 bits, before DN sees it in the sharp cycle.
                         Real blurry photos are noisy and quantised; a noise-free b~ teaches DN an inverse
                         filter that amplifies their noise (default: none).
  identity_opt           L1 on DN(s) against s: a sharp image should pass DN unchanged (CycleGAN's identity
                         loss), which keeps colours and flat regions; DN sees a third chunk, s.
  r1_weight              gamma of the R1 penalty (gamma/2 E|grad_x D(x)|^2 on real images): one number for
                         every D, or a mapping ``{d_sharp: 1, d_wave: 1}`` (Ds not named: 0).
  d_update_every         update the discriminators every k-th iteration only (default 1).

Numerical guard: when any G or D loss term is NaN/Inf the iteration changes nothing (no optimizer step,
no history-pool push, no EMA update; a bad D loss after a good G step skips only the D step), the bad
terms are logged, and after ``train.max_bad_iters`` (default 10) such iterations in a row training
stops with a ``UserError`` (the checkpoints already written are untouched). Mixed precision is not
supported by this model (it never autocasts), so the guard covers fp32 training.

Validation/test: ``net_g(lq)`` (the EMA copy when ``train.ema_decay`` > 0) with basicsr metrics, through
``SRModel.nondist_validation``. ``save`` writes every network, the optimizers, schedulers and the pools.
"""
import copy
import os
from collections import OrderedDict

import torch
import torch.distributed as dist

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from tpdiff_plugin import compat
from tpdiff_plugin.utils.errors import UserError


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(train_opt, key, default):
    """``train.<key>`` (``default`` when absent), checked to be an integer >= 1."""
    value = train_opt.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f'train.{key}: must be a positive integer, got {value!r}')
    return value


class ImageHistoryPool:
    """CycleGAN's history of generated images, so a discriminator also sees older fakes.

    ``query(images [B, C, H, W]) -> [B, C, H, W]``: until ``size`` images are stored each new image is
    stored and returned; after that each returned image is, with probability 1/2, a stored one (replaced
    by the new image) and otherwise the new one. ``size == 0`` returns the input. Images are detached.
    Uses torch's global RNG, so runs are reproducible under basicsr's ``manual_seed``.
    """

    def __init__(self, size):
        self.size = int(size)
        self.images = []

    def query(self, images):
        images = images.detach()
        if self.size <= 0:
            return images
        if self.images and self.images[0].shape != images.shape[1:]:
            self.images = []  # the patch size changed (e.g. resumed with another gt_size): start afresh
        out = []
        for img in images:
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif torch.rand(()).item() < 0.5:
                k = int(torch.randint(len(self.images), ()).item())
                out.append(self.images[k])
                self.images[k] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self):
        """The stored images as one CPU tensor ``[n, C, H, W]`` (``[0]`` when empty)."""
        return torch.stack(self.images).cpu() if self.images else torch.zeros(0)

    def load_state_dict(self, images, device):
        self.images = [] if images.numel() == 0 else list(images.to(device).unbind(0))[:self.size]


@MODEL_REGISTRY.register()
class UnpairedCycleModel(SRModel):
    """Generic unpaired cycle model: DN, RN, D_S, D_B (+ optional D_W). See the module docstring.

    SRModel is the base for its validation contract (``nondist_validation``, ``get_current_visuals``,
    metric bookkeeping); its ``__init__`` (one net_g, a pixel loss) is replaced by ours.
    """

    #: labels of the discriminators this model may hold, in optimizer order
    D_LABELS = ('d_sharp', 'd_blur', 'd_wave')

    def __init__(self, opt):
        BaseModel.__init__(self, copy.deepcopy(opt))
        self.net_labels = []  # every network held, in save order
        self.frozen_labels = set()  # held but never trained (kept in eval mode, in no optimizer)
        train_opt = self.opt.get('train') or {}
        self.use_wave = self.is_train and self._wave_enabled(train_opt)
        self.define_networks()
        if self.is_train:
            self.init_training_settings()

    # ------------------------------------------------------------------ networks
    def _wave_enabled(self, train_opt):
        wave_opt, has_d = train_opt.get('wave_opt'), 'network_d_wave' in self.opt
        if wave_opt and not has_d:
            raise UserError('train.wave_opt is set but network_d_wave is missing: add a PatchDiscriminator '
                            'with in_ch: 9 as network_d_wave, or remove train.wave_opt')
        if has_d and not wave_opt:
            raise UserError('network_d_wave is set but train.wave_opt is missing: add '
                            '{type: WaveletGANLoss, loss_weight: 0.2} or remove network_d_wave')
        if not wave_opt:
            return False
        if float(wave_opt.get('loss_weight', 1.0)) == 0:
            get_root_logger().info('train.wave_opt.loss_weight is 0: wavelet adversarial loss and D_W are off.')
            return False
        return True

    def define_networks(self):
        """Build (and load) DN for inference; RN and the discriminators too when training."""
        self.add_network('g')
        self.define_cycle_networks()

    def define_cycle_networks(self):
        """RN and the discriminators (sharp, blurry, optional wavelet), built only for training."""
        if self.is_train:
            self.add_network('rb')
            self.add_network('d_sharp')
            self.add_network('d_blur')
            if self.use_wave:
                self.add_network('d_wave')

    def add_network(self, label, prepare=None, frozen=False):
        """Build ``network_<label>``, run ``prepare(net)``, load ``path.pretrain_network_<label>``, put it on
        the device (DDP/DP-wrapped unless ``frozen``) and keep it as ``self.net_<label>``."""
        key = f'network_{label}'
        if not isinstance(self.opt.get(key), dict) or 'type' not in self.opt[key]:
            raise UserError(f'option "{key}" is missing or has no "type": {type(self).__name__} needs it')
        net = build_network(self.opt[key])
        if prepare is not None:
            prepare(net)
        self.load_pretrained(net, label)
        if frozen:
            net.requires_grad_(False)
            net.eval()
            net = net.to(self.device)  # no DDP: a module without trainable parameters cannot be wrapped
            self.frozen_labels.add(label)
        else:
            net = self.model_to_device(net)
        self.print_network(net)
        setattr(self, f'net_{label}', net)
        self.net_labels.append(label)
        return net

    def load_pretrained(self, net, label):
        """Load ``path.pretrain_network_<label>`` into ``net`` if set; a missing file is a UserError."""
        path_opt = self.opt.get('path') or {}
        key = f'pretrain_network_{label}'
        load_path = path_opt.get(key)
        if load_path is None:
            return False
        if not os.path.isfile(load_path):
            raise UserError(f'path.{key}: no such checkpoint: {load_path}')
        self.load_network(net, load_path, path_opt.get(f'strict_load_{label}', True),
                          path_opt.get(f'param_key_{label}', 'params'))
        return True

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """Upstream ``BaseModel.load_network`` with ``weights_only=True`` and one-line errors."""
        logger = get_root_logger()
        net = self.get_bare_model(net)
        ckpt = compat.read_checkpoint(load_path, 'pretrain_network')  # weights_only=True; one-line UserError
        if not isinstance(ckpt, dict):
            raise UserError(f'{load_path}: not a basicsr checkpoint (a dict of state dicts), got {type(ckpt).__name__}')
        if param_key is not None:
            if param_key not in ckpt and 'params' in ckpt:
                logger.info(f'Loading: {param_key} does not exist in {load_path}, use params.')
                param_key = 'params'
            if param_key not in ckpt:
                raise UserError(f'{load_path}: no "{param_key}" entry (has: {", ".join(map(str, ckpt))})')
            ckpt = ckpt[param_key]
        ckpt = OrderedDict((k[7:] if k.startswith('module.') else k, v) for k, v in ckpt.items())
        logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
        self._print_different_keys_loading(net, ckpt, strict)
        try:
            net.load_state_dict(ckpt, strict=strict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise UserError(f'{load_path}: does not fit {net.__class__.__name__} as configured '
                            f'({" ".join(first[:2])}); check the network options, or set strict_load_* false') \
                from None

    @property
    def generator_labels(self):
        """Networks updated by ``optim_g``."""
        return [label for label in self.net_labels if label not in self.D_LABELS and label not in self.frozen_labels]

    @property
    def discriminator_labels(self):
        return [label for label in self.net_labels if label in self.D_LABELS]

    def net(self, label):
        return getattr(self, f'net_{label}')

    def bare(self, label):
        return self.get_bare_model(self.net(label))

    # ------------------------------------------------------------------ training setup
    def init_training_settings(self):
        train_opt = self.opt['train']
        for label in self.net_labels:
            if label not in self.frozen_labels:
                self.net(label).train()

        self.ema_decay = train_opt.get('ema_decay', 0)
        if self.ema_decay > 0:
            get_root_logger().info(f'Use Exponential Moving Average with decay: {self.ema_decay}')
            self.net_g_ema = build_network(self.opt['network_g']).to(self.device)
            load_path = self.opt['path'].get('pretrain_network_g')
            if load_path is not None:
                self.load_network(self.net_g_ema, load_path, self.opt['path'].get('strict_load_g', True), 'params_ema')
            else:
                self.model_ema(0)
            self.net_g_ema.eval()

        for key in ('gan_opt', 'cycle_opt'):
            if not train_opt.get(key):
                raise UserError(f'train.{key} is missing: {type(self).__name__} needs it '
                                '(see options/README.md)')
        self.cri_gan = build_loss(train_opt['gan_opt']).to(self.device)
        self.cri_cycle = build_loss(train_opt['cycle_opt']).to(self.device)
        self.cri_wave = build_loss(train_opt['wave_opt']).to(self.device) if self.use_wave else None
        if self.cri_wave is not None and not hasattr(self.cri_wave, 'highpass'):
            raise UserError('train.wave_opt.type must be WaveletGANLoss (a GAN loss with a wavelet highpass)')

        # None: the shared gan_opt / cycle_opt loss serves (see gan_sharp_loss / cycle_sharp_loss)
        self.cri_gan_sharp = build_loss(train_opt['gan_sharp_opt']).to(self.device) \
            if train_opt.get('gan_sharp_opt') else None
        self.cri_cycle_sharp = build_loss(train_opt['cycle_sharp_opt']).to(self.device) \
            if train_opt.get('cycle_sharp_opt') else None
        self.cri_identity = build_loss(train_opt['identity_opt']).to(self.device) if train_opt.get('identity_opt') \
            else None
        self.sharp_cycle_trains_rb = bool(train_opt.get('sharp_cycle_trains_rb', True))
        self.sharp_cycle_noise = self._noise_range(train_opt.get('sharp_cycle_noise'))
        self.r1_weights = self._r1_weights(train_opt.get('r1_weight', 0))
        self.d_update_every = _positive_int(train_opt, 'd_update_every', 1)
        self.train_stats = OrderedDict()  # logged with the losses (not summed into them), e.g. TPE memory usage

        self.max_bad_iters = _positive_int(train_opt, 'max_bad_iters', 10)
        self.bad_iters = 0  # consecutive iterations with a non-finite loss

        pool_size = train_opt.get('pool_size', 50)
        self.pools = {'sharp': ImageHistoryPool(pool_size), 'blur': ImageHistoryPool(pool_size)}

        self.setup_optimizers()
        self.setup_schedulers()

    @property
    def gan_sharp_loss(self):
        """D_S's GAN loss: ``gan_sharp_opt``'s, else the shared ``gan_opt``'s (looked up at use)."""
        return self.cri_gan_sharp or self.cri_gan

    @property
    def cycle_sharp_loss(self):
        """The sharp cycle's loss: ``cycle_sharp_opt``'s, else the shared ``cycle_opt``'s."""
        return self.cri_cycle_sharp or self.cri_cycle

    @staticmethod
    def _noise_range(value):
        """``train.sharp_cycle_noise`` as ``(low, high)`` in 0-255 units, or None."""
        if value is None:
            return None
        pair = value if isinstance(value, (list, tuple)) else [value, value]
        if len(pair) != 2 or not all(_is_number(v) and v >= 0 for v in pair) or pair[0] > pair[1]:
            raise UserError(f'train.sharp_cycle_noise: must be a sigma >= 0 or a range [low, high] (0-255 units), '
                            f'got {value!r}')
        return float(pair[0]), float(pair[1])

    def degrade_reblurred(self, fake_b):
        """``fake_b`` plus Gaussian noise of a per-image sigma from ``train.sharp_cycle_noise``, rounded to 8 bits
        (a straight-through rounding, so gradients still reach RN when the sharp cycle trains it)."""
        low, high = self.sharp_cycle_noise
        sigma = torch.empty(fake_b.shape[0], 1, 1, 1, device=fake_b.device).uniform_(low, high) / 255
        noisy = (fake_b + torch.randn_like(fake_b) * sigma).clamp(0, 1)
        return noisy + (torch.round(noisy * 255) / 255 - noisy).detach()

    def _r1_weights(self, value):
        """``train.r1_weight`` as ``{D label: gamma > 0}``."""
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(self.D_LABELS))
            if unknown:
                raise UserError(f'train.r1_weight: unknown discriminator {unknown[0]!r} (known: {", ".join(self.D_LABELS)})')
            weights = value
        else:
            weights = {label: value for label in self.discriminator_labels}
        out = {}
        for label, w in weights.items():
            if not _is_number(w) or w < 0:
                raise UserError(f'train.r1_weight: must be a number >= 0 (or a mapping of them), got {w!r}')
            if w > 0 and label in self.discriminator_labels:
                out[label] = float(w)
        return out

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        """Any ``torch.optim`` class by name (upstream 1.4.2 accepts only Adam)."""
        cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise UserError(f'train.optim_*.type: unknown optimizer "{optim_type}" (a torch.optim class, e.g. Adam)')
        return cls(params, lr, **kwargs)

    def _params(self, labels, option):
        params = []
        for label in labels:
            for name, p in self.bare(label).named_parameters():
                if p.requires_grad:
                    params.append(p)
        if not params:
            raise UserError(f'train.{option}: no trainable parameters in {labels}')
        return params

    def setup_optimizers(self):
        train_opt = self.opt['train']
        optimizers = []
        for option, labels in (('optim_g', self.generator_labels), ('optim_d', self.discriminator_labels)):
            if not train_opt.get(option):
                raise UserError(f'train.{option} is missing (e.g. {{type: Adam, lr: !!float 1e-4}})')
            optim_opt = copy.deepcopy(train_opt[option])
            optim_type = optim_opt.pop('type')
            optimizers.append(self.get_optimizer(optim_type, self._params(labels, option), **optim_opt))
        self.optimizer_g, self.optimizer_d = optimizers
        self.optimizers = optimizers

    def setup_schedulers(self):
        """Upstream's, on a copy of ``train.scheduler`` (upstream pops ``type`` from the options in place)."""
        train_opt = self.opt['train']
        saved = train_opt.get('scheduler')
        if not saved:
            raise UserError('train.scheduler is missing (e.g. {type: MultiStepLR, milestones: [], gamma: 0.5})')
        train_opt['scheduler'] = copy.deepcopy(saved)
        try:
            super().setup_schedulers()
        finally:
            train_opt['scheduler'] = saved

    # ------------------------------------------------------------------ data
    def feed_data(self, data):
        """Training items: ``lq`` (blurry) and ``ref`` (unpaired sharp). Validation: ``lq`` and ``gt``."""
        self.lq = data['lq'].to(self.device)
        if 'ref' in data:
            self.ref = data['ref'].to(self.device)
        if 'gt' in data:
            self.gt = data['gt'].to(self.device)

    # ------------------------------------------------------------------ one iteration
    def deblur_train(self, blur, sharp):
        """DN during training -> (sharp estimates, extra generator losses). Hook for subclasses.

        ``blur`` is k equal chunks along the batch dim: the real blurry batch first, then images made from
        the unpaired sharp batch ``sharp`` (RN(s), and s itself with the identity loss)."""
        return self.net_g(blur), OrderedDict()

    def generator_losses(self):
        """Forward the cycle; returns ``(l_g_total, OrderedDict of weighted terms incl. l_g_total)``."""
        b, s = self.lq, self.ref
        if b.shape[0] != s.shape[0]:
            raise ValueError(f'blurry and sharp batches differ in size: {b.shape[0]} vs {s.shape[0]}')
        n = b.shape[0]
        fake_b = self.net_rb(s)
        fake_b_in = fake_b if self.sharp_cycle_trains_rb else fake_b.detach()
        if self.sharp_cycle_noise is not None:
            fake_b_in = self.degrade_reblurred(fake_b_in)
        chunks = [b, fake_b_in]
        if self.cri_identity is not None:
            chunks.append(s)
        out, extra = self.deblur_train(torch.cat(chunks), s)  # one DN pass for all chunks
        fake_s, rec_s = out[:n], out[n:2 * n]
        rec_b = self.net_rb(fake_s)
        self.fake_s, self.fake_b = fake_s.detach(), fake_b.detach()

        losses = OrderedDict()
        # discriminators are frozen here; their bare modules keep DDP's reducer out of the G step
        losses['l_g_gan_sharp'] = self.gan_sharp_loss(self.bare('d_sharp')(fake_s), True, is_disc=False)
        losses['l_g_gan_blur'] = self.cri_gan(self.bare('d_blur')(fake_b), True, is_disc=False)
        losses['l_cyc_blur'] = self.cri_cycle(rec_b, b)
        losses['l_cyc_sharp'] = self.cycle_sharp_loss(rec_s, s)
        if self.cri_identity is not None:
            losses['l_idt'] = self.cri_identity(out[2 * n:], s)
        if self.use_wave:
            losses['l_g_wave'] = self.cri_wave(self.bare('d_wave')(self.cri_wave.highpass(fake_s)), True,
                                               is_disc=False)
        losses.update(extra)
        l_total = sum(losses.values())
        losses['l_g_total'] = l_total
        return l_total, losses

    def _d_pair(self, label, real, fake, criterion):
        pred_real, pred_fake = self.net(label)(torch.cat([real, fake])).chunk(2)  # one (DDP) forward
        return criterion(pred_real, True, is_disc=True), criterion(pred_fake, False, is_disc=True)

    def discriminator_losses(self):
        """Returns ``(l_d_total, OrderedDict)``; uses the fakes of the last ``generator_losses`` call."""
        losses = OrderedDict()
        fake_s = self.pools['sharp'].query(self.fake_s)
        fake_b = self.pools['blur'].query(self.fake_b)
        losses['l_d_sharp_real'], losses['l_d_sharp_fake'] = self._d_pair('d_sharp', self.ref, fake_s,
                                                                          self.gan_sharp_loss)
        losses['l_d_blur_real'], losses['l_d_blur_fake'] = self._d_pair('d_blur', self.lq, fake_b, self.cri_gan)
        if self.use_wave:
            hp = self.cri_wave.highpass
            pred_real, pred_fake = self.net_d_wave(torch.cat([hp(self.ref), hp(fake_s)])).chunk(2)
            losses['l_d_wave_real'] = self.cri_wave(pred_real, True, is_disc=True)
            losses['l_d_wave_fake'] = self.cri_wave(pred_fake, False, is_disc=True)
        l_total = 0.5 * sum(losses.values())
        if self.r1_weights:
            losses['l_d_r1'] = self.r1_penalty()
            l_total = l_total + losses['l_d_r1']
        losses['l_d_total'] = l_total
        return l_total, losses

    def r1_penalty(self):
        """R1 (Mescheder et al. 2018): ``gamma / 2 * E[|grad_x D(x)|^2]`` on the real images of each D with a
        weight, summed over them. Differentiable in D's parameters (double backward)."""
        reals = {'d_sharp': self.ref, 'd_blur': self.lq}
        if self.use_wave:
            reals['d_wave'] = self.cri_wave.highpass(self.ref)
        total = 0
        for label, gamma in self.r1_weights.items():
            real = reals[label].detach().requires_grad_(True)
            pred = self.bare(label)(real)  # bare: the double backward stays outside DDP's reducer
            grad, = torch.autograd.grad(pred.sum(), real, create_graph=True)
            total = total + 0.5 * gamma * grad.square().sum(dim=(1, 2, 3)).mean()
        return total

    def _set_d_requires_grad(self, flag):
        for label in self.discriminator_labels:
            for p in self.net(label).parameters():
                p.requires_grad = flag

    def _bad_terms(self, losses):
        """Names of the non-finite loss terms (agreed across DDP ranks, so all of them skip together)."""
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
        if self.opt.get('dist') and dist.is_available() and dist.is_initialized():
            flag = torch.tensor(float(bool(bad)), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not bad:
                bad = ['(on another rank)']
        return bad

    def _record_bad(self, current_iter, bad, what):
        self.bad_iters += 1
        get_root_logger().warning(f'iter {current_iter}: non-finite {", ".join(bad)}; skipped {what} '
                                  f'({self.bad_iters} bad iteration(s) in a row, limit train.max_bad_iters='
                                  f'{self.max_bad_iters})')
        if self.bad_iters >= self.max_bad_iters:
            raise UserError(f'train.max_bad_iters: {self.bad_iters} iterations in a row (up to iter {current_iter}) '
                            f'had non-finite losses (last: {", ".join(bad)}); training stopped. The checkpoints '
                            f'in {self.opt["path"].get("models", "experiments/<name>/models")} are from good '
                            'iterations: check the data for NaN/Inf, lower the learning rates, then resume with '
                            '--auto_resume')

    def optimize_parameters(self, current_iter):
        # generator step
        self._set_d_requires_grad(False)
        self.optimizer_g.zero_grad(set_to_none=True)
        l_g_total, g_losses = self.generator_losses()
        bad = self._bad_terms(g_losses)
        if bad:  # nothing changes this iteration: no G step, no D step, no pool push
            self.log_dict = self.reduce_loss_dict(g_losses)
            self._record_bad(current_iter, bad, 'the G and D updates')
            return
        l_g_total.backward()
        self.optimizer_g.step()
        if (current_iter - 1) % self.d_update_every:  # no D update this iteration
            self.log_dict = self._training_log(g_losses)
            self._good_step_done()
            return
        # discriminator step
        self._set_d_requires_grad(True)
        self.optimizer_d.zero_grad(set_to_none=True)
        pools = {k: list(p.images) for k, p in self.pools.items()}  # restored if the D loss is bad
        l_d_total, d_losses = self.discriminator_losses()
        g_losses.update(d_losses)
        self.log_dict = self._training_log(g_losses)
        bad = self._bad_terms(d_losses)
        if bad:
            for k, images in pools.items():
                self.pools[k].images = images
            self.optimizer_d.zero_grad(set_to_none=True)
            self._record_bad(current_iter, bad, 'the D update')
            return
        l_d_total.backward()
        self.optimizer_d.step()
        self._good_step_done()

    def _training_log(self, losses):
        """The losses (reduced over ranks) and the training statistics (e.g. TPE usage), for the logger."""
        log = self.reduce_loss_dict(losses)
        log.update(self.train_stats)
        return log

    def _good_step_done(self):
        self.bad_iters = 0
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    # ------------------------------------------------------------------ inference
    def deblur_test(self, net_g, lq):
        """Inference path of DN (no grad, eval mode). Hook for subclasses."""
        return net_g(lq)

    def test(self):
        ema = getattr(self, 'net_g_ema', None)
        net = ema if ema is not None else self.get_bare_model(self.net_g)  # bare: no DDP collectives on rank 0
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = self.deblur_test(net, self.lq)
        if was_training:
            net.train()

    # ------------------------------------------------------------------ save / resume
    def save(self, epoch, current_iter):
        for label in self.net_labels:
            if label == 'g' and getattr(self, 'net_g_ema', None) is not None:
                self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter,
                                  param_key=['params', 'params_ema'])
            else:
                self.save_network(self.net(label), f'net_{label}', current_iter)
        self.save_training_state(epoch, current_iter)

    def extra_training_state(self):
        """Merged into the ``.state`` file by ``compat`` (alongside optimizers and schedulers): the history
        pools, the count of bad iterations in a row, the RNG streams (python, numpy, torch) and the number of
        parameter tensors of each discriminator in ``optim_d`` (``d_param_counts``)."""
        state = {'rng_states': compat.get_rng_states(), 'bad_iters': getattr(self, 'bad_iters', 0),
                 # which D owns which of optim_d's tensors, so that a later run can take over their moments
                 'd_param_counts': {label: len(list(self.bare(label).parameters()))
                                    for label in self.discriminator_labels}}
        pools = getattr(self, 'pools', None)
        if pools:
            state['image_pools'] = {k: p.state_dict() for k, p in pools.items()}
        return state

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        for name, images in (resume_state.get('image_pools') or {}).items():
            if name in self.pools:
                self.pools[name].load_state_dict(images, self.device)
        self.bad_iters = int(resume_state.get('bad_iters', 0))
        if resume_state.get('rng_states') is not None and self.opt.get('world_size', 1) == 1:
            # rank 0's streams; basicsr train re-applies them when the first batch is drawn (compat)
            compat.set_rng_states(resume_state['rng_states'])
