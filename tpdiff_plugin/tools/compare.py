"""``tpdiff compare -opt compare.yml``: several restorers on one paired test set, side by side.

Each restorer is an ARCH_REGISTRY ``network`` block (TP-Diff, a spandrel peer such as ``PeerNAFNet`` or
``PeerRestormer`` from ``archs/peers_arch.py``, or any basicsr network) with optional weights. A restorer
with ``weights`` saved by the plugin needs no ``network``: the checkpoint carries its network options (a
``network`` given still wins). All of them
run on the same pairs, one after another, and the tool prints and writes (``<output_dir>/compare.csv``)
one row per restorer, after a row for the blurry input itself:

- ``params`` and ``GMACs`` (mmengine ``FlopAnalyzer`` through ``utils.measure.count_macs``, for one image of
  ``macs_size``; TP-Diff's count includes all T DM steps; ops mmengine cannot count are left out);
- ``s/MP``: wall-clock seconds per megapixel over the set, after one untimed warm-up image;
- ``peak MiB``: the peak memory the restorer added while running the set (``utils.measure.PeakMemory``:
  CUDA's max allocated, or on CPU the process's resident-set high-water mark; approximate);
- ``PSNR`` / ``SSIM`` on 8-bit RGB (outputs clipped and rounded as basicsr's ``tensor2img`` does), under
  ``metrics.protocol``: ``gopro`` (default; basicsr's metrics, ``crop_border: 0``, as GoPro and HIDE) or
  ``realblur`` (RealBlur's alignment-aware evaluation, ``align_motion: homography`` or ``translation``);
  see ``utils/image_metrics.py``.

Peers are padded to their size multiple and cropped back by their adapters (``PeerAdapter``), TP-Diff pads
itself; any other network can be given ``size_multiple: N`` in its restorer entry. A restorer entry may
also set ``tile``/``tile_overlap`` (tiled inference as ``tpdiff deblur``) and ``half`` (true or bf16, fp16: autocast
as ``tpdiff deblur --half``), and TP-Diff uses the top-level
``seed`` for its DM noise.

The side-by-side picture (``<output_dir>/compare.png``) shows, for the first ``crops.max_images`` pairs,
a ``crops.size`` crop (where the GT has the most gradient energy) of the input, each restorer and the
GT, labelled with the PSNR of the whole image.

Options file (see ``options/compare/demo.yml``)::

    name: compare_demo
    device: auto              # cpu | cuda | auto
    seed: 0
    output_dir: results/compare_demo
    dataset:                  # basicsr PairedImageDataset options (an LMDB pair or two folders)
      dataroot_gt: datasets_lmdb/demo/val_sharp.lmdb
      dataroot_lq: datasets_lmdb/demo/val_blur.lmdb
      io_backend: {type: lmdb}          # or {type: disk} for folders with the same file names
    metrics: {protocol: gopro}          # or {protocol: realblur, align_motion: homography}
    macs_size: 256x256                  # ~ to skip MACs
    crops: {size: 96, max_images: 4}
    restorers:
      <label>: {network: {type: ..., ...}, weights: ~, param_key: ~, tile: ~, size_multiple: ~}
      <label>: {weights: experiments/X/models/net_g_latest.pth}   # the network stored in the checkpoint
"""
import copy
import csv
import logging
import os
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from basicsr.utils import tensor2img
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY

from tpdiff_plugin.archs.arch_util import pad_to_multiple
from tpdiff_plugin.inference import Deblurrer, build_restorer, load_weights
from tpdiff_plugin.utils.checkpoint import network_options, read_checkpoint
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.image_metrics import ALIGN_MOTIONS, PROTOCOLS, psnr_ssim
from tpdiff_plugin.utils.measure import PeakMemory, count_macs, parse_size
from tpdiff_plugin.utils.option_files import find_options_file, load_options_file

COMMAND = 'compare'
HELP = 'Compare restorers (TP-Diff and peers) on one paired test set: params, MACs, speed, memory, PSNR/SSIM.'
CSV_COLUMNS = ('restorer', 'network', 'params', 'gmacs', 'macs_size', 'sec_per_mp', 'peak_mib', 'psnr', 'ssim',
               'images', 'weights')


def add_arguments(parser):
    parser.add_argument('-opt', required=True, metavar='COMPARE.yml', help='comparison options file')
    parser.add_argument('--device', default=None, choices=('auto', 'cpu', 'cuda'), help='overrides "device"')
    parser.add_argument('--output-dir', default=None, help='overrides "output_dir"')


