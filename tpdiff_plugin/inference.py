"""Put a trained TP-Diff to work: the ``Deblurrer`` API and the tiling engine behind ``tpdiff deblur``.

``Deblurrer.from_checkpoint(weights, opt=None, device='cpu', tile=None, tile_overlap=32, half=False, seed=0)``
builds the network of ``opt`` (a basicsr options file or mapping with a ``network_g`` block, or a bare
network block; None: the network options stored in the checkpoint, and for a checkpoint saved without
them the paper-size ``TPDiffNet``), loads ``params_ema`` (else ``params``) from a basicsr checkpoint with
``torch.load(weights_only=True)``, and returns an ``nn.Module``:

- ``forward(x [B, 3, H, W] float in [0, 1]) -> [B, 3, H, W]`` in [0, 1], on ``x``'s device, no gradient;
- ``deblurrer(array)``: an ``HxWx3`` uint8/uint16 RGB array (also ``HxW`` gray or ``HxWx4`` RGBA, whose
  alpha is passed through) gives back the same kind, dtype and shape;
- ``deblurrer(pil_image)`` gives back a PIL image of the same mode (RGB, L or RGBA).

Tiling (``tile`` set): the image is cut into overlapping ``tile × tile`` tiles, each run through the
network on its own, and blended into a float32 accumulator of the image size with a weight map, so
peak memory is set by the tile, not the image. Neighbouring tiles crossfade with raised-cosine ramps
centred in their overlap (1 elsewhere and at the image borders); the ramps of the tiles covering a
pixel sum to 1, so the blend has no seams.

The prior is generated per tile *consistently*: TP-Diff's DM starts from Gaussian noise z_T at 1/s of
the image. Drawing z_T per tile would give each tile a different prior. Instead one z_T is drawn for the
whole (padded) image from ``seed``, exactly as ``TPDiffNet.forward(lq, generator=...)`` draws it, and
each tile gets its crop (``TPDiffNet.forward(..., noise=...)``). Tiles start on multiples of the
network's size multiple (8 for ``prior_scale`` 4), so the crops line up with the prior grid, and an
image that fits in one tile gives bit for bit the untiled result. With ``channels_last=False`` that is also what
``basicsr test`` (``val.sample_seed``) computes for the same seed; on CPU a ``TPDiffNet`` runs in channels_last by
default (faster), which differs from it by float rounding (< 1e-5).
"""
import logging
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from tpdiff_plugin.archs.arch_util import pad_to_multiple
from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
from tpdiff_plugin.data.image_checks import PIXEL_PEAKS
from tpdiff_plugin.utils.allocator import tune_malloc
from tpdiff_plugin.utils.checkpoint import NETWORK_OPT_KEY, load_network_file, network_options, read_checkpoint
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.networks import build_network_block
from tpdiff_plugin.utils.option_files import find_options_file, load_options_file
from tpdiff_plugin.utils.precision import half_dtype

__all__ = ['Deblurrer', 'build_restorer', 'load_weights', 'add_checkpoint_arguments', 'restorer_from_checkpoint',
           'resolve_device', 'check_tiling', 'tile_starts', 'axis_windows', 'run_tiled', 'image_to_tensor',
           'tensor_to_image']


# ---------------------------------------------------------------------------------------------- network
def build_restorer(opt=None, source='--opt', key='network_g'):
    """Build the restorer network of ``opt``.

    ``opt``: None (``TPDiffNet`` class defaults, the paper size), a path to a basicsr options YAML or a
    mapping with a ``network_g`` block, or a network block itself (a mapping with ``type``). ``source`` and
    ``key`` name the file and option in error messages.
    """
    if opt is None:
        return TPDiffNet()
    if isinstance(opt, (str, os.PathLike)):
        source = find_options_file(os.fspath(opt), '--opt')  # a file, or a packaged options name
        opt = load_options_file(source)
    if not isinstance(opt, dict):
        raise UserError(f'{source}: expected an options mapping, got {type(opt).__name__}')
    if 'type' in opt:  # a bare network block
        block = opt
    elif 'network_g' in opt:
        block = opt['network_g']
    else:
        raise UserError(f'{source}: no network_g block (e.g. network_g: {{type: TPDiffNet, ...}})')
    logging.getLogger('basicsr').setLevel(logging.WARNING)  # build_network logs "Network [..] is created."
    return build_network_block(source, key, block)


