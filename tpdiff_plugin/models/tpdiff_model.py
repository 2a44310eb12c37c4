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

The sharp cycle's DN pass (on RN(s)) gets its prior the same way as the blurry batch's (one batched
pass), so in stage 2 L_diff covers both halves.

Ablation switches of stage 2 (see options/README.md): ``network_g.use_dm: false`` (no DM: the prior
comes from the frozen TPE reading its learned memory, which needs no sharp image, in training and at
inference), ``train.use_tpe: false`` (no TPE: the DM is trained by the image losses alone through its
sampling path, no L_diff), ``train.joint_train: false``, ``train.wave_opt.loss_weight: 0``, and the
architecture switches ``network_g.fm_msa`` / ``multi_scale_prior``.
"""
from collections import OrderedDict

import torch

from basicsr.losses import build_loss
from basicsr.utils import get_root_logger
from basicsr.utils.registry import MODEL_REGISTRY

from tpdiff_plugin.models.unpaired_cycle_model import UnpairedCycleModel
from tpdiff_plugin.utils.errors import UserError


@MODEL_REGISTRY.register()
class TPDiffModel(UnpairedCycleModel):
    """TP-Diff, stage 1 or 2 (option ``stage``). See the module docstring."""

    def __init__(self, opt):
        stage = opt.get('stage')
        if stage not in (1, 2):
            raise UserError(f'option "stage" must be 1 or 2 for TPDiffModel, got {stage!r}')
        self.stage = stage
        train_opt = opt.get('train') or {}
        self.joint_train = bool(train_opt.get('joint_train', True))
        self.use_tpe = bool(train_opt.get('use_tpe', True))
        if stage == 1 and not self.use_tpe:
            raise UserError('train.use_tpe: false is a stage-2 ablation; stage 1 trains the TPE')
        self.last_sharp = None  # most recent training sharp batch (stage-1 validation writes the memory from it)
        super().__init__(opt)

    # ------------------------------------------------------------------ networks
    def define_networks(self):
        def prepare_g(net):
            if not hasattr(net, 'dm'):
                raise UserError(f'network_g: TPDiffModel needs a TPDiffNet-like net with a .dm attribute, '
                                f'got {type(net).__name__}')
            if self.stage == 1 and net.dm is not None:
                net.dm.requires_grad_(False)  # stage 1 has no DM: keep it out of optim_g and DDP

        if self.stage == 2 and self.is_train:
            needed = ('tpe', 'g', 'rb') if self.use_tpe else ('g', 'rb')
            for label in needed:  # a file that is set but missing is reported by load_pretrained
                if not (self.opt.get('path') or {}).get(f'pretrain_network_{label}'):
                    raise UserError(f'path.pretrain_network_{label} is required in stage 2: point it at the '
                                    'stage-1 checkpoint, e.g. '
                                    f'experiments/<stage-1 name>/models/net_{label}_latest.pth')
        self.add_network('g', prepare=prepare_g)
        self.has_dm = self.bare('g').dm is not None
        if self.stage == 2 and not self.has_dm and not self.use_tpe:
            raise UserError('network_g.use_dm: false with train.use_tpe: false leaves no prior at all; '
                            'turn one of them on')
        # stage 1: TPE trained (and used by validation); stage 2: frozen, gives the target z in training,
        # and the prior itself when there is no DM.
        if self.stage == 1 or (self.use_tpe and (self.is_train or not self.has_dm)):
            self.add_network('tpe', frozen=self.stage == 2)
        elif 'network_tpe' in self.opt and not self.use_tpe:
            get_root_logger().info('train.use_tpe is false: network_tpe is not built (w/o TPE ablation).')
        self.define_cycle_networks()

    def init_training_settings(self):
        super().init_training_settings()
        self.cri_diff = None
        if self.stage == 2 and self.has_dm and self.use_tpe:
            diff_opt = self.opt['train'].get('diff_opt') or {'type': 'L1Loss', 'loss_weight': 1.0}
            self.cri_diff = build_loss(diff_opt).to(self.device)

    # ------------------------------------------------------------------ training
    def optimize_parameters(self, current_iter):
        self.last_sharp = self.ref.detach()
        super().optimize_parameters(current_iter)

    def deblur_train(self, blur, sharp):
        extra = OrderedDict()
        if self.stage == 1:
            z = self.net_tpe(blur, sharp)  # through the (DDP) wrapper: the TPE trains with G
            return self.net_g(blur, prior=z), extra
        if not self.use_tpe:  # w/o TPE: the DM is trained through the image losses only
            return self.net_g(blur), extra
        if not self.has_dm:  # w/o DM: learned-memory prior, the same at inference
            with torch.no_grad():
                z = self.net_tpe.read(blur)
            return self.net_g(blur, prior=z), extra
        with torch.no_grad():
            z = self.net_tpe(blur, sharp)
        out, z_hat = self.net_g(blur, prior_target=z, return_prior=True, detach_prior=not self.joint_train)
        extra['l_diff'] = self.cri_diff(z_hat, z)
        return out, extra

    # ------------------------------------------------------------------ inference
    def prior_description(self):
        """Which prior path validation/test runs (logged before every validation)."""
        if self.stage == 2 and self.has_dm:
            return f'DM sampling (T={self.bare("g").dm.timesteps})'
        if self.stage == 1 and self.last_sharp is not None:
            return f'TPE memory from training sharp batch ({self.last_sharp.shape[0]} images)'
        if self.stage == 1:
            return 'TPE learned memory without sharp enhancement (no training sharp batch seen)'
        return 'TPE learned memory without sharp enhancement (w/o DM)'

    def deblur_test(self, net_g, lq):
        if self.stage == 2 and self.has_dm:
            seed = (self.opt.get('val') or {}).get('sample_seed', 0)
            generator = None if seed is None else torch.Generator().manual_seed(int(seed))
            return net_g(lq, generator=generator)
        tpe = self.bare('tpe')
        memory = None
        if self.stage == 1 and self.last_sharp is not None:
            memory = tpe.write(self.last_sharp)
        return net_g(lq, prior=tpe.read(lq, memory=memory))

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        get_root_logger().info(f'Validation prior: {self.prior_description()}')
        super().nondist_validation(dataloader, current_iter, tb_logger, save_img)

    # ------------------------------------------------------------------ resume
    def extra_training_state(self):
        state = super().extra_training_state()
        if self.stage == 1 and self.last_sharp is not None:  # stage-1 validation writes the memory from it
            state['tpe_sharp_batch'] = self.last_sharp.cpu()
        return state

    def resume_training(self, resume_state):
        super().resume_training(resume_state)
        if resume_state.get('tpe_sharp_batch') is not None:
            self.last_sharp = resume_state['tpe_sharp_batch'].to(self.device)