# ---------------------------------------------------------------------------------------------- options
def load_compare_options(path):
    opt = load_options_file(find_options_file(path))
    for key in ('dataset', 'restorers'):
        if not isinstance(opt.get(key), dict) or not opt[key]:
            raise UserError(f'{path}: option "{key}" must be a non-empty mapping (see options/compare/demo.yml)')
    dataset = opt['dataset']
    for key in ('dataroot_gt', 'dataroot_lq'):
        value = dataset.get(key)
        if not isinstance(value, str):
            raise UserError(f'{path}: dataset.{key} is missing')
        if not os.path.exists(value):
            raise UserError(f'{path}: dataset.{key}: no such file or folder: {value} '
                            '(build the demo set with `tpdiff make-demo`)')
    metrics = opt.setdefault('metrics', {}) or {}
    opt['metrics'] = metrics
    protocol = metrics.setdefault('protocol', 'gopro')
    if protocol not in PROTOCOLS:
        raise UserError(f'{path}: metrics.protocol must be one of {", ".join(PROTOCOLS)}, got {protocol!r}')
    if metrics.setdefault('align_motion', 'homography') not in ALIGN_MOTIONS:
        raise UserError(f'{path}: metrics.align_motion must be homography or translation, '
                        f'got {metrics["align_motion"]!r}')
    opt['macs_size'] = parse_size(opt['macs_size']) if opt.get('macs_size') else None
    for label, entry in opt['restorers'].items():
        if isinstance(entry, dict) and isinstance(entry.get('network'), str):
            # `network: options/X.yml` takes that training file's network_g block, so the two cannot drift apart
            src = entry['network']
            src = find_options_file(src, f'{path}: restorers.{label}.network')  # a file or a packaged name
            entry['network'] = load_options_file(src).get('network_g')
            if not isinstance(entry['network'], dict):
                raise UserError(f'{path}: restorers.{label}.network: {src} has no network_g block')
        if isinstance(entry, dict) and entry.get('network') is None and isinstance(entry.get('weights'), str):
            entry['network'] = stored_network(path, label, entry['weights'])
        if not isinstance(entry, dict) or not isinstance(entry.get('network'), dict):
            raise UserError(f'{path}: restorers.{label} needs a "network" block (e.g. network: {{type: PeerNAFNet}}), '
                            'the path of a training options file whose network_g to use, or weights that carry '
                            'their network options')
        kind = entry['network'].get('type')
        if kind not in ARCH_REGISTRY:  # before anything runs
            raise UserError(f'{path}: restorers.{label}.network.type: no network named "{kind}" is registered '
                            '(check the spelling; peers are PeerRestormer, PeerNAFNet, PeerMPRNet, PeerFFTformer, '
                            'PeerUformer)')
        weights = entry.get('weights')
        if weights is not None and not os.path.isfile(weights):
            raise UserError(f'{path}: restorers.{label}.weights: no such checkpoint file: {weights}')
    return opt


def stored_network(path, label, weights):
    """The network options block stored in the checkpoint ``weights`` of restorer ``label``; a checkpoint
    without one (older, or not saved by the plugin) is a one-line UserError asking for ``network``."""
    where = f'{path}: restorers.{label}.weights'
    if not os.path.isfile(weights):
        raise UserError(f'{where}: no such checkpoint file: {weights}')
    block = network_options(read_checkpoint(weights, where), weights)
    if block is None:
        raise UserError(f'{where}: {weights} carries no network options (it predates stored options, or was not '
                        'saved by tpdiff-plugin); give the restorer a "network" block')
    return block


def build_dataset(path, dataset_opt):
    dopt = copy.deepcopy(dataset_opt)
    dopt.setdefault('type', 'PairedImageDataset')
    dopt.setdefault('name', 'compare')
    dopt.setdefault('io_backend', {'type': 'disk'})
    dopt['phase'] = 'val'
    dopt.setdefault('scale', 1)
    if dopt['type'] not in DATASET_REGISTRY:
        raise UserError(f'{path}: dataset.type: no dataset named {dopt["type"]!r} is registered')
    try:
        dataset = DATASET_REGISTRY.get(dopt['type'])(dopt)
    except (AssertionError, ValueError, KeyError, OSError) as e:
        raise UserError(f'{path}: cannot open the dataset ({type(e).__name__}: {e})') from None
    if len(dataset) == 0:
        raise UserError(f'{path}: the dataset has no pairs')
    return dataset


