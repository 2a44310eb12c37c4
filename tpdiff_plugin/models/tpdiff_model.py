"""TPDiffModel: TP-Diff's two training stages on top of the unpaired cycle (paper: "Loss & Training").

Option ``stage`` (top level, required): 1 or 2. Networks: those of UnpairedCycleModel plus
``network_tpe`` (TexturePriorEncoder); ``network_g`` is a TPDiffNet (DM in ``net_g.dm``).

Stage 1 (``L_s1 = 1 GAN + 0.1 CYC + 0.2 Wave``): z = TPE(b, s) from the blurry batch and the unpaired
sharp batch (memory written from s, read by b); DN gets ``prior=z``. The TPE trains with G (``optim_g``).
The DM is not used yet: its parameters are frozen (no gradient, not in any optimizer, outside DDP) and
saved as initialised. Validation uses the TPE with its memory written from the most recent *training*
sharp batch (never from validation GT).

Stage 2 (``L_s2 = L_s1 + lambda_diff |z^ - z|_1``, ``train.diff_opt``, L1 weight 1): loads the stage-1
TPE, DN and RN (``path.pretrain_network_tpe / _g / _rb``, required), freezes the TPE (eval mode, no
gradient, no optimizer, bit-identical) and trains the DM jointly with DN and RN:
``out, z^ = net_g(b, prior_target=z, return_prior=True)``, z = TPE(b, s) under no_grad.
``train.joint_train: false`` (ablation): DN sees z^.detach(), so the DM learns from L_diff alone.
Validation runs the inference path ``net_g(b)``: the DM samples the prior from noise (seeded per image
by ``val.sample_seed``, default 0, so validations are comparable).

Priors of the chunks DN sees (the real blurry batch b, then RN(s), then s with the identity loss): b reads
a TPE memory written from the unpaired sharp batch s. The other chunks are made from s, so a memory written
from s would hand DN the very textures it must restore (a self-prior that makes the sharp cycle trivial):
with ``train.sharp_cycle_prior: other_batch`` (default) they read a memory written from the previous
iteration's sharp batch (the learned memory at the first iteration); ``own_batch`` is the old behaviour,
kept for comparison. In stage 2, L_diff covers every chunk.

DM target (stage 2, ``train.dm_target``): ``batch`` is z = TPE(b, s), which depends on the random sharp
batch, something the DM cannot predict from b. ``ema_memory`` (default) reads the TPE's ``memory_ema``, the
moving average of the memories written through stage 1, so the target is a function of b alone. Stage-1
validation, and the w/o-DM ablation, read the same memory as the stage-2 target.

TPE memory usage is logged at ``print_freq`` (and to tensorboard) as ``tpe_entries`` (distinct entries
read by the real blurry batch) and ``tpe_perplexity``; a value near 1 means a collapsed memory. Validation
logs the usage of its own priors over the validation set (stage 1: the entries the TPE read; stage 2: the
entries nearest the DM's priors), and with a tensorboard logger writes it as ``metrics/<set>/tpe_entries`` and
``tpe_perplexity`` together with the ``tpdiff explain`` figure (input, output, prior colours, memory index,
FM-MSA offsets; ``tpdiff_plugin/explain.py``) of the first ``TB_FIGURES`` validation images, ``explain/<set>/<image>``.

The DM's start (stage 2, not in the paper; off by default): ``train.dm_warmup_iter`` and ``train.dm_lr``, see
``dm_start.py``.

Stage 2 continues stage 1's game: the stage-2 options load the stage-1 discriminators
(``path.pretrain_network_d_sharp / _d_blur / _d_wave``) and, with ``path.resume_optim_d`` (a stage-1
``.state`` file, or its ``training_states`` folder for the newest one), the discriminators' Adam moments,
so that a trained generator does not face fresh discriminators.

Ablation switches of stage 2 (see options/README.md): ``network_g.use_dm: false`` (no DM: the prior
comes from the frozen TPE reading its learned memory, which needs no sharp image, in training and at
inference), ``train.use_tpe: false`` (no TPE: the DM is trained by the image losses alone through its
sampling path, no L_diff), ``train.joint_train: false``, ``train.wave_opt.loss_weight: 0``, and the
architecture switches ``network_g.fm_msa`` / ``multi_scale_prior``. ``network_g.prior_generator`` (the paper's
comparison of prior generators: ``memory_bank``, ``sparse_coding``, ``vq``) replaces the DM by another generator
of the prior from b (``net_g.prior_gen``), trained by the same L_diff against the same target and run by
validation; the memory-based two copy the TPE memory that target is read from when stage 2 starts, and VQ's
codebook + commitment terms are logged as ``l_vq`` (weight 1).

``train.self_enhance`` (either stage; the paper's TP-Diff-se, our reading of SEMGUD's strategy): a frozen
pretrained teacher T gives pseudo pairs (b, T(b)) and / or (RN(T(b)), T(b)); DN gets a supervised loss on them,
``l_self_enhance`` (``self_enhancement.py``). The pseudo-blurry chunk goes through DN's pass with the others and
gets its prior as b does (the memory written from s; the DM path in stage 2).
"""
import os
from collections import OrderedDict

