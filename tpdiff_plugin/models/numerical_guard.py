"""Numerical guard of the training step: an iteration with a NaN/Inf loss term changes nothing.

Used by ``UnpairedCycleModel``: when any G or D loss term is non-finite, the iteration skips its optimizer
steps (and pool pushes, EMA update), logs the bad terms, and after ``train.max_bad_iters`` (default 10) such
iterations in a row stops training with a ``UserError``; the checkpoints already written are untouched.
Under DDP the ranks agree, so all of them skip together.
"""
import torch
import torch.distributed as dist
from basicsr.utils import get_root_logger

from tpdiff_plugin.models.cycle_settings import int_option
from tpdiff_plugin.utils.errors import UserError


class NumericalGuard:
    """Mixin for a basicsr model (uses ``self.opt`` and ``self.device``)."""

    def init_numerical_guard(self, train_opt):
        self.max_bad_iters = int_option(train_opt, 'max_bad_iters', 10)
        self.bad_iters = 0  # consecutive iterations with a non-finite loss

    def bad_terms(self, losses):
        """Names of the non-finite loss terms (agreed across DDP ranks, so all of them skip together)."""
        bad = [k for k, v in losses.items() if not torch.isfinite(v.detach()).all()]
        if self.opt.get('dist') and dist.is_available() and dist.is_initialized():
            flag = torch.tensor(float(bool(bad)), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not bad:
                bad = ['(on another rank)']
        return bad

    def record_bad(self, current_iter, bad, what):
        """Count one skipped iteration (``what`` was skipped); stop training after too many in a row."""
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

    def good_step_done(self):
        self.bad_iters = 0
