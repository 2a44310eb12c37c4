"""See what TP-Diff's prior does: ``explain_image`` (the arrays) and ``explain_figure`` (one RGB figure), behind
``tpdiff explain`` and the validation figures written to tensorboard.

``explain_image(net, image, tpe=None, stage=2, ...)`` runs one image through a ``TPDiffNet`` and returns:

- ``output``: the restored image. With a DM (stage 2) the prior is sampled from noise drawn from ``seed``,
  exactly as ``Deblurrer`` / ``tpdiff deblur`` and validation (``val.sample_seed``) draw it. For stage 1, or
  a network without a DM, the TPE reads the prior from the blurry image (``memory``: default the TPE's memory
  EMA once written, else its learned memory) and DN gets it, as stage-1 validation does.
- ``prior`` ``[C, ceil(H/s), ceil(W/s)]`` and ``prior_rgb``: its first three principal components as colour,
  with a FIXED map (:class:`PriorColours`, computed once from the TPE's memory entries, or without a TPE from
  the DM's output layer), so the same prior vector has the same colour in every image.
- ``memory_index`` ``[ceil(H/s), ceil(W/s)]``: stage 1, the entry the TPE read selected for each region;
  stage 2, the memory entry nearest (L2) to each DM prior vector; None without a TPE.
- ``offsets`` ``{level: [H_l, W_l]}``: FM-MSA's offset length |Δp| in pixels of that U-Net level's feature
  map (level l at 1/2^(l-1)), the mean over the filter taps and offset groups, averaged over the FM-MSA
  blocks at that level (encoder, decoder and, at level 1, refinement), recorded with forward hooks.

Tiling (``tile`` set) follows ``inference.run_tiled``: the same tiles and raised-cosine windows, and each
output is blended at its own resolution (the prior at 1/s, level l's offsets at 1/2^(l-1)), so the output
equals ``Deblurrer``'s tiled result. The TPE read (stage 1) runs on the whole image, since it standardises its
tokens over the image, and each tile gets its crop of that prior, as it gets its crop of the DM noise.
"""
import os

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from tpdiff_plugin.archs.arch_util import pad_to_multiple
from tpdiff_plugin.archs.tpe_arch import TexturePriorEncoder, nearest_entries  # noqa: F401  (re-exported)
from tpdiff_plugin.inference import axis_windows, check_tiling, image_to_tensor, tile_starts
from tpdiff_plugin.utils.checkpoint import load_network_file, network_options, read_checkpoint
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.networks import build_network_block
from tpdiff_plugin.utils.option_files import find_options_file, load_options_file

__all__ = ['PriorColours', 'explain_image', 'explain_figure', 'figure_layout', 'nearest_entries',
           'default_memory', 'OffsetRecorder', 'tpe_from_checkpoint']


# ---------------------------------------------------------------------------------------------- prior colours
def _three_components(vh):
    """The first 3 rows of ``vh`` (zero rows added for a prior of fewer channels), each signed so that its
    largest entry is positive: SVD's sign is arbitrary, the colours must not be."""
    rows = vh[:3]
    if rows.shape[0] < 3:
        rows = torch.cat([rows, rows.new_zeros(3 - rows.shape[0], vh.shape[1])])
    signs = torch.sign(rows.gather(1, rows.abs().argmax(1, keepdim=True)))
    return rows * torch.where(signs == 0, torch.ones_like(signs), signs)


