"""The alternatives to the DM that the paper compares its texture-prior generator with (issue 13).

The paper reports that the DM-generated prior "substantially outperforms alternative generative approaches
such as Memory Bank, Sparse Coding, and Vanilla VQ", and gives no details of those; the three modules here are
our readings. Each replaces ``TPDiffNet.dm`` (``network_g.prior_generator``), makes the prior from the blurry
image alone (no sharp image, no noise), is trained in stage 2 against the same frozen-TPE target z as the DM
(``L_diff = |ẑ - z|_1``) and is what inference runs.

All three start with the same encoder as the DM's condition, ``E(lq)``: PixelUnshuffle(s) -> 3x3 conv ->
``num_blocks`` residual blocks at ``feat_ch`` (``diffusion_arch.ConditionEncoder``), then:

- ``MemoryBankPrior`` (``memory_bank``): a query per position attends to a bank of ``mem_slots`` entries
  (softmax of ``q · M^T / sqrt(C)``) and takes the weighted sum of entries. M is a copy of the TPE's memory
  (the memory the stage-2 target is read from; ``load_memory``), a buffer: retrieval is all that is learned.
- ``SparseCodingPrior`` (``sparse_coding``): predicted coefficients over the same copied atoms M; at each
  position the ``topk`` largest are kept and softmax-normalised, ``ẑ = Σ_k w_k M[i_k]`` (a k-sparse code).
- ``VQPrior`` (``vq``): vanilla VQ-VAE quantisation: the encoder's output e is replaced by its nearest entry
  of a learned codebook of ``mem_slots`` entries (initialised U(-1/N, 1/N), not from the TPE), with the straight-through estimator
  (``ẑ = e + sg(q - e)``); ``last_aux_loss`` holds ``|sg(e) - q|² + beta |e - sg(q)|²`` (codebook and
  commitment terms, beta = 0.25) of the last training forward, which the model adds to the loss.

Shapes: ``forward(lq [B, in_ch, H, W]) -> ẑ [B, prior_ch, H/s, W/s]`` (H, W multiples of s; TPDiffNet pads).
``load_memory(memory [mem_slots, prior_ch])`` copies the TPE memory (the memory-based two; a no-op for VQ).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from tpdiff_plugin.archs.diffusion_arch import ConditionEncoder

PRIOR_GENERATORS = ('dm', 'memory_bank', 'sparse_coding', 'vq')
MEMORY_GENERATORS = ('memory_bank', 'sparse_coding')  # read a copy of the TPE memory


def check_prior_generator(name):
    if name not in PRIOR_GENERATORS:
        raise ValueError(f'prior_generator must be one of {", ".join(PRIOR_GENERATORS)}, got {name!r}')


class _EncodedPrior(nn.Module):
    """The shared part: the encoder ``E(lq) -> [B, feat_ch, h, w]`` and a 1x1 head to ``out_ch`` channels."""

    def __init__(self, in_ch=3, prior_ch=64, prior_scale=4, feat_ch=64, num_blocks=4, mem_slots=256, out_ch=None):
        super().__init__()
        self.prior_ch = prior_ch
        self.prior_scale = prior_scale
        self.mem_slots = mem_slots
        self.last_aux_loss = None
        self.encoder = ConditionEncoder(in_ch, feat_ch=feat_ch, prior_scale=prior_scale, num_blocks=num_blocks)
        self.head = nn.Conv2d(feat_ch, out_ch or prior_ch, 1)

    def encode(self, lq):
        s = self.prior_scale
        if lq.shape[-2] % s or lq.shape[-1] % s:
            raise ValueError(f'{type(self).__name__}: lq size {tuple(lq.shape[-2:])} must be a multiple of '
                             f'prior_scale={s} (TPDiffNet pads its input for this)')
        return self.head(F.gelu(self.encoder(lq)))

    def load_memory(self, memory):
        """Copy the TPE memory ``[mem_slots, prior_ch]`` into ``self.memory`` (no-op without one)."""
        if not hasattr(self, 'memory'):
            return
        if tuple(memory.shape) != tuple(self.memory.shape):
            raise ValueError(f'{type(self).__name__}: the TPE memory has shape {tuple(memory.shape)}, this '
                             f'generator holds {tuple(self.memory.shape)} (network_g.mem_slots, prior_ch)')
        self.memory.copy_(memory.detach())


class MemoryBankPrior(_EncodedPrior):
    """Memory Bank: attention retrieval from a copy of the TPE memory (see the module docstring)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer('memory', torch.randn(self.mem_slots, self.prior_ch))

    def forward(self, lq):
        q = self.encode(lq)
        scores = torch.einsum('bchw,nc->bnhw', q, self.memory) / math.sqrt(self.prior_ch)
        return torch.einsum('bnhw,nc->bchw', scores.softmax(dim=1), self.memory)


class SparseCodingPrior(_EncodedPrior):
    """Sparse Coding: a top-``topk`` softmax code over the copied TPE atoms (see the module docstring)."""

    def __init__(self, topk=3, **kwargs):
        super().__init__(out_ch=kwargs.get('mem_slots', 256), **kwargs)
        if not 1 <= topk <= self.mem_slots:
            raise ValueError(f'SparseCodingPrior: topk must be in [1, mem_slots={self.mem_slots}], got {topk}')
        self.topk = topk
        self.register_buffer('memory', torch.randn(self.mem_slots, self.prior_ch))

    def forward(self, lq):
        values, index = self.encode(lq).topk(self.topk, dim=1)  # [B, k, h, w]
        atoms = F.embedding(index, self.memory)  # [B, k, h, w, C]
        return torch.einsum('bkhw,bkhwc->bchw', values.softmax(dim=1), atoms)


class VQPrior(_EncodedPrior):
    """Vanilla VQ: nearest codebook entry, straight-through, codebook + commitment loss (module docstring)."""

    def __init__(self, beta=0.25, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta
        # VQ-VAE's initialisation, U(-1/N, 1/N): near the encoder's first outputs, so every entry is reachable
        # (N(0, 1) entries left all but the one nearest the origin unused in our tests)
        bound = 1 / self.mem_slots
        self.codebook = nn.Parameter(torch.empty(self.mem_slots, self.prior_ch).uniform_(-bound, bound))

    def forward(self, lq):
        e = self.encode(lq)
        flat = e.permute(0, 2, 3, 1).reshape(-1, self.prior_ch)
        index = torch.cdist(flat.detach(), self.codebook.detach()).argmin(dim=1)
        q = F.embedding(index, self.codebook).view(e.shape[0], e.shape[2], e.shape[3], -1).permute(0, 3, 1, 2)
        self.last_aux_loss = None
        if self.training and torch.is_grad_enabled():
            self.last_aux_loss = F.mse_loss(q, e.detach()) + self.beta * F.mse_loss(e, q.detach())
        return e + (q - e).detach()


GENERATORS = {'memory_bank': MemoryBankPrior, 'sparse_coding': SparseCodingPrior, 'vq': VQPrior}


def build_prior_generator(name, **kwargs):
    """The generator called ``name`` (not 'dm': TPDiffNet builds the DM itself), with ``kwargs`` as
    ``_EncodedPrior``'s (in_ch, prior_ch, prior_scale, feat_ch, num_blocks, mem_slots)."""
    check_prior_generator(name)
    return GENERATORS[name](**kwargs)
