"""PriorDiffusion: TP-Diff's diffusion model, which generates the spatial texture prior ẑ from noise.

The DM runs on z, never on pixels, with T steps (8 in the paper) and the schedule of DiffIR / HI-Diff:
LDM's "linear" schedule with ``linear_start=0.1, linear_end=0.99``, i.e. linear in sqrt(beta),
``sqrt(beta_t) = linspace(sqrt(beta_start), sqrt(beta_end), T)``, so beta runs from 0.1 to 0.99.

- Condition: ``c = E_c(lq)``: PixelUnshuffle(s) -> 3x3 conv -> ``num_cond_blocks`` residual blocks, at the
  prior's resolution (1/s), ``feat_ch`` channels.
- Denoiser: a small conv net (z is spatial): ``[z_t, c] -> 3x3 conv -> num_blocks residual blocks, each
  adding a projection of the sinusoidal time embedding -> 3x3 conv -> ẑ_0`` (x0-parameterisation).
- Reverse step (deterministic, as in DiffIR): ``z_{t-1} = posterior_mean(ẑ_0, z_t)``, no added noise;
  the last step returns ẑ_0.
- Training (``z_target`` given): q-sample z_target to step T, then all T reverse steps with gradients,
  so the L1 loss ``|ẑ - z|`` trains the whole chain. Sampling (``z_target`` None): start from N(0, I).

Shapes: ``forward(lq [B, in_ch, H, W], z_target [B, prior_ch, H/s, W/s] or None) -> [B, prior_ch, H/s, W/s]``;
H and W must be multiples of s (TPDiffNet pads for it).
"""
import math

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn


def sqrt_linear_betas(timesteps, beta_start=0.1, beta_end=0.99):
    """``beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)²`` in float64 (LDM's "linear" schedule)."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer steps ``t [B]`` -> ``[B, dim]`` (Transformer / DDPM style)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """``x + conv(GELU(conv(GELU(x)) + temb))``; ``temb`` [B, C] or None. Shapes kept."""

    def __init__(self, feat_ch, temb_dim=None):
        super().__init__()
        self.conv1 = nn.Conv2d(feat_ch, feat_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(feat_ch, feat_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, feat_ch) if temb_dim else None

    def forward(self, x, temb=None):
        h = self.conv1(F.gelu(x))
        if self.temb_proj is not None:
            h = h + self.temb_proj(temb)[:, :, None, None]
        return x + self.conv2(F.gelu(h))


class ConditionEncoder(nn.Module):
    """E_c: ``lq [B, in_ch, H, W] -> c [B, feat_ch, H/s, W/s]``."""

    def __init__(self, in_ch=3, feat_ch=64, prior_scale=4, num_blocks=2):
        super().__init__()
        self.head = nn.Sequential(nn.PixelUnshuffle(prior_scale),
                                  nn.Conv2d(in_ch * prior_scale * prior_scale, feat_ch, 3, padding=1))
        self.blocks = nn.ModuleList(ResBlock(feat_ch) for _ in range(num_blocks))

    def forward(self, x):
        x = self.head(x)
        for block in self.blocks:
            x = block(x)
        return x


class PriorDenoiser(nn.Module):
    """``(z_t [B, prior_ch, h, w], c [B, feat_ch, h, w], t [B] long) -> ẑ_0 [B, prior_ch, h, w]``."""

    def __init__(self, prior_ch=64, feat_ch=64, num_blocks=5):
        super().__init__()
        self.feat_ch = feat_ch
        self.time_mlp = nn.Sequential(nn.Linear(feat_ch, feat_ch), nn.GELU(), nn.Linear(feat_ch, feat_ch))
        self.head = nn.Conv2d(prior_ch + feat_ch, feat_ch, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(feat_ch, feat_ch) for _ in range(num_blocks))
        self.tail = nn.Conv2d(feat_ch, prior_ch, 3, padding=1)

    def forward(self, z_t, c, t):
        temb = self.time_mlp(timestep_embedding(t, self.feat_ch))
        x = self.head(torch.cat([z_t, c], dim=1))
        for block in self.blocks:
            x = block(x, temb)
        return self.tail(F.gelu(x))


@ARCH_REGISTRY.register()
class PriorDiffusion(nn.Module):
    """The DM on the texture prior. See the module docstring for the algorithm and shapes.

    Args:
        in_ch: image channels. prior_ch / prior_scale: the TPE's C and s. feat_ch: width of E_c and the
        denoiser. num_blocks: denoiser residual blocks. num_cond_blocks: E_c residual blocks.
        timesteps: T. beta_start / beta_end: first and last beta of the schedule linear in sqrt(beta).
    """

    def __init__(self, in_ch=3, prior_ch=64, prior_scale=4, feat_ch=64, num_blocks=5, timesteps=8,
                 beta_start=0.1, beta_end=0.99, num_cond_blocks=2):
        super().__init__()
        if timesteps < 1:
            raise ValueError(f'timesteps must be >= 1, got {timesteps}')
        self.prior_ch = prior_ch
        self.prior_scale = prior_scale
        self.timesteps = timesteps
        self.condition = ConditionEncoder(in_ch, feat_ch=feat_ch, prior_scale=prior_scale, num_blocks=num_cond_blocks)
        self.denoiser = PriorDenoiser(prior_ch, feat_ch=feat_ch, num_blocks=num_blocks)

        betas = sqrt_linear_betas(timesteps, beta_start, beta_end)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Non-persistent: derived from the options, so checkpoints stay valid if T or the schedule change.
        buffers = {
            'betas': betas,
            'alphas_cumprod': alphas_cumprod,
            'sqrt_alphas_cumprod': alphas_cumprod.sqrt(),
            'sqrt_one_minus_alphas_cumprod': (1.0 - alphas_cumprod).sqrt(),
            # q(z_{t-1} | z_t, z_0) mean = coef1 · z_0 + coef2 · z_t
            'posterior_mean_coef1': betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            'posterior_mean_coef2': (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)

    def _noise(self, shape, like, generator):
        if generator is None:
            return torch.randn(shape, device=like.device, dtype=like.dtype)
        return torch.randn(shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)

    def forward(self, lq, z_target=None, generator=None, noise=None):
        """``noise`` (optional, ``[B, prior_ch, H/s, W/s]``): the Gaussian draw to use instead of drawing one
        (z_T when sampling, the q-sample noise when training); tiled inference passes each tile its crop
        of one draw for the whole image, so that overlapping tiles start from the same z_T."""
        b, _, h, w = lq.shape
        s = self.prior_scale
        if h % s or w % s:
            raise ValueError(f'PriorDiffusion: lq size {h}x{w} must be a multiple of prior_scale={s} '
                             '(TPDiffNet pads its input for this)')
        shape = (b, self.prior_ch, h // s, w // s)
        if z_target is not None and tuple(z_target.shape) != shape:
            raise ValueError(f'PriorDiffusion: z_target has shape {tuple(z_target.shape)}, expected {shape}')
        if noise is None:
            noise = self._noise(shape, lq, generator)
        elif tuple(noise.shape) != shape:
            raise ValueError(f'PriorDiffusion: noise has shape {tuple(noise.shape)}, expected {shape}')
        else:
            noise = noise.to(device=lq.device, dtype=lq.dtype)
        c = self.condition(lq)
        last = self.timesteps - 1
        if z_target is None:
            z = noise
        else:
            z = self.sqrt_alphas_cumprod[last] * z_target + self.sqrt_one_minus_alphas_cumprod[last] * noise
        z0 = z
        for i in range(last, -1, -1):
            t = torch.full((b,), i, device=lq.device, dtype=torch.long)
            z0 = self.denoiser(z, c, t)
            if i > 0:
                z = self.posterior_mean_coef1[i] * z0 + self.posterior_mean_coef2[i] * z
        return z0