class PriorColours:
    """A fixed linear map prior vector -> RGB in [0, 1]: ``0.5 + 0.5 · basisᵀ(z - centre) / scale``, clipped.

    ``from_memory(entries)``: ``basis`` is the first 3 principal components of the memory entries (the
    vectors a TPE prior is made of), ``centre`` their mean, ``scale`` twice each component's standard
    deviation over the entries. ``from_dm(dm)`` (no TPE at hand): the principal directions of the DM output
    layer's weights (the prior lies in their span plus the bias), centred on the bias, scale 2 (the prior is
    trained to unit-scale memory entries). Either way it depends on the network only, never on an image.
    """

    def __init__(self, centre, basis, scale, source):
        self.centre, self.basis, self.scale, self.source = centre, basis, scale, source

    @classmethod
    def from_memory(cls, entries, source='TPE memory entries'):
        v = entries.detach().double().cpu()
        centre = v.mean(0)
        basis = _three_components(torch.linalg.svd(v - centre, full_matrices=False)[2])
        scale = 2 * ((v - centre) @ basis.t()).std(0, unbiased=False).clamp_min(1e-8)
        return cls(centre, basis, scale, f'PCA of {v.shape[0]} {source}')

    @classmethod
    def from_dm(cls, dm):
        tail = dm.denoiser.tail
        directions = tail.weight.detach().double().cpu().flatten(1).t()  # [F·k·k, C]
        basis = _three_components(torch.linalg.svd(directions, full_matrices=False)[2])
        return cls(tail.bias.detach().double().cpu(), basis, torch.full((3,), 2.0, dtype=torch.float64),
                   'principal directions of the DM output layer (no TPE)')

    def __call__(self, z):
        """``z [C, h, w]`` (tensor or array) -> ``[h, w, 3]`` float32 RGB in [0, 1]."""
        z = torch.as_tensor(z).detach().double().cpu()
        p = torch.einsum('kc,chw->hwk', self.basis, z - self.centre[:, None, None])
        return (0.5 + 0.5 * p / self.scale).clamp(0, 1).float().numpy()


# ---------------------------------------------------------------------------------------------- memory
def default_memory(tpe):
    """``(memory, description)`` an explanation reads: the TPE's memory EMA once training has written it (the
    stage-2 DM target and stage-1 validation's memory with ``train.dm_target: ema_memory``), else the learned
    memory."""
    n = int(tpe.memory_ema_updates)
    if n > 0:
        return tpe.memory_ema, f'memory EMA of {n} training writes'
    return tpe.memory, 'learned memory'