HINT_EXPLICIT = 'pass the --opt (network_g) the checkpoint was trained with'
HINT_STORED = (f'the network options stored in the checkpoint ({NETWORK_OPT_KEY}) do not match its weights; '
               'pass the --opt (network_g) it was trained with')
HINT_NONE = ('the checkpoint carries no network options (it predates stored options, or was not saved by '
             'tpdiff-plugin), so the paper-size TPDiffNet was assumed; pass the --opt (network_g) it was trained with')


CHECKPOINT_OPT_HELP = ('options file whose network_g builds the network (default: the network options stored in the '
                       'checkpoint; for a checkpoint without them, the paper-size TPDiffNet)')


def add_checkpoint_arguments(parser, opt_help=CHECKPOINT_OPT_HELP):
    """``--weights``, ``--opt`` and ``--param-key``, the arguments of every tool that loads a restorer with
    :func:`restorer_from_checkpoint` (``tpdiff deblur``, ``export``, ``explain``)."""
    parser.add_argument('--weights', required=True, metavar='W.pth', help='basicsr checkpoint (net_g_*.pth)')
    parser.add_argument('--opt', default=None, metavar='X.yml', help=opt_help)
    parser.add_argument('--param-key', default=None, help='checkpoint entry (default: params_ema, else params)')


def load_weights(net, weights, param_key=None, ckpt=None, hint=HINT_EXPLICIT):
    """Load a basicsr checkpoint into ``net``; returns the key used (``params_ema``, ``params`` or None).

    ``param_key`` None: ``params_ema`` if present, else ``params``, else the file itself when it is a bare
    state dict. ``module.`` prefixes (DDP) are dropped. A checkpoint that does not fit ``net`` raises a
    one-line ``UserError`` listing a few missing / unexpected / mis-shaped keys (``utils/checkpoint.py``),
    ending with ``hint``. ``ckpt``: the checkpoint already read from ``weights`` (not read again).
    """
    return load_network_file(net, os.fspath(weights), '--weights', param_key=param_key, hint=hint, ckpt=ckpt)


def restorer_from_checkpoint(weights, opt=None, param_key=None):
    """The network of ``weights`` with its weights loaded, reading the file once.

    ``opt`` given (see :func:`build_restorer`): its network, and it wins over the options stored in the
    checkpoint. ``opt`` None: the checkpoint's stored network options (``utils.checkpoint.network_options``),
    else, for a checkpoint saved without them, the paper-size ``TPDiffNet``.
    """
    weights = os.fspath(weights)
    net = None if opt is None else build_restorer(opt)  # a bad --opt is reported before the file is read
    ckpt = read_checkpoint(weights, '--weights')
    hint = HINT_EXPLICIT
    if net is None:
        stored = network_options(ckpt, weights)
        net = build_restorer(stored, source=weights, key=NETWORK_OPT_KEY)
        hint = HINT_NONE if stored is None else HINT_STORED
    load_weights(net, weights, param_key, ckpt=ckpt, hint=hint)
    return net


# ---------------------------------------------------------------------------------------------- tiling
def check_tiling(tile, overlap, align=1):
    """Validate ``tile`` / ``overlap`` and return ``(tile, overlap)``, the tile rounded down to ``align``.

    Rule: ``tile > 2 * overlap``. A tile crossfades with its neighbours over ``overlap`` pixels on each
    side; with ``tile <= 2 * overlap`` no pixel of a tile would be its own (every tile would be all
    crossfade, and a third tile could reach into the first one's overlap).
    """
    if tile is None:
        return None, overlap
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
        raise UserError(f'--tile: expected a positive number of pixels, got {tile!r}')
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise UserError(f'--tile-overlap: expected a number of pixels >= 0, got {overlap!r}')
    rounded = tile // align * align
    if rounded < align:
        raise UserError(f'--tile: {tile} is smaller than the network\'s size multiple {align}')
    if rounded <= 2 * overlap:
        note = f' (rounded down to {rounded}, a multiple of {align})' if rounded != tile else ''
        raise UserError(f'--tile: {tile}{note} must be larger than 2 x --tile-overlap ({overlap}); '
                        f'use a tile of at least {2 * overlap + align} or a smaller overlap')
    return rounded, overlap


