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

Training options beyond the paper's losses (``cycle_sharp_opt``, ``gan_sharp_opt``, ``sharp_cycle_trains_rb``,
``sharp_cycle_noise``, ``sharp_cycle_noise_ramp``, ``sharp_cycle_noise_start``, ``identity_opt``, ``r1_weight``,
``d_update_every``, ``sharp_d_scale``, ``fine_change_opt``; see ``options/README.md``) are all
off by default, so the paper options train the paper's objective; the demo recipe and ``bench/quality.py``
use them.

Numerical guard: see ``numerical_guard.py`` (``train.max_bad_iters``). Mixed precision (``train.amp``, default
``none``): see ``mixed_precision.py``.

Validation/test: ``net_g(lq)`` (the EMA copy when ``train.ema_decay`` > 0) with basicsr metrics, through
``SRModel.nondist_validation``. ``save`` writes every network, the optimizers, schedulers and the pools.
"""
import copy
from collections import OrderedDict

import torch
from basicsr.losses import build_loss
from basicsr.models.base_model import BaseModel
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from tpdiff_plugin.models.cycle_settings import (fine_detail, int_option, noise_range, noisy_8bit, positive_number,
                                                  r1_weights, sharp_d_view, wave_enabled)
from tpdiff_plugin.models.history_pool import ImageHistoryPool
from tpdiff_plugin.models.labelled_networks import LabelledNetworks
from tpdiff_plugin.models.mixed_precision import MixedPrecision, parse_amp
from tpdiff_plugin.models.numerical_guard import NumericalGuard
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.networks import build_network_block
from tpdiff_plugin.utils.resume import TrainingStateHook, get_rng_states, set_rng_states


@MODEL_REGISTRY.register()
class UnpairedCycleModel(LabelledNetworks, NumericalGuard, MixedPrecision, TrainingStateHook, SRModel):
    """Generic unpaired cycle model: DN, RN, D_S, D_B (+ optional D_W). See the module docstring.

    SRModel is the base for its validation contract (``nondist_validation``, ``get_current_visuals``,
    metric bookkeeping); its ``__init__`` (one net_g, a pixel loss) is replaced by ours.
    """

    #: labels of the discriminators this model may hold, in optimizer order
    D_LABELS = ('d_sharp', 'd_blur', 'd_wave')
    # The options this model reads beyond basicsr's own (its schema, checked by option_check.py)
    NETWORK_LABELS = ('g', 'rb') + D_LABELS
    TOP_KEYS = frozenset()
    TRAIN_KEYS = frozenset({'optim_g', 'optim_d', 'scheduler', 'pool_size', 'gan_opt', 'cycle_opt', 'wave_opt',
                            'ema_decay', 'max_bad_iters', 'cycle_sharp_opt', 'gan_sharp_opt', 'identity_opt',
                            'sharp_cycle_trains_rb', 'sharp_cycle_noise', 'sharp_cycle_noise_ramp',
                            'sharp_cycle_noise_start', 'r1_weight', 'd_update_every', 'sharp_d_scale',
                            'fine_change_opt', 'fine_change_sigma', 'amp'})
    TRAIN_INTS = {'pool_size': 0, 'max_bad_iters': 1, 'd_update_every': 1, 'sharp_cycle_noise_ramp': 0,
                  'sharp_cycle_noise_start': 0, 'sharp_d_scale': 1}  # -> minimum
    TRAIN_CHECKS = {'amp': parse_amp}  # key -> its check (raises UserError), run early by option_check
    VAL_KEYS = frozenset()
    PATH_KEYS = frozenset()

    def __init__(self, opt):
        BaseModel.__init__(self, copy.deepcopy(opt))
        self.init_networks()
        train_opt = self.opt.get('train') or {}
        self.use_wave = self.is_train and wave_enabled(train_opt, 'network_d_wave' in self.opt)
        self.define_networks()
        if self.is_train:
            self.init_training_settings()

    # ------------------------------------------------------------------ networks
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

    # ------------------------------------------------------------------ training setup
    def init_training_settings(self):
        train_opt = self.opt['train']
        for label in self.net_labels:
            if label not in self.frozen_labels:
                self.net(label).train()

        self.ema_decay = train_opt.get('ema_decay', 0)
        if self.ema_decay > 0:
            get_root_logger().info(f'Use Exponential Moving Average with decay: {self.ema_decay}')
            self.net_g_ema = self.place(build_network_block(self.opt.get('name', 'options'), 'network_g',
                                                            self.opt['network_g']))
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
        self.sharp_cycle_noise = noise_range(train_opt.get('sharp_cycle_noise'))
        self.sharp_cycle_noise_ramp = int_option(train_opt, 'sharp_cycle_noise_ramp', 0, minimum=0)
        self.sharp_cycle_noise_start = int_option(train_opt, 'sharp_cycle_noise_start', 0, minimum=0)
        self.current_iter = 0  # set by optimize_parameters; the noise ramp reads it
        self.r1_weights = r1_weights(train_opt.get('r1_weight', 0), self.D_LABELS, self.discriminator_labels)
        self.d_update_every = int_option(train_opt, 'd_update_every', 1)
        self.cri_fine = build_loss(train_opt['fine_change_opt']).to(self.device) if train_opt.get('fine_change_opt') \
            else None
        self.fine_sigma = positive_number(train_opt.get('fine_change_sigma', 1.5), 'train.fine_change_sigma')
        self.sharp_view = sharp_d_view(int_option(train_opt, 'sharp_d_scale', 1))  # what D_S and D_W see of sharp images
        self.train_stats = OrderedDict()  # logged with the losses (not summed into them), e.g. TPE memory usage

        self.init_numerical_guard(train_opt)
        self.init_mixed_precision(train_opt)

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
        since = self.current_iter - self.sharp_cycle_noise_start  # iterations since the noise was switched on
        if self.sharp_cycle_noise is not None and (since > 0 or not self.sharp_cycle_noise_start):
            # before sharp_cycle_noise_start, RN(s) goes in as it is: even the 8-bit rounding alone kept DN at the
            # identity while RN's blur was under a grey level (bench/README.md, round 4)
            ramp = min(1.0, since / self.sharp_cycle_noise_ramp) if self.sharp_cycle_noise_ramp else 1.0
            fake_b_in = noisy_8bit(fake_b_in, *(ramp * sigma for sigma in self.sharp_cycle_noise))
        chunks = [b, fake_b_in]
        if self.cri_identity is not None:
            chunks.append(s)
        out, extra = self.deblur_train(torch.cat(chunks), s)  # one DN pass for all chunks
        fake_s, rec_s = out[:n], out[n:2 * n]
        rec_b = self.net_rb(fake_s)
        self.fake_s, self.fake_b = fake_s.detach().float(), fake_b.detach().float()  # pools hold fp32 (amp)

        losses = OrderedDict()
        # discriminators are frozen here; their bare modules keep DDP's reducer out of the G step
        fake_s_view = self.sharp_view(fake_s)
        losses['l_g_gan_sharp'] = self.gan_sharp_loss(self.bare('d_sharp')(fake_s_view), True, is_disc=False)
        losses['l_g_gan_blur'] = self.cri_gan(self.bare('d_blur')(fake_b), True, is_disc=False)
        losses['l_cyc_blur'] = self.cri_cycle(rec_b, b)
        losses['l_cyc_sharp'] = self.cycle_sharp_loss(rec_s, s)
        if self.cri_identity is not None:
            losses['l_idt'] = self.cri_identity(out[2 * n:], s)
        if self.cri_fine is not None:  # DN's change to b at the finest scale (bench/README.md, round 5)
            fine = self.fp32(fine_detail)  # image minus its blur: fp32 under bf16 amp (mixed_precision.py)
            losses['l_fine'] = self.cri_fine(fine(fake_s, self.fine_sigma), fine(b, self.fine_sigma))
        if self.use_wave:
            losses['l_g_wave'] = self.cri_wave(self.bare('d_wave')(self.wave_bands(fake_s_view)), True, is_disc=False)
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
        fake_s = self.sharp_view(self.pools['sharp'].query(self.fake_s))
        fake_b = self.pools['blur'].query(self.fake_b)
        real_s = self.sharp_view(self.ref)
        losses['l_d_sharp_real'], losses['l_d_sharp_fake'] = self._d_pair('d_sharp', real_s, fake_s,
                                                                          self.gan_sharp_loss)
        losses['l_d_blur_real'], losses['l_d_blur_fake'] = self._d_pair('d_blur', self.lq, fake_b, self.cri_gan)
        if self.use_wave:
            hp = self.wave_bands
            pred_real, pred_fake = self.net_d_wave(torch.cat([hp(real_s), hp(fake_s)])).chunk(2)
            losses['l_d_wave_real'] = self.cri_wave(pred_real, True, is_disc=True)
            losses['l_d_wave_fake'] = self.cri_wave(pred_fake, False, is_disc=True)
        l_total = 0.5 * sum(losses.values())
        if self.r1_weights:
            losses['l_d_r1'] = self.fp32(self.r1_penalty)()  # fp32 under bf16 amp: see mixed_precision.py
            l_total = l_total + losses['l_d_r1']
        losses['l_d_total'] = l_total
        return l_total, losses

    def r1_penalty(self):
        """R1 (Mescheder et al. 2018): ``gamma / 2 * E[|grad_x D(x)|^2]`` on the real images of each D with a
        weight, summed over them. Differentiable in D's parameters (double backward). fp32 under bf16 amp."""
        reals = {'d_sharp': self.sharp_view(self.ref), 'd_blur': self.lq}
        if self.use_wave:
            reals['d_wave'] = self.wave_bands(reals['d_sharp'])
        total = 0
        for label, gamma in self.r1_weights.items():
            real = reals[label].detach().requires_grad_(True)
            pred = self.bare(label)(real)  # bare: the double backward stays outside DDP's reducer
            grad, = torch.autograd.grad(pred.sum(), real, create_graph=True)
            total = total + 0.5 * gamma * grad.square().sum(dim=(1, 2, 3)).mean()
        return total

    def wave_bands(self, images):
        """D_W's input: the wavelet detail bands of ``images``, in fp32 under bf16 amp (``mixed_precision.py``)."""
        return self.fp32(self.cri_wave.highpass)(images)

    def _set_d_requires_grad(self, flag):
        for label in self.discriminator_labels:
            for p in self.net(label).parameters():
                p.requires_grad = flag

    def optimize_parameters(self, current_iter):
        self.current_iter = current_iter
        # generator step
        self._set_d_requires_grad(False)
        self.optimizer_g.zero_grad(set_to_none=True)
        l_g_total, g_losses = self.amp_losses(self.generator_losses)  # forward under train.amp, backward fp32
        bad = self.bad_terms(g_losses)
        if bad:  # nothing changes this iteration: no G step, no D step, no pool push
            self.log_dict = self.reduce_loss_dict(g_losses)
            self.record_bad(current_iter, bad, 'the G and D updates')
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
        l_d_total, d_losses = self.amp_losses(self.discriminator_losses)
        g_losses.update(d_losses)
        self.log_dict = self._training_log(g_losses)
        bad = self.bad_terms(d_losses)
        if bad:
            for k, images in pools.items():
                self.pools[k].images = images
            self.optimizer_d.zero_grad(set_to_none=True)
            self.record_bad(current_iter, bad, 'the D update')
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
        self.good_step_done()
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
    def extra_training_state(self):
        """Merged into the ``.state`` file (``utils/resume.py``, alongside optimizers and schedulers): the history
        pools, the count of bad iterations in a row, the RNG streams (python, numpy, torch) and the number of
        parameter tensors of each discriminator in ``optim_d`` (``d_param_counts``)."""
        state = {'rng_states': get_rng_states(), 'bad_iters': getattr(self, 'bad_iters', 0),
                 # which D owns which of optim_d's tensors, so that a later run can take over their moments
                 'd_param_counts': {label: len(list(self.bare(label).parameters()))
                                    for label in self.discriminator_labels}}
        pools = getattr(self, 'pools', None)
        if pools:
            state['image_pools'] = {k: p.state_dict() for k, p in pools.items()}
        return state

    def load_extra_training_state(self, state):
        for name, images in (state.get('image_pools') or {}).items():
            if name in self.pools:
                self.pools[name].load_state_dict(images, self.device)
        self.bad_iters = int(state.get('bad_iters', 0))
        if state.get('rng_states') is not None:  # re-applied when the first batch is drawn (utils/resume.py)
            set_rng_states(state['rng_states'])
