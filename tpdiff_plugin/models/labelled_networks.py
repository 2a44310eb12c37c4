"""The labelled networks of an unpaired cycle model: build, load, place, freeze, save.

``UnpairedCycleModel`` holds DN, RN, the discriminators (and, in TP-Diff, the TPE) as ``self.net_<label>``
built from ``network_<label>`` and saved as ``net_<label>_<iter>.pth``. This mixin keeps that bookkeeping
(``net_labels`` in save order, ``frozen_labels`` in no optimizer) apart from the training step.
"""
import os

import torch

from tpdiff_plugin.models.cycle_settings import channels_last_training
from tpdiff_plugin.utils.checkpoint import load_network_file
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.networks import build_network_block


class LabelledNetworks:
    """Mixin for a basicsr ``BaseModel``; the class declares ``D_LABELS`` (its discriminators)."""

    D_LABELS = ()

    def init_networks(self):
        self.net_labels = []  # every network held, in save order
        self.frozen_labels = set()  # held but never trained (kept in eval mode, in no optimizer)
        # train.channels_last: every network in channels_last memory while training (cycle_settings)
        self.channels_last = self.is_train and channels_last_training(self.opt.get('train') or {}, self.device)

    def place(self, net):
        """``net`` on the device, in channels_last memory when training so (``self.channels_last``)."""
        return net.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)

    def add_network(self, label, prepare=None, frozen=False):
        """Build ``network_<label>``, run ``prepare(net)``, load ``path.pretrain_network_<label>``, put it on
        the device (DDP/DP-wrapped unless ``frozen``) and keep it as ``self.net_<label>``."""
        key = f'network_{label}'
        if not isinstance(self.opt.get(key), dict) or 'type' not in self.opt[key]:
            raise UserError(f'option "{key}" is missing or has no "type": {type(self).__name__} needs it')
        net = build_network_block(self.opt.get('name', 'options'), key, self.opt[key])
        if prepare is not None:
            prepare(net)
        self.load_pretrained(net, label)
        if frozen:
            net.requires_grad_(False)
            net.eval()
            net = self.place(net)  # no DDP: a module without trainable parameters cannot be wrapped
            self.frozen_labels.add(label)
        else:
            net = self.model_to_device(self.place(net))
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
        """Upstream ``BaseModel.load_network`` through ``utils/checkpoint.py`` (``weights_only=True``, one-line
        errors)."""
        load_network_file(self.get_bare_model(net), load_path, 'pretrain_network', param_key=param_key,
                          strict=strict, fallback_to_params=True,
                          hint='check the network options, or set strict_load_* false')

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

    # ------------------------------------------------------------------ save
    def save(self, epoch, current_iter):
        for label in self.net_labels:
            if label == 'g' and getattr(self, 'net_g_ema', None) is not None:
                self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter,
                                  param_key=['params', 'params_ema'])
            else:
                self.save_network(self.net(label), f'net_{label}', current_iter)
        self.save_training_state(epoch, current_iter)