def tile_starts(size, tile, stride):
    """Start offsets of tiles of ``tile`` px along a side of ``size`` px, ``stride`` apart, the last one
    flush with the end. One tile (at 0) when ``tile >= size``."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _fade_in(positions, center, width):
    """Raised-cosine step from 0 to 1 over ``width`` px centred on ``center``, at pixel centres ``positions``."""
    if width <= 0:
        return (positions + 0.5 >= center).double()
    u = ((positions + 0.5 - (center - width / 2)) / width).clamp(0, 1)
    return 0.5 - 0.5 * torch.cos(math.pi * u)


def axis_windows(starts, tile, overlap):
    """1-D blend windows (``[tile]`` float32 each) for tiles at ``starts`` along one axis.

    Between tiles i and i+1 the weight crossfades over ``min(overlap, their overlap)`` px centred in their
    overlap (narrowed if it would meet the next crossfade): tile i fades out exactly as tile i+1 fades in,
    so at every pixel the windows of the tiles covering it sum to 1 (a partition of unity), and the pixels
    nearest a tile's inner border, where it lacks context, get no weight when the overlap is wider.
    """
    n = len(starts)
    centers = [(starts[i + 1] + starts[i] + tile) / 2 for i in range(n - 1)]
    widths = [min(overlap, starts[i] + tile - starts[i + 1]) for i in range(n - 1)]
    for i in range(n - 2):  # crossfades must not meet: each keeps to its half of the gap
        room = centers[i + 1] - centers[i]
        if widths[i] / 2 + widths[i + 1] / 2 > room:
            widths[i] = widths[i + 1] = min(widths[i], widths[i + 1], int(room))
    windows = []
    for i, s0 in enumerate(starts):
        pos = torch.arange(s0, s0 + tile, dtype=torch.float64)
        w = torch.ones(tile, dtype=torch.float64)
        if i > 0:
            w = w * _fade_in(pos, centers[i - 1], widths[i - 1])
        if i < n - 1:
            w = w * (1 - _fade_in(pos, centers[i], widths[i]))
        windows.append(w.float())
    return windows


def run_tiled(fn, x, tile, overlap, align=1, noise=None, prior_scale=1, progress=None):
    """Run ``fn`` over ``x [B, C, H, W]`` tile by tile and blend the outputs; returns float32 ``[B, C, H, W]``
    on ``x``'s device.

    ``fn(x_tile, noise_tile) -> out_tile`` (``noise_tile`` None when ``noise`` is None). ``H`` and ``W`` must
    be multiples of ``align`` (the caller pads), ``tile`` a multiple of ``align`` and ``align`` a multiple
    of ``prior_scale``; ``noise`` is ``[B, Cn, H/prior_scale, W/prior_scale]`` and each tile gets its crop.
    Tiles start ``tile - overlap`` (rounded down to ``align``) apart, the last one flush with the edge;
    see :func:`axis_windows` for the blend. Only the float32 output accumulator and weight map are
    image-sized; ``fn`` never sees more than one tile. ``progress``: optional callable(done, total).
    """
    b, c, h, w = x.shape
    if h % align or w % align or tile % align:
        raise ValueError(f'run_tiled: image {h}x{w} and tile {tile} must be multiples of align={align}')
    th, tw = min(tile, h), min(tile, w)
    stride = max(align, (tile - overlap) // align * align)
    ys, xs = tile_starts(h, th, stride), tile_starts(w, tw, stride)
    if len(ys) == 1 and len(xs) == 1:  # one tile: the untiled result, exactly
        out = fn(x, noise).float()
        if progress is not None:
            progress(1, 1)
        return out
    wys, wxs = axis_windows(ys, th, overlap), axis_windows(xs, tw, overlap)
    out = None
    weight = torch.zeros(1, 1, h, w, dtype=torch.float32, device=x.device)
    total, done, s = len(ys) * len(xs), 0, prior_scale
    for y0, wy in zip(ys, wys):
        for x0, wx in zip(xs, wxs):
            tile_noise = None
            if noise is not None:
                tile_noise = noise[..., y0 // s:(y0 + th) // s, x0 // s:(x0 + tw) // s]
            y = fn(x[..., y0:y0 + th, x0:x0 + tw], tile_noise).float()
            if out is None:
                out = torch.zeros(b, y.shape[1], h, w, dtype=torch.float32, device=x.device)
            win = (wy[:, None] * wx[None, :]).to(x.device)
            out[..., y0:y0 + th, x0:x0 + tw] += y * win
            weight[..., y0:y0 + th, x0:x0 + tw] += win
            del y
            done += 1
            if progress is not None:
                progress(done, total)
    return out.div_(weight.clamp_(min=1e-12))


# ---------------------------------------------------------------------------------------------- images
def image_to_tensor(img):
    """``HxW`` / ``HxWx3`` / ``HxWx4`` uint8 or uint16 RGB(A) array -> ``([1, 3, H, W] float32 in [0, 1], info)``.

    ``info`` holds what :func:`tensor_to_image` needs to give back the same kind of array (dtype, gray or
    colour, the alpha channel, passed through unchanged).
    """
    if not isinstance(img, np.ndarray):
        raise TypeError(f'expected a numpy array, got {type(img).__name__}')
    if img.dtype not in PIXEL_PEAKS:
        raise ValueError(f'unsupported pixel type {img.dtype}: only 8-bit and 16-bit images are accepted')
    peak = float(PIXEL_PEAKS[img.dtype])
    gray = img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
        raise ValueError(f'unsupported image shape {tuple(img.shape)}: expected HxW, HxWx3 (RGB) or HxWx4 (RGBA)')
    alpha = img[..., 3].copy() if img.ndim == 3 and img.shape[2] == 4 else None
    rgb = img.reshape(img.shape[0], img.shape[1], -1)[..., :3]
    if gray:
        rgb = np.repeat(rgb[..., :1], 3, axis=2)
    x = torch.from_numpy(np.ascontiguousarray(rgb).astype(np.float32) / peak).permute(2, 0, 1)[None]
    return x, {'dtype': img.dtype, 'peak': peak, 'gray': gray, 'ndim': img.ndim, 'alpha': alpha}


def tensor_to_image(x, info):
    """Inverse of :func:`image_to_tensor` for ``x [1, 3, H, W]`` (clipped to [0, 1], rounded)."""
    rgb = x[0].detach().float().clamp_(0, 1).permute(1, 2, 0).cpu().numpy()
    if info['gray']:  # the network sees three equal channels; give back one (their mean)
        rgb = rgb.mean(axis=2, keepdims=True)
    out = np.rint(rgb * info['peak']).astype(info['dtype'])
    if info['gray']:
        return out[..., 0] if info['ndim'] == 2 else out
    if info['alpha'] is not None:
        out = np.concatenate([out, info['alpha'][..., None]], axis=2)
    return out


# ---------------------------------------------------------------------------------------------- API
def resolve_device(device):
    """``'auto'``/None (CUDA when available, else the CPU), ``'cpu'``, ``'cuda'``, ``'cuda:N'`` -> a device; asking for
    CUDA where there is none is a UserError."""
    device = torch.device('cuda' if device in (None, 'auto') and torch.cuda.is_available()
                          else 'cpu' if device in (None, 'auto') else device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA device is available here; use --device cpu')
    return device


class Deblurrer(nn.Module):
    """A restorer ready for use: network + weights + device + precision + tiling + seed.

    Example::

        from tpdiff_plugin import Deblurrer
        deblur = Deblurrer.from_checkpoint('experiments/TPDiff_Demo_Stage2/models/net_g_latest.pth', tile=512)
        sharp = deblur(cv2.cvtColor(cv2.imread('blurry.png'), cv2.COLOR_BGR2RGB))  # HxWx3 uint8 RGB in/out
        y = deblur(torch.rand(1, 3, 720, 1280))                                     # [B, 3, H, W] in [0, 1]

    Args:
        net: the network (``TPDiffNet`` or any restorer ``[B, 3, H, W] -> [B, 3, H, W]``).
        device: ``'cpu'``, ``'cuda'``, ``'cuda:N'`` or ``'auto'``.
        tile, tile_overlap: tile size (rounded down to the network's size multiple) and overlap in pixels;
            ``tile=None`` runs whole images. Rule: ``tile > 2 * tile_overlap``.
        half: autocast in reduced precision, weights kept fp32: ``True`` or ``'bf16'`` is bfloat16 (on CUDA where
            the GPU supports it, else float16), ``'fp16'`` float16; ``False`` (default) runs fp32. bf16 is the
            default because it keeps fp32's exponent range: FM-MSA's attention logits and the DM's noise
            estimates cannot overflow as they can in fp16.
        seed: seed of the DM's initial noise; every call draws it afresh from this seed, so results do not
            depend on call order.
        channels_last: run the network (converted in place, as ``.to(device)`` moves it) and its inputs in
            ``torch.channels_last``. None: for a ``TPDiffNet`` on CPU, where it is faster and LayerNorm2d's
            permutes copy nothing; the outputs differ from NCHW by float rounding (< 1e-5). ``False`` gives bit
            for bit the NCHW forward that ``basicsr test`` runs.

    On CPU it calls ``torch.set_flush_denormal(True)`` for the process, as every CPU entry point of the
    plugin does: near-identity residual networks produce denormal floats, which x86 handles ~20x slower; and
    it tunes glibc's malloc to keep freed memory (``utils/allocator.py``, opt out with ``TPDIFF_NO_MALLOPT=1``).
    """

    def __init__(self, net, device='cpu', tile=None, tile_overlap=32, half=False, seed=0, channels_last=None):
        super().__init__()
        self.device = resolve_device(device)
        if self.device.type == 'cpu':
            torch.set_flush_denormal(True)
            tune_malloc()
        self.net = net.eval().to(self.device)
        if channels_last is None:  # measured 0.84x the time of NCHW for TP-Diff at 256x256 (docs/performance.md)
            channels_last = self.device.type == 'cpu' and isinstance(net, TPDiffNet)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.prior_scale = int(getattr(net, 'prior_scale', 1)) if getattr(net, 'dm', None) is not None else 1
        self.align = int(getattr(net, 'pad_multiple', 1))
        self.uses_noise = getattr(net, 'dm', None) is not None
        self.tile, self.tile_overlap = check_tiling(tile, tile_overlap, self.align)
        self.half = half_dtype(half, self.device)
        self.seed = int(seed)

    @classmethod
    def from_checkpoint(cls, weights, opt=None, device='cpu', tile=None, tile_overlap=32, half=False, seed=0,
                        param_key=None, channels_last=None):
        """Build the network (``opt``, else the options stored in ``weights``: see
        :func:`restorer_from_checkpoint`), load ``weights`` and wrap it."""
        net = restorer_from_checkpoint(weights, opt, param_key)
        return cls(net, device=device, tile=tile, tile_overlap=tile_overlap, half=half, seed=seed,
                   channels_last=channels_last)

    def extra_repr(self):
        return (f'device={self.device}, tile={self.tile}, tile_overlap={self.tile_overlap}, half={self.half}, '
                f'seed={self.seed}, channels_last={self.channels_last}')

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.half) if self.half else nullcontext()

    def _run(self, x_tile, noise_tile):
        if self.channels_last:
            x_tile = x_tile.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.net(x_tile) if noise_tile is None else self.net(x_tile, noise=noise_tile)
        return out.contiguous()

    def initial_noise(self, batch, padded_hw):
        """The DM's z_T for a padded image: drawn as ``TPDiffNet`` draws it from ``Generator().manual_seed(seed)``."""
        s = self.prior_scale
        shape = (batch, self.net.prior_ch, padded_hw[0] // s, padded_hw[1] // s)
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float32)

    def forward(self, x, progress=None):
        """``x [B, 3, H, W]`` float in [0, 1] -> deblurred ``[B, 3, H, W]`` in [0, 1] (same device and dtype)."""
        if not torch.is_tensor(x) or x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f'Deblurrer: expected a float tensor [B, 3, H, W], got '
                             f'{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}')
        h, w = x.shape[-2:]
        with torch.no_grad():
            xp = pad_to_multiple(x.to(self.device, torch.float32), self.align)
            noise = self.initial_noise(x.shape[0], xp.shape[-2:]).to(self.device) if self.uses_noise else None
            if self.tile is None:
                out = self._run(xp, noise).float()
            else:
                out = run_tiled(self._run, xp, self.tile, self.tile_overlap, self.align, noise, self.prior_scale,
                                progress)
            return out[..., :h, :w].clamp_(0, 1).to(x.device, x.dtype)

    def deblur_array(self, img):
        """An ``HxW`` / ``HxWx3`` / ``HxWx4`` uint8 or uint16 RGB(A) array -> the deblurred array, same kind."""
        x, info = image_to_tensor(img)
        return tensor_to_image(self.forward(x), info)

    def __call__(self, x, *args, **kwargs):
        if isinstance(x, np.ndarray):
            return self.deblur_array(x)
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            Image = None
        if Image is not None and isinstance(x, Image.Image):
            mode = x.mode
            img = x if mode in ('RGB', 'L', 'RGBA') else x.convert('RGB')
            return Image.fromarray(self.deblur_array(np.asarray(img)))  # uint8 RGB, L or RGBA: the same mode
        return super().__call__(x, *args, **kwargs)