import torch

from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from tpdiff_plugin.archs.tpe_arch import nearest_entries
from tpdiff_plugin.models.cycle_settings import int_option, positive_number
from tpdiff_plugin.models.dm_start import DMStartMixin
from tpdiff_plugin.models.self_enhancement import SelfEnhancement, parse_self_enhance
from tpdiff_plugin.models.unpaired_cycle_model import UnpairedCycleModel
from tpdiff_plugin.utils.checkpoint import read_checkpoint
from tpdiff_plugin.utils.errors import UserError


@MODEL_REGISTRY.register()
class TPDiffModel(DMStartMixin, UnpairedCycleModel):
    """TP-Diff, stage 1 or 2 (option ``stage``). See the module docstring."""

    NETWORK_LABELS = UnpairedCycleModel.NETWORK_LABELS + ('tpe',)
    TOP_KEYS = frozenset({'stage'})
    TRAIN_KEYS = UnpairedCycleModel.TRAIN_KEYS | {'diff_opt', 'joint_train', 'use_tpe', 'sharp_cycle_prior',
                                                  'dm_target', 'self_enhance', 'dm_warmup_iter', 'dm_lr'}
    TRAIN_INTS = {**UnpairedCycleModel.TRAIN_INTS, 'dm_warmup_iter': 0}
    TRAIN_CHECKS = {**UnpairedCycleModel.TRAIN_CHECKS, 'self_enhance': parse_self_enhance,  # checked early
                    'dm_lr': lambda value: positive_number(value, 'train.dm_lr')}
    VAL_KEYS = frozenset({'sample_seed'})
    PATH_KEYS = frozenset({'resume_optim_d'})
    TB_FIGURES = 2  # validation images whose explain figure goes to tensorboard

    def __init__(self, opt):
        stage = opt.get('stage')
        if stage not in (1, 2):
            raise UserError(f'option "stage" must be 1 or 2 for TPDiffModel, got {stage!r}')
        self.stage = stage
        train_opt = opt.get('train') or {}
        self.joint_train = bool(train_opt.get('joint_train', True))
        self.use_tpe = bool(train_opt.get('use_tpe', True))
        self.sharp_cycle_prior = train_opt.get('sharp_cycle_prior', 'other_batch')
        if self.sharp_cycle_prior not in ('other_batch', 'own_batch'):
            raise UserError(f'train.sharp_cycle_prior: must be other_batch or own_batch, got {self.sharp_cycle_prior!r}')
        self.dm_target = train_opt.get('dm_target', 'ema_memory')
        if self.dm_target not in ('ema_memory', 'batch'):
            raise UserError(f'train.dm_target: must be ema_memory or batch, got {self.dm_target!r}')
        if stage == 1 and not self.use_tpe:
            raise UserError('train.use_tpe: false is a stage-2 ablation; stage 1 trains the TPE')
        self.dm_warmup_iter = int_option(train_opt, 'dm_warmup_iter', 0, minimum=0)
        self.dm_lr = train_opt.get('dm_lr')
        if self.dm_lr is not None:
            self.dm_lr = positive_number(self.dm_lr, 'train.dm_lr')
        for key, value in (('dm_warmup_iter', self.dm_warmup_iter), ('dm_lr', self.dm_lr)):
            if stage == 1 and value:
                raise UserError(f'train.{key} is a stage-2 option: stage 1 has no DM to train')
        self.last_sharp = None  # most recent training sharp batch (stage-1 validation writes the memory from it)
        self.other_sharp = None  # the one before: the sharp-cycle chunks read a memory written from it
        self.self_enhance = None  # train.self_enhance: the teacher and its loss
        super().__init__(opt)

    # ------------------------------------------------------------------ networks
    def define_networks(self):
        def prepare_g(net):
            if not hasattr(net, 'dm'):
                raise UserError(f'network_g: TPDiffModel needs a TPDiffNet-like net with a .dm attribute, '
                                f'got {type(net).__name__}')
            for gen in (net.dm, getattr(net, 'prior_gen', None)):
                if self.stage == 1 and gen is not None:
                    gen.requires_grad_(False)  # stage 1 has no DM: keep it out of optim_g and DDP

        if self.stage == 2 and self.is_train:
            needed = ('tpe', 'g', 'rb') if self.use_tpe else ('g', 'rb')
            for label in needed:  # a file that is set but missing is reported by load_pretrained
                if not (self.opt.get('path') or {}).get(f'pretrain_network_{label}'):
                    raise UserError(f'path.pretrain_network_{label} is required in stage 2: point it at the '
                                    'stage-1 checkpoint, e.g. '
                                    f'experiments/<stage-1 name>/models/net_{label}_latest.pth')
        self.add_network('g', prepare=prepare_g)
        # has_dm: the prior comes from a generator in net_g, the DM or another (network_g.prior_generator)
        self.prior_gen = getattr(self.bare('g'), 'prior_gen', None)
        self.has_dm = self.bare('g').dm is not None or self.prior_gen is not None
        if self.stage == 2 and not self.has_dm and not self.use_tpe:
            raise UserError('network_g.use_dm: false with train.use_tpe: false leaves no prior at all; '
                            'turn one of them on')
        # stage 1: TPE trained (and used by validation); stage 2: frozen, gives the target z in training,
        # and the prior itself when there is no DM.
        if self.stage == 1 or (self.use_tpe and (self.is_train or not self.has_dm)):
            self.add_network('tpe', frozen=self.stage == 2)
        elif 'network_tpe' in self.opt and not self.use_tpe:
            get_root_logger().info('train.use_tpe is false: network_tpe is not built (w/o TPE ablation).')
        if self.stage == 2 and self.prior_gen is not None and hasattr(self.prior_gen, 'memory'):
            if not self.use_tpe:
                raise UserError(f'network_g.prior_generator: {self.bare("g").prior_generator} reads the TPE memory; '
                                'train.use_tpe: false leaves none (use dm or vq)')
            if self.is_train:  # the memory the target is read from; a trained net_g carries its copy
                try:
                    self.prior_gen.load_memory(self._val_memory())
                except ValueError as e:
                    raise UserError(f'network_g: {e}') from None
        self.define_cycle_networks()

    def init_training_settings(self):
        if self.dm_lr is not None and not self.has_dm:
            raise UserError('train.dm_lr: network_g.use_dm is false, so there is no DM to give a learning rate')
        if self.dm_warmup_iter and not (self.has_dm and self.use_tpe):
            raise UserError('train.dm_warmup_iter trains the DM on L_diff against the TPE\'s prior: it needs '
                            'network_g.use_dm and train.use_tpe')
        super().init_training_settings()
        se_opt = self.opt['train'].get('self_enhance')
        if se_opt is not None:
            self.self_enhance = SelfEnhancement(se_opt, self.device, self.opt.get('name', 'options'))
        self.cri_diff = None
        if self.stage == 2 and self.has_dm and self.use_tpe:
            diff_opt = self.opt['train'].get('diff_opt') or {'type': 'L1Loss', 'loss_weight': 1.0}
            self.cri_diff = build_loss(diff_opt).to(self.device)
        optim_path = (self.opt.get('path') or {}).get('resume_optim_d')
        if optim_path:
            self.load_optimizer_d(optim_path)

    def load_optimizer_d(self, path):
        """Load the discriminators' optimizer state (Adam moments and step counts) from a stage-1 ``.state``
        file, or the newest one in a ``training_states`` folder. The hyper-parameters (lr, betas) stay this
        run's. Each D of this run takes the moments saved for the D of the same label (a run without D_W
        takes D_S's and D_B's); parameter shapes are checked."""
        if os.path.isdir(path):
            states = [f for f in os.listdir(path) if f.endswith('.state') and f[:-6].isdigit()]
            if not states:
                raise UserError(f'path.resume_optim_d: no <iter>.state file in {path}')
            path = os.path.join(path, max(states, key=lambda f: int(f[:-6])))
        if not os.path.isfile(path):
            raise UserError(f'path.resume_optim_d: no such training state: {path}')
        state = read_checkpoint(path, 'path.resume_optim_d')
        optimizers = state.get('optimizers') if isinstance(state, dict) else None
        if not isinstance(optimizers, list) or len(optimizers) != 2:
            raise UserError(f'path.resume_optim_d: {path} is not a training state of this model (no G and D '
                            'optimizers)')
        saved = optimizers[1]
        params = [p for group in self.optimizer_d.param_groups for p in group['params']]
        n_saved = sum(len(g['params']) for g in saved['param_groups'])
        counts = state.get('d_param_counts') or {}  # label -> number of parameter tensors, in optimizer order
        if counts and sum(counts.values()) == n_saved:
            starts, start = {}, 0
            for label, n in counts.items():
                starts[label], start = start, start + n
            missing = [label for label in self.discriminator_labels if label not in counts]
            if missing:
                raise UserError(f'path.resume_optim_d: {path} holds no optimizer state for {", ".join(missing)} '
                                f'(it has {", ".join(counts)})')
            index = [starts[label] + i for label in self.discriminator_labels
                     for i in range(len(list(self.bare(label).parameters())))]
        else:  # a state without the labels: the same discriminators in the same order
            index = list(range(n_saved)) if n_saved == len(params) else []
        moments = {i: saved['state'][j] for i, j in enumerate(index) if j in saved['state']}
        if len(index) != len(params) or any(v.shape != params[i].shape for i, st in moments.items()
                                            for k, v in st.items() if k.startswith('exp_avg')):
            raise UserError(f'path.resume_optim_d: {path} holds the optimizer of other discriminators '
                            f'({n_saved} tensors; this run has {len(params)} in {", ".join(self.discriminator_labels)})')
        current = self.optimizer_d.state_dict()
        current['state'] = moments
        self.optimizer_d.load_state_dict(current)
        get_root_logger().info(f'Loaded the optimizer state of {", ".join(self.discriminator_labels)} from {path}.')

    # ------------------------------------------------------------------ training
    def optimize_parameters(self, current_iter):
        self.other_sharp = self.last_sharp
        self.last_sharp = self.ref.detach()
        if self.stage == 2 and current_iter <= self.dm_warmup_iter:
            self.current_iter = current_iter
            self.dm_warmup_step(current_iter)
            return
        super().optimize_parameters(current_iter)

    def _memory_sources(self, blur, sharp, pseudo=0):
        """The TPE's ``sharp`` argument for ``blur`` (k chunks, the last ``pseudo`` of them self-enhancement
        chunks, which read b's memory: the same batch, written once): see the module docstring."""
        if self.sharp_cycle_prior == 'own_batch':
            return sharp
        return [sharp] + [self.other_sharp] * (blur.shape[0] // sharp.shape[0] - 1 - pseudo) + [sharp] * pseudo

    def _inference_source(self):
        """Which memory stage-1 validation and the w/o-DM ablation read: 'ema' (the TPE's memory EMA), 'batch'
        (written from the most recent training sharp batch, stage 1) or 'learned' (the learned memory)."""
        if self.dm_target == 'ema_memory' and int(self.bare('tpe').memory_ema_updates) > 0:
            return 'ema'
        if self.stage == 1 and self.last_sharp is not None:
            return 'batch'
        return 'learned'

    def inference_memory(self):
        """The memory of :meth:`_inference_source` (None: the learned memory)."""
        tpe = self.bare('tpe')
        source = self._inference_source()
        if source == 'ema':
            return tpe.memory_ema
        if source == 'batch':  # an inference write: eval mode, so it does not count in the memory EMA
            was_training = tpe.training
            tpe.eval()
            try:
                return tpe.write(self.last_sharp)
            finally:
                tpe.train(was_training)
        return None

    def _log_usage(self, index, n):
        entries, perplexity = self.bare('tpe').usage(index[:n])
        self.train_stats['tpe_entries'] = entries
        self.train_stats['tpe_perplexity'] = perplexity

    def deblur_train(self, blur, sharp):
        se = self.self_enhance
        if se is None or not se.active(self.current_iter):
            return self._deblur_chunks(blur, sharp)
        n, m = sharp.shape[0], blur.shape[0]
        target, pseudo = se.targets(blur[:n], self.bare('rb'))
        if pseudo is not None:  # one DN pass for every chunk, the pseudo-blurry one last
            blur = torch.cat([blur, pseudo])
        out, extra = self._deblur_chunks(blur, sharp, pseudo=0 if pseudo is None else 1)
        extra['l_self_enhance'] = se.loss(out[:n], out[m:], target)
        return out[:m], extra

    @torch.no_grad()
    def _prior_target(self, blur, sharp, pseudo=0):
        """Stage 2: the frozen TPE's prior for ``blur`` and the memory entries it read: the DM's target z (from the
        memory EMA, or written from the sharp batches with ``dm_target: batch``), and DN's prior without a DM."""
        tpe = self.net_tpe  # frozen: the bare module
        if not self.has_dm or self.dm_target == 'ema_memory':
            return tpe.read(blur, memory=self.inference_memory(), return_index=True)
        return tpe(blur, self._memory_sources(blur, sharp, pseudo), return_index=True)

    def _deblur_chunks(self, blur, sharp, pseudo=0):
        extra = OrderedDict()
        n = sharp.shape[0]
        if self.stage == 1:
            # through the (DDP) wrapper: the TPE trains with G
            z, index = self.net_tpe(blur, self._memory_sources(blur, sharp, pseudo), return_index=True)
            self._log_usage(index, n)
            return self.net_g(blur, prior=z), extra
        if not self.use_tpe:  # w/o TPE: the DM is trained through the image losses only
            return self.net_g(blur), extra
        z, index = self._prior_target(blur, sharp, pseudo)
        self._log_usage(index, n)
        if not self.has_dm:  # w/o DM: the TPE's sharp-free prior, the same at inference
            return self.net_g(blur, prior=z), extra
        out, z_hat = self.net_g(blur, prior_target=z, return_prior=True, detach_prior=not self.joint_train)
        extra['l_diff'] = self.cri_diff(z_hat, z)
        aux = getattr(self.prior_gen, 'last_aux_loss', None)  # VQ's codebook + commitment terms
        if aux is not None:
            extra['l_vq'] = aux
        return out, extra

    # ------------------------------------------------------------------ inference
    def prior_description(self):
        """Which prior path validation/test runs (logged before every validation)."""
        if self.stage == 2 and self.prior_gen is not None:
            return f'prior generator {self.bare("g").prior_generator} (from the blurry image)'
        if self.stage == 2 and self.has_dm:
            return f'DM sampling (T={self.bare("g").dm.timesteps})'
        suffix = '' if self.stage == 1 else ' (w/o DM)'
        source = self._inference_source()
        if source == 'ema':
            return f'TPE memory EMA of {int(self.bare("tpe").memory_ema_updates)} training writes{suffix}'
        if source == 'batch':
            return f'TPE memory from training sharp batch ({self.last_sharp.shape[0]} images)'
        return f'TPE learned memory without sharp enhancement{suffix}'

    def _val_memory(self):
        """The TPE memory validation reads (stage 1, w/o DM), or compares the DM's priors with (stage 2)."""
        memory = self.inference_memory()
        return self.bare('tpe').memory if memory is None else memory

    def deblur_test(self, net_g, lq):
        usage = getattr(self, 'val_indices', None)  # a list while a validation collects the memory usage
        if self.stage == 2 and self.has_dm:
            seed = (self.opt.get('val') or {}).get('sample_seed', 0)
            generator = None if seed is None else torch.Generator().manual_seed(int(seed))
            out, z = net_g(lq, generator=generator, return_prior=True)
            if usage is not None:
                usage.append(nearest_entries(z, self._val_memory()))
            return out
        z, index = self.bare('tpe').read(lq, memory=self.inference_memory(), return_index=True)
        if usage is not None:
            usage.append(index)
        return net_g(lq, prior=z)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        get_root_logger().info(f'Validation prior: {self.prior_description()}')
        self.val_indices = [] if 'tpe' in self.net_labels else None
        try:
            super().nondist_validation(dataloader, current_iter, tb_logger, save_img)
            indices = self.val_indices
        finally:
            self.val_indices = None
        name = dataloader.dataset.opt['name']
        if indices:
            entries, perplexity = self.bare('tpe').usage(torch.cat([i.flatten() for i in indices]))
            get_root_logger().info(f'Validation {name}: TPE memory usage {entries:.0f} entries, perplexity '
                                   f'{perplexity:.2f}')
            if tb_logger is not None:
                tb_logger.add_scalar(f'metrics/{name}/tpe_entries', entries, current_iter)
                tb_logger.add_scalar(f'metrics/{name}/tpe_perplexity', perplexity, current_iter)
        if tb_logger is not None:
            self.log_explain_figures(dataloader, name, current_iter, tb_logger)

    def log_explain_figures(self, dataloader, name, current_iter, tb_logger):
        """The ``tpdiff explain`` figure of the first ``TB_FIGURES`` validation images, to tensorboard: the
        networks, prior and seed of this validation."""
        # imported here: only runs with a tensorboard logger, and keeps `import tpdiff_plugin` from loading the
        # inference layer (tests/test_inference.py::test_deblurrer_is_exported_lazily)
        from tpdiff_plugin.explain import explain_figure, explain_image
        tpe = self.bare('tpe') if 'tpe' in self.net_labels else None
        memory = self._val_memory() if tpe is not None else None
        ema = getattr(self, 'net_g_ema', None)
        net = ema if ema is not None else self.bare('g')
        seed = (self.opt.get('val') or {}).get('sample_seed', 0)
        for i, data in zip(range(self.TB_FIGURES), dataloader):
            result = explain_image(net, data['lq'][:1], tpe=tpe, stage=self.stage, memory=memory,
                                   seed=0 if seed is None else seed, device=self.device)
            image = os.path.splitext(os.path.basename((data.get('lq_path') or [f'image{i}'])[0]))[0]
            tb_logger.add_image(f'explain/{name}/{image}', explain_figure(result), current_iter, dataformats='HWC')

    # ------------------------------------------------------------------ resume
    def extra_training_state(self):
        state = super().extra_training_state()
        if self.last_sharp is not None:  # the next iteration's sharp-cycle memory (and stage-1 validation's)
            state['tpe_sharp_batch'] = self.last_sharp.cpu()
        return state

    def load_extra_training_state(self, state):
        super().load_extra_training_state(state)
        if state.get('tpe_sharp_batch') is not None:
            self.last_sharp = state['tpe_sharp_batch'].to(self.device)