# ---------------------------------------------------------------------------------------------- offsets
class OffsetRecorder:
    """``with OffsetRecorder(net) as rec``: forward hooks on the offset convs of every FM-MSA filter; each call
    records the offset length map ``[B, h, w]`` (mean over taps and groups of |(dy, dx)|, in feature pixels).
    ``take(height)`` returns ``{level: mean map}`` for a forward of a (padded) input ``height`` pixels high
    and forgets the records."""

    def __init__(self, net):
        self.filters = [m for m in net.modules() if self.convs(m) is not None]
        self.records, self.handles = [], []

    @staticmethod
    def convs(module):
        """The offset-predicting convs of an FM-MSA sampling filter (``Convs(z)``, or ``Convs(F)`` of the
        feature-driven one), whose first ``2·k²·G`` output channels are the offsets; else None."""
        if not hasattr(module, 'kernel_size') or not hasattr(module, 'offset_groups'):
            return None
        return getattr(module, 'prior_convs', None) or getattr(module, 'feature_convs', None)

    def _hook(self, module):
        taps = module.kernel_size * module.kernel_size * module.offset_groups

        def hook(_, __, out):
            off = out[:, :2 * taps].float()
            self.records.append(off.view(off.shape[0], taps, 2, *off.shape[-2:]).norm(dim=2).mean(1))
        return hook

    def __enter__(self):
        self.handles = [self.convs(m).register_forward_hook(self._hook(m)) for m in self.filters]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def take(self, height):
        levels = {}
        for rec in self.records:
            levels.setdefault((height // rec.shape[-2]).bit_length(), []).append(rec)
        self.records = []
        return {level: torch.stack(maps).mean(0) for level, maps in sorted(levels.items())}


# ---------------------------------------------------------------------------------------------- computation
def blend_tiles(fn, x, side, tile, overlap, align, side_scale):
    """Run ``fn(x_tile, side_tile) -> {name: [B, C, th/f, tw/f]}`` over the tiles of ``x`` (those of
    ``inference.run_tiled``) and blend each output at its own scale f; ``side`` (the DM noise or the TPE prior,
    at 1/``side_scale``) is cropped per tile. Returns ``{name: [B, C, H/f, W/f]}``."""
    h, w = x.shape[-2:]
    th, tw = (min(tile, h), min(tile, w)) if tile else (h, w)
    stride = max(align, (tile - overlap) // align * align) if tile else h
    ys, xs = tile_starts(h, th, stride), tile_starts(w, tw, stride)
    if len(ys) == 1 and len(xs) == 1:
        return fn(x, side)
    sums, weights, windows, s = {}, {}, {}, side_scale
    for y0 in ys:
        for x0 in xs:
            outs = fn(x[..., y0:y0 + th, x0:x0 + tw], side[..., y0 // s:(y0 + th) // s, x0 // s:(x0 + tw) // s])
            for name, y in outs.items():
                f = th // y.shape[-2]
                if f not in windows:
                    windows[f] = [dict(zip(starts, axis_windows([v // f for v in starts], size // f, overlap // f)))
                                  for starts, size in ((ys, th), (xs, tw))]
                win = (windows[f][0][y0][:, None] * windows[f][1][x0][None, :]).to(y.device)
                if name not in sums:
                    sums[name] = y.new_zeros(y.shape[:2] + (h // f, w // f))
                    weights[name] = y.new_zeros((1, 1, h // f, w // f))
                a, b = y0 // f, x0 // f
                sums[name][..., a:a + y.shape[-2], b:b + y.shape[-1]] += y * win
                weights[name][..., a:a + y.shape[-2], b:b + y.shape[-1]] += win
    return {name: sums[name].div_(weights[name].clamp_(min=1e-12)) for name in sums}


def _as_batch(image):
    if isinstance(image, np.ndarray):
        return image_to_tensor(image)[0]
    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[:2] != (1, 3) or not image.is_floating_point():
        raise ValueError('explain_image: expected an HxW(x3/4) uint8/uint16 array or a float tensor [1, 3, H, W]')
    return image


def explain_image(net, image, tpe=None, stage=2, memory=None, colours=None, tile=None, tile_overlap=32, seed=0,
                  device='cpu'):
    """Explain one image (see the module docstring); returns a dict of numpy arrays and descriptions.

    ``image``: ``HxWx3`` uint8/uint16 RGB array or ``[1, 3, H, W]`` float tensor in [0, 1]. ``stage`` 1: the TPE
    gives the prior (also for a net without a DM); 2: the DM samples it. ``memory``: the TPE memory read or
    searched (default :func:`default_memory`); ``colours``: a :class:`PriorColours` (default from that memory,
    else from the DM). The networks' train/eval modes are restored afterwards.
    """
    gen = getattr(net, 'prior_gen', None)  # a prior generator other than the DM (network_g.prior_generator)
    use_tpe = stage == 1 or (net.dm is None and gen is None)
    if use_tpe and tpe is None:
        raise UserError('the prior of a stage-1 checkpoint (or of a network without a DM) comes from its TPE: '
                        'pass the TPE checkpoint (--tpe net_tpe_<iter>.pth)')
    device = torch.device(device)
    x = _as_batch(image).to(device, torch.float32)
    align, s = int(net.pad_multiple), int(net.prior_scale)
    tile, tile_overlap = check_tiling(tile, tile_overlap, align)
    modes = [(m, m.training) for m in (net, tpe) if m is not None]
    try:
        for m, _ in modes:
            m.eval().to(device)
        mem_note = None
        if tpe is not None and memory is None:
            memory, mem_note = default_memory(tpe)
        if memory is not None:
            memory = memory.to(device)
        if colours is None and memory is None and gen is not None:
            atoms = gen.memory if hasattr(gen, 'memory') else gen.codebook
            colours = PriorColours.from_memory(atoms, source=f'{net.prior_generator} generator atoms (no TPE)')
        if colours is None:
            colours = PriorColours.from_memory(memory) if memory is not None else PriorColours.from_dm(net.dm)
        with torch.no_grad(), OffsetRecorder(net) as rec:
            h, w = x.shape[-2:]
            xp = pad_to_multiple(x, align)
            grid = (xp.shape[-2] // s, xp.shape[-1] // s)
            if use_tpe:
                z, index = tpe.read(x, memory=memory, return_index=True)
                side = F.pad(z, (0, grid[1] - z.shape[-1], 0, grid[0] - z.shape[-2]), mode='replicate')
            else:
                side = torch.randn((1, net.prior_ch) + grid, generator=torch.Generator().manual_seed(int(seed)),
                                   dtype=torch.float32).to(device)

            def run(xt, st):
                if use_tpe:
                    maps = {'output': net(xt, prior=st).float()}
                else:
                    out, prior = net(xt, noise=st, return_prior=True)
                    maps = {'output': out.float(), 'prior': prior.float()}
                maps.update({f'offset{level}': m[:, None] for level, m in rec.take(xt.shape[-2]).items()})
                return maps

            maps = blend_tiles(run, xp, side, tile, tile_overlap, align, s)
            hs, ws = -(-h // s), -(-w // s)
            if not use_tpe:
                z = maps['prior'][..., :hs, :ws]
                index = nearest_entries(z, memory) if memory is not None else None
    finally:
        for m, was_training in modes:
            m.train(was_training)
    offsets = {}
    for name in sorted(k for k in maps if k.startswith('offset')):
        f = 2 ** (int(name[6:]) - 1)
        offsets[int(name[6:])] = maps[name][0, 0, :-(-h // f), :-(-w // f)].cpu().numpy()
    if use_tpe:
        prior_source = f'TPE read ({mem_note or "given memory"})'
        index_source = 'memory entry the TPE read selected'
    else:
        prior_source = f'DM sample (seed {seed})' if gen is None else f'{net.prior_generator} generator'
        nearest = f'memory entry nearest the {"DM" if gen is None else "generated"} prior'
        index_source = (nearest + (f' ({mem_note})' if mem_note else '') if index is not None
                        else 'none: no TPE checkpoint')
    z0 = z[0].float().cpu()
    return {
        'input': x[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy(),
        'output': maps['output'][0, :, :h, :w].clamp(0, 1).permute(1, 2, 0).cpu().numpy(),
        'prior': z0.numpy(), 'prior_rgb': colours(z0),
        'memory_index': None if index is None else index[0].cpu().numpy(),
        'mem_slots': None if memory is None else int(memory.shape[0]),
        'offsets': offsets, 'prior_scale': s, 'prior_source': prior_source, 'index_source': index_source,
        'colour_source': colours.source, 'stage': stage,
    }


# ---------------------------------------------------------------------------------------------- figure
GAP, TITLE_H, PANEL_MIN, PANEL_MAX, COLUMNS = 4, 18, 192, 512, 4


def figure_layout(h, w):
    """``(fig_h, fig_w, (ph, pw), [(y, x) of each panel's image])`` for an ``h x w`` image: 8 panels in two rows
    (input, output, prior, memory index; FM-MSA offsets of levels 1-4), each under a title bar, the image's long
    side scaled to between ``PANEL_MIN`` and ``PANEL_MAX`` pixels."""
    long = max(h, w)
    target = min(max(long, PANEL_MIN), PANEL_MAX)
    ph, pw = max(1, round(h * target / long)), max(1, round(w * target / long))
    origins = [(GAP + r * (TITLE_H + ph + GAP) + TITLE_H, GAP + c * (pw + GAP)) for r in range(2)
               for c in range(COLUMNS)]
    return GAP + 2 * (TITLE_H + ph + GAP), GAP + COLUMNS * (pw + GAP), (ph, pw), origins


def _expand(a, f, h, w):
    """A map at 1/f of the image, each value repeated over its f x f pixels, cropped to ``h x w``."""
    return np.repeat(np.repeat(a, f, axis=0), f, axis=1)[:h, :w]


def _index_palette(n):
    """``n`` distinct RGB colours for memory indices (hues a golden angle apart), ``[n, 3]`` float in [0, 1]."""
    hsv = np.stack([(np.arange(n) * 0.618034 % 1) * 179, np.full(n, 170), np.full(n, 235)], 1)
    return cv2.cvtColor(hsv[None].astype(np.uint8), cv2.COLOR_HSV2RGB)[0] / 255.0


def _panel(rgb, size):
    """``rgb`` resized to ``size``: averaged when shrinking, each pixel repeated (nearest pixel centre) when not."""
    h, w = rgb.shape[:2]
    if h > size[0]:
        return cv2.resize(np.ascontiguousarray(rgb, dtype=np.float32), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    rows = ((np.arange(size[0]) + 0.5) * h / size[0]).astype(int)
    cols = ((np.arange(size[1]) + 0.5) * w / size[1]).astype(int)
    return rgb[rows][:, cols]


def explain_figure(result):
    """The figure of an :func:`explain_image` result: an ``HxWx3`` uint8 RGB array laid out by
    :func:`figure_layout`. The offset panels share one colour scale (viridis, 0 to the largest offset)."""
    h, w = result['input'].shape[:2]
    fig_h, fig_w, size, origins = figure_layout(h, w)
    fig = np.full((fig_h, fig_w, 3), 255, np.uint8)
    s = result['prior_scale']
    panels = [('input', result['input']), ('output', result['output']),
              ('prior (PCA colour)', _expand(result['prior_rgb'], s, h, w))]
    index = result['memory_index']
    if index is None:
        panels.append(('memory index: no TPE', None))
    else:
        used = len(np.unique(index))
        panels.append((f'memory index {used}/{result["mem_slots"]} used',
                       _expand(_index_palette(result['mem_slots'])[index], s, h, w)))
    offsets = result['offsets']
    top = max([float(m.max()) for m in offsets.values()] + [1e-12])
    for level in range(1, 5):
        m = offsets.get(level)
        if m is None:
            panels.append((f'L{level}: no FM-MSA filter', None))
            continue
        colour = cv2.applyColorMap(np.uint8(np.clip(m / top, 0, 1) * 255), cv2.COLORMAP_VIRIDIS)
        f = 2 ** (level - 1)
        panels.append((f'L{level} offset max {m.max():.2f}px', _expand(colour[..., ::-1] / 255.0, f, h, w)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for (title, img), (y, x) in zip(panels, origins):
        if img is None:
            fig[y:y + size[0], x:x + size[1]] = 200
        else:
            fig[y:y + size[0], x:x + size[1]] = np.rint(np.clip(_panel(img, size), 0, 1) * 255).astype(np.uint8)
        width = cv2.getTextSize(title, font, 0.4, 1)[0][0]
        scale = 0.4 * min(1.0, (size[1] - 2) / max(width, 1))
        cv2.putText(fig, title, (x + 1, y - 5), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return fig


# ---------------------------------------------------------------------------------------------- checkpoints
def tpe_from_checkpoint(path, opt=None):
    """The ``TexturePriorEncoder`` of checkpoint ``path``: built from ``opt``'s ``network_tpe`` when given,
    else from the options stored in the file."""
    ckpt = read_checkpoint(path, '--tpe')
    source, block = path, None
    if opt is not None:
        source = find_options_file(os.fspath(opt), '--opt')
        block = load_options_file(source).get('network_tpe')
    if block is None:
        block = network_options(ckpt, path)
    if block is None:
        raise UserError(f'--tpe: {path} carries no network options: pass the --opt whose network_tpe built it')
    net = build_network_block(source, 'network_tpe', block)
    if not isinstance(net, TexturePriorEncoder):
        raise UserError(f'--tpe: {path} holds a {type(net).__name__}, not a TexturePriorEncoder')
    load_network_file(net, path, '--tpe', ckpt=ckpt, hint='pass the --opt (network_tpe) it was trained with')
    return net
