"""Texture Prior Encoder (TPE) of TP-Diff: a learnable texture memory, written from sharp images and read
by blurry ones, producing the spatial texture prior z.

- Encoders E_b, E_s: ``3x3 conv (in_ch -> enc_ch) -> GELU -> PixelUnshuffle(s) -> 1x1 (-> prior_ch) -> GELU
  -> 3x3 conv``: one token of ``prior_ch`` channels per s×s patch (s = ``prior_scale``; s = 1 works).
- Memory M: ``[mem_slots, prior_ch]`` learnable entries (N = 256, L = C = 64 in the paper).
- Write, texture-memory enhancement (``write``): M attends to the sharp tokens of the whole batch,
  ``M' = M + W_o softmax(W_q M · (W_k T_s)ᵀ / √L) W_v T_s``. Sharp images are unpaired with the blurry ones.
- Read, texture-memory transfer (``read``): each blurry token q = W_r IN(E_b(b)) scores every entry of M'
  (``q · M'ᵀ / √L``, the entries serve as their own keys) and takes the one with the highest score
  (argmax, not a weighted sum). The selected entries, put back in place, form z.
  IN standardises each channel over the image's token grid (no affine; W_r follows). Without it the
  tokens of an image share a large common component (their spread is ~5-10% of their mean at
  initialisation) and one or two of the 256 entries win for every token (measured on two scikit-image
  photos at 256²: 1-3 distinct entries; with IN about 200), so only those entries would ever get
  gradient. The selection is meant to follow the *spatial* variation of texture, which IN keeps.
  (A constant shift of all entries, which the write tends to add, does not change the argmax.)
  Gradient: ``z = M'[idx] + (q - sg(q))``: the forward value is exactly the selected entries; backward,
  the selected rows of M' get dL/dz (plain indexing, so unselected rows get exactly zero) and the
  query path (W_r, E_b) gets the straight-through copy of dL/dz, as a VQ-VAE encoder does.

- Memory EMA (ours, not in the paper): in training, every write also updates ``memory_ema``, an
  exponential moving average of the enhanced memories (decay ``mem_ema_decay``; a plain running mean over
  the first 1/(1 - decay) writes). It is a memory "written from the training sharp set" that no longer
  depends on which sharp batch happened to be drawn, so reading it gives a prior that is a function of
  the blurry image alone: the batch-independent DM target of stage 2 (``train.dm_target: ema_memory``).
  It is a buffer (saved in checkpoints, no gradient); checkpoints without it load with it set to M.
- ``usage(index)``: how many distinct entries a read selected, and the perplexity of their histogram
  (exp of its entropy; = the number of entries if all were used equally), to see a collapsed memory.

Shapes: ``read(blur [B, in_ch, H, W]) -> z [B, prior_ch, ceil(H/s), ceil(W/s)]`` (inputs are padded by
reflection to a multiple of s); ``write(sharp [B', in_ch, H', W']) -> [mem_slots, prior_ch]``.
"""
import math

import torch
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

from tpdiff_plugin.archs.arch_util import pad_to_multiple


class TokenEncoder(nn.Module):
    """E_b / E_s: image ``[B, in_ch, H, W]`` (H, W multiples of s) -> tokens ``[B, prior_ch, H/s, W/s]``."""

    def __init__(self, in_ch=3, enc_ch=8, prior_ch=64, prior_scale=4):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, enc_ch, 3, padding=1), nn.GELU(),
            nn.PixelUnshuffle(prior_scale),
            nn.Conv2d(enc_ch * prior_scale * prior_scale, prior_ch, 1), nn.GELU(),
            nn.Conv2d(prior_ch, prior_ch, 3, padding=1))

    def forward(self, x):
        return self.body(x)