# ---------------------------------------------------------------------------------------------- crops
def crop_box(gt, size):
    """``(top, left, size)``: the ``size`` square of ``gt [1, 3, H, W]`` with the most gradient energy."""
    h, w = gt.shape[-2:]
    size = min(size, h, w)
    g = gt.mean(1, keepdim=True)
    energy = (g[..., 1:, :-1] - g[..., :-1, :-1]).abs() + (g[..., :-1, 1:] - g[..., :-1, :-1]).abs()
    k = max(1, size - 1)
    scores = F.avg_pool2d(energy, k, stride=max(1, size // 8))
    idx = int(scores.flatten().argmax())
    sw = scores.shape[-1]
    stride = max(1, size // 8)
    top, left = (idx // sw) * stride, (idx % sw) * stride
    return min(top, h - size), min(left, w - size), size


def _label(img, lines):
    """``img`` with a white strip above holding ``lines`` of text (each cut to the image width)."""
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.36
    strip = np.full((14 * len(lines) + 4, img.shape[1], 3), 255, np.uint8)
    for n, text in enumerate(lines):
        while text and cv2.getTextSize(text, font, scale, 1)[0][0] > img.shape[1] - 4:
            text = text[:-1]
        cv2.putText(strip, text, (2, 12 + 14 * n), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, img], axis=0)


def side_by_side(rows, path):
    """``rows``: per image, a list of ``([label lines], HxWx3 uint8 RGB crop)``; writes one PNG grid."""
    lines = []
    for row in rows:
        tiles = [_label(img, text) for text, img in row]
        gap = np.full((tiles[0].shape[0], 4, 3), 255, np.uint8)
        line = tiles[0]
        for t in tiles[1:]:
            line = np.concatenate([line, gap, t], axis=1)
        lines.append(line)
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0)), constant_values=255) for line in lines]
    cv2.imwrite(path, cv2.cvtColor(np.concatenate(lines, axis=0), cv2.COLOR_RGB2BGR))


# ---------------------------------------------------------------------------------------------- run
def _to_rgb8(x):
    return tensor2img(x, rgb2bgr=False)


def count_net_macs(net, size):
    """GMACs of ``net`` for one ``size`` image, with ``utils.measure.count_macs`` (None if it cannot be traced)."""
    try:
        total, _, _ = count_macs(net, (torch.randn(1, 3, *size),))
    except Exception:  # noqa: BLE001  (an untraceable network still gets the other columns)
        return None
    return total / 1e9


def run_restorer(label, entry, dataset, device, seed, protocol_opt, crop_boxes, source):
    """Run one restorer over ``dataset``; returns its CSV row and ``{index: crop}``."""
    net = build_restorer(entry['network'], source=source, key=f'restorers.{label}.network')
    params = sum(p.numel() for p in net.parameters())
    weights = entry.get('weights')
    if weights:
        load_weights(net, weights, entry.get('param_key'))
    try:
        deblur = Deblurrer(net, device=device, tile=entry.get('tile'), tile_overlap=entry.get('tile_overlap', 32),
                           half=entry.get('half', False), seed=seed)
    except UserError as e:
        raise UserError(f'{source}: restorers.{label}: {e}') from None
    multiple = int(entry.get('size_multiple') or 1)

    def restore(lq):
        h, w = lq.shape[-2:]
        return deblur(pad_to_multiple(lq, multiple))[..., :h, :w] if multiple > 1 else deblur(lq)

    def sync():
        if deblur.device.type == 'cuda':
            torch.cuda.synchronize(deblur.device)

    psnrs, ssims, crops = [], [], {}
    seconds, megapixels = 0.0, 0.0
    with PeakMemory(deblur.device) as peak:
        restore(dataset[0]['lq'][None])  # warm-up (untimed): allocator, kernels, first-call costs
        for i in range(len(dataset)):
            item = dataset[i]
            lq, gt = item['lq'][None], item['gt'][None]
            sync()
            t0 = time.perf_counter()
            out = restore(lq)
            sync()
            seconds += time.perf_counter() - t0
            megapixels += lq.shape[-2] * lq.shape[-1] / 1e6
            psnr, ssim = psnr_ssim(out, gt, **protocol_opt)
            psnrs.append(psnr)
            ssims.append(ssim)
            if i in crop_boxes:
                top, left, size = crop_boxes[i]
                crops[i] = ([label, f'{psnr:.2f} dB'], _to_rgb8(out[..., top:top + size, left:left + size]))
    row = {'restorer': label, 'network': entry['network']['type'], 'params': params,
           'sec_per_mp': seconds / megapixels, 'peak_mib': peak.mib,
           'psnr': sum(psnrs) / len(psnrs), 'ssim': sum(ssims) / len(ssims), 'images': len(psnrs),
           'weights': weights or 'random init'}
    return row, crops, net


