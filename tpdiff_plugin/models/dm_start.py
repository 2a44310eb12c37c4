"""TP-Diff stage 2's DM start (not in the paper; both off by default), a mixin of ``TPDiffModel``.

- ``train.dm_warmup_iter: N``: stage 2's first N iterations train the DM alone, on L_diff of the real blurry batch
  (DN, RN and the discriminators do not move, the image history pools are not fed), so that DN's prior is close to
  the one stage 1 trained it with before DN moves. Without it the untrained DM's sample cost DN 0.01 to 0.08 dB at
  the hand-over (bench/README.md, rounds 9 and 10).
- ``train.dm_lr``: the learning rate of the DM's parameters (or another prior generator's), a second parameter
  group of ``optim_g`` that the scheduler scales like the first: the DM starts from scratch in stage 2, where DN
  and RN continue. With an EMA of G, the EMA's DM is the DM itself through the warm-up.
"""
from collections import OrderedDict

import torch.distributed as dist


class DMStartMixin:
    """``prior_net``, ``optim_g``'s DM parameter group and ``dm_warmup_step``; the model sets ``dm_lr``,
    ``dm_warmup_iter`` and ``cri_diff`` and calls ``dm_warmup_step`` from ``optimize_parameters``."""

    def prior_net(self, net=None):
        """The module of ``net`` (default: the bare net_g) that makes the prior in stage 2: its DM, another
        ``prior_generator``, or None."""
        net = self.bare('g') if net is None else net
        return net.dm if net.dm is not None else getattr(net, 'prior_gen', None)

    def _params(self, labels, option):
        """``optim_g`` with ``train.dm_lr``: two parameter groups, the prior generator's at that rate."""
        params = super()._params(labels, option)
        if option != 'optim_g' or self.dm_lr is None:
            return params
        own = {id(p) for p in self.prior_net().parameters()}
        rest = [p for p in params if id(p) not in own]
        dm = [p for p in params if id(p) in own]
        return [{'params': rest}, {'params': dm, 'lr': self.dm_lr}] if rest else [{'params': dm, 'lr': self.dm_lr}]

    def dm_warmup_step(self, current_iter):
        """One iteration of ``train.dm_warmup_iter``: the prior generator alone, on L_diff of the real blurry
        batch (see the module docstring). Only its parameters get gradients, so optim_g moves nothing else."""
        blur = self.lq
        z, index = self._prior_target(blur, self.ref)
        self._log_usage(index, blur.shape[0])
        self.optimizer_g.zero_grad(set_to_none=True)
        net = self.bare('g')  # bare: DN takes no part; the prior generator's gradients are averaged below

        def losses():
            l_diff = self.cri_diff(net.generate_prior(blur, prior_target=z), z)
            return l_diff, OrderedDict(l_diff=l_diff)

        l_diff, terms = self.amp_losses(losses)
        bad = self.bad_terms(terms)
        self.log_dict = self._training_log(terms)
        if bad:
            self.record_bad(current_iter, bad, 'the DM warm-up update')
            return
        l_diff.backward()
        if self.opt.get('dist') and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            for p in self.prior_net().parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
        self.optimizer_g.step()
        self.good_step_done()
        ema = getattr(self, 'net_g_ema', None)
        if ema is not None:  # DN is not moving; the EMA's prior generator follows the trained one exactly
            self.prior_net(ema).load_state_dict(self.prior_net().state_dict())