@ARCH_REGISTRY.register()
class TexturePriorEncoder(nn.Module):
    """TPE: ``forward(blur, sharp=None) -> z [B, prior_ch, ceil(H/s), ceil(W/s)]``.

    Args:
        in_ch: image channels. prior_ch: C of the prior (= memory entry length L). mem_slots: N.
        prior_scale: s, the prior is at 1/s of the image. enc_ch: width of the full-resolution conv of
        the encoders. mem_init_std: std of the memory's normal init (1: entries of unit-scale components,
        the scale of the DM's N(0, I) start). mem_ema_decay: decay of ``memory_ema`` (0 turns its
        updates off).
    """

    def __init__(self, in_ch=3, prior_ch=64, mem_slots=256, prior_scale=4, enc_ch=8, mem_init_std=1.0,
                 mem_ema_decay=0.99):
        super().__init__()
        if not 0 <= mem_ema_decay < 1:
            raise ValueError(f'mem_ema_decay must be in [0, 1), got {mem_ema_decay}')
        self.prior_ch = prior_ch
        self.prior_scale = prior_scale
        self.mem_slots = mem_slots
        self.mem_ema_decay = mem_ema_decay
        encoder = dict(in_ch=in_ch, enc_ch=enc_ch, prior_ch=prior_ch, prior_scale=prior_scale)
        self.enc_blur = TokenEncoder(**encoder)
        self.enc_sharp = TokenEncoder(**encoder)
        self.memory = nn.Parameter(torch.randn(mem_slots, prior_ch) * mem_init_std)
        self.register_buffer('memory_ema', self.memory.detach().clone())
        self.register_buffer('memory_ema_updates', torch.zeros((), dtype=torch.long))
        # write: memory queries, sharp-token keys/values, output projection
        self.write_q = nn.Linear(prior_ch, prior_ch)
        self.write_k = nn.Linear(prior_ch, prior_ch)
        self.write_v = nn.Linear(prior_ch, prior_ch)
        self.write_out = nn.Linear(prior_ch, prior_ch)
        # read: blurry-token query into the memory's space
        self.read_q = nn.Linear(prior_ch, prior_ch)

    def _tokens(self, encoder, img):
        return encoder(pad_to_multiple(img, self.prior_scale))

    def write(self, sharp):
        """Texture-memory enhancement: ``sharp [B, in_ch, H, W] -> enhanced memory [mem_slots, prior_ch]``."""
        tokens = self._tokens(self.enc_sharp, sharp).flatten(2).transpose(1, 2).reshape(-1, self.prior_ch)
        q = self.write_q(self.memory)
        k, v = self.write_k(tokens), self.write_v(tokens)
        attn = (q @ k.t() / math.sqrt(self.prior_ch)).softmax(dim=-1)  # [N, B·h·w]: over all sharp tokens
        enhanced = self.memory + self.write_out(attn @ v)
        if self.training and self.mem_ema_decay > 0:
            self._update_memory_ema(enhanced.detach())
        return enhanced

    @torch.no_grad()
    def _update_memory_ema(self, enhanced):
        n = int(self.memory_ema_updates) + 1
        decay = min(self.mem_ema_decay, 1 - 1 / n)  # the first write is copied; a running mean until the decay
        self.memory_ema.mul_(decay).add_(enhanced, alpha=1 - decay)
        self.memory_ema_updates += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the memory EMA existed: start it at the learned memory, as a new TPE does
        if prefix + 'memory' in state_dict and prefix + 'memory_ema' not in state_dict:
            state_dict[prefix + 'memory_ema'] = state_dict[prefix + 'memory'].detach().clone()
            state_dict[prefix + 'memory_ema_updates'] = torch.zeros((), dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def usage(self, index):
        """``(distinct entries, perplexity)`` of a read's selected entries ``index`` (any shape, long), as
        floats: perplexity = exp(entropy of the entry histogram), between 1 (one entry for every token) and
        the number of distinct entries (all used equally)."""
        counts = torch.bincount(index.flatten(), minlength=self.mem_slots).float()
        p = counts[counts > 0] / counts.sum()
        return float((counts > 0).sum()), float(torch.exp(-(p * p.log()).sum()))

    def read(self, blur, memory=None, return_index=False):
        """Texture-memory transfer: ``blur [B, in_ch, H, W] -> z [B, prior_ch, ceil(H/s), ceil(W/s)]``.

        ``memory`` None reads the raw learnable memory (no sharp image at hand); ``return_index`` also
        returns the selected entry per token, ``[B, h, w]`` long.
        """
        if memory is None:
            memory = self.memory
        tokens = self._tokens(self.enc_blur, blur)
        b, c, h, w = tokens.shape
        tokens = tokens.flatten(2)
        # Per-image standardisation over the token grid (an instance norm without affine, written out
        # because F.instance_norm rejects a 1x1 grid): see the module docstring for why.
        tokens = (tokens - tokens.mean(-1, keepdim=True)) / (tokens.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        q = self.read_q(tokens.transpose(1, 2))  # [B, hw, C]
        scores = q @ memory.t() / math.sqrt(c)  # [B, hw, N]
        index = scores.argmax(dim=-1)
        selected = memory[index]  # [B, hw, C]; gradient only to the selected rows
        z = selected + (q - q.detach())  # straight-through to the query path; value unchanged
        z = z.transpose(1, 2).reshape(b, c, h, w)
        if return_index:
            return z, index.view(b, h, w)
        return z

    def forward(self, blur, sharp=None, return_index=False):
        """``sharp``: None (read the learned memory), one sharp batch whose written memory all of ``blur``
        reads, or a list of k entries (batches or None), one memory for each of k equal chunks of ``blur``
        along the batch dim (TPDiffModel: the real blurry chunk reads a memory written from the unpaired
        sharp batch, the chunks made from that batch read one written from another batch). One call, so a
        DDP-wrapped TPE runs a single forward; a batch listed more than once is written once."""
        if not isinstance(sharp, (list, tuple)):
            return self.read(blur, self.write(sharp) if sharp is not None else None, return_index=return_index)
        if blur.shape[0] % len(sharp):
            raise ValueError(f'TexturePriorEncoder: {blur.shape[0]} blurry images do not split into '
                             f'{len(sharp)} equal chunks, one per sharp batch')
        written = {}  # id of a sharp batch -> its memory
        for s in sharp:
            if s is not None and id(s) not in written:
                written[id(s)] = self.write(s)
        outs = [self.read(chunk, written.get(id(s)), return_index=True)
                for chunk, s in zip(blur.chunk(len(sharp)), sharp)]
        z = torch.cat([o[0] for o in outs])
        return (z, torch.cat([o[1] for o in outs])) if return_index else z


def nearest_entries(z, memory, chunk=65536):
    """The memory entry nearest (L2) to each prior vector: ``z [B, C, h, w]``, ``memory [N, C]`` -> ``[B, h, w]``
    long, ``chunk`` vectors at a time (the distance matrix of a large image would not fit)."""
    b, c, h, w = z.shape
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, c).float()
    mem = memory.detach().float().to(flat.device)
    index = torch.cat([torch.cdist(part, mem).argmin(1) for part in flat.split(chunk)])
    return index.view(b, h, w)