def _fmt(value, spec):
    if value is None or value == '':
        return '-'
    if isinstance(value, float) and value != value:
        return 'n/a'
    return format(value, spec)


def print_table(rows, macs_size):
    macs_head = f'GMACs@{macs_size[0]}x{macs_size[1]}' if macs_size else 'GMACs'
    head = f'{"restorer":<26} {"network":<16} {"params":>10} {macs_head:>15} {"s/MP":>9} {"peak MiB":>9} ' \
           f'{"PSNR":>7} {"SSIM":>7}'
    print(head)
    print('-' * len(head))
    for r in rows:
        params = f'{r["params"] / 1e6:.3f}M' if r['params'] else '-'
        print(f'{r["restorer"][:26]:<26} {r["network"][:16]:<16} {params:>10} {_fmt(r.get("gmacs"), ".3f"):>15} '
              f'{_fmt(r.get("sec_per_mp"), ".3f"):>9} {_fmt(r.get("peak_mib"), ".1f"):>9} '
              f'{_fmt(r["psnr"], ".2f"):>7} {_fmt(r["ssim"], ".4f"):>7}')


def run(args):
    opt = load_compare_options(args.opt)
    logging.getLogger('basicsr').setLevel(logging.WARNING)
    device = args.device or opt.get('device') or 'auto'
    out_dir = args.output_dir or opt.get('output_dir') or os.path.join('results', str(opt.get('name', 'compare')))
    seed = int(opt.get('seed', 0))
    metrics = opt['metrics']
    protocol_opt = {'protocol': metrics['protocol'], 'crop_border': int(metrics.get('crop_border', 0)),
                    'align_motion': metrics['align_motion']}
    crops_opt = opt.get('crops') or {}
    crop_size, max_crops = int(crops_opt.get('size', 96)), int(crops_opt.get('max_images', 4))
    torch.manual_seed(seed)  # random-init restorers are reproducible

    dataset = build_dataset(args.opt, opt['dataset'])
    # the blurry input as the first row; crop boxes from the GT
    crop_boxes, grid = {}, {}
    psnrs, ssims = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        lq, gt = item['lq'][None], item['gt'][None]
        psnr, ssim = psnr_ssim(lq, gt, **protocol_opt)
        psnrs.append(psnr)
        ssims.append(ssim)
        if i < max_crops:
            top, left, size = crop_boxes[i] = crop_box(gt, crop_size)
            grid[i] = [(['input', f'{psnr:.2f} dB'], _to_rgb8(lq[..., top:top + size, left:left + size]))]
    rows = [{'restorer': 'input (blurry)', 'network': '-', 'params': 0, 'gmacs': None, 'macs_size': '',
             'sec_per_mp': None, 'peak_mib': None, 'psnr': sum(psnrs) / len(psnrs),
             'ssim': sum(ssims) / len(ssims), 'images': len(psnrs), 'weights': ''}]
    for label, entry in opt['restorers'].items():
        print(f'running {label} ({entry["network"]["type"]}) on {len(dataset)} pair(s)...', flush=True)
        row, crops, net = run_restorer(label, entry, dataset, device, seed, protocol_opt, crop_boxes, args.opt)
        row['gmacs'] = count_net_macs(net.cpu(), opt['macs_size']) if opt['macs_size'] else None
        row['macs_size'] = 'x'.join(map(str, opt['macs_size'])) if opt['macs_size'] else ''
        rows.append(row)
        for i, crop in crops.items():
            grid[i].append(crop)
        del net
    for i, (top, left, size) in crop_boxes.items():
        gt = dataset[i]['gt'][None]
        grid[i].append((['GT', dataset[i].get('gt_path', '')], _to_rgb8(gt[..., top:top + size, left:left + size])))

    print()
    print(f'{len(dataset)} pair(s), protocol {metrics["protocol"]}'
          + (f' (aligned: {metrics["align_motion"]})' if metrics['protocol'] == 'realblur' else ', RGB, crop_border '
             f'{protocol_opt["crop_border"]}') + f', device {device}')
    print_table(rows, opt['macs_size'])
    os.makedirs(out_dir, exist_ok=True)
    csv_path = os.path.join(out_dir, 'compare.csv')
    with open(csv_path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ('' if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    png_path = os.path.join(out_dir, 'compare.png')
    side_by_side([grid[i] for i in sorted(grid)], png_path)
    print(f'\nwrote {csv_path} and {png_path}')
    return 0
