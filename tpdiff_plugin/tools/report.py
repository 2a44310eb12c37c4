"""``tpdiff report``: input vs output PSNR/SSIM per validation image, and a blurry | deblurred | sharp grid.

Run after ``basicsr test -opt options/test/demo.yml``::

    tpdiff report --results results/TPDiff_Demo_Test \
        [--real datasets_lmdb/demo/real --weights <net_g.pth> [--opt options/demo/stage2.yml]]

It reads the blurry and sharp validation images (LMDB in basicsr layout, or a folder), finds each
one's deblurred result ``<results>/visualization/<dataset>/<key>_<suffix>.png`` (basicsr test's
naming), prints a table of input PSNR/SSIM (blurry vs sharp) against output PSNR/SSIM (deblurred vs
sharp) with basicsr's ``calculate_psnr`` / ``calculate_ssim`` (RGB, no border crop) and their mean, plus
the periodic-artifact measure of each output against its input (``utils.artifacts``: dB of spectral peaks
at 2- and 4-pixel periods added; about 0 means no checkerboard or grid), and writes a PNG grid, one row
per image: blurry | deblurred | sharp. With ``--real``, the images of that folder (real blur, no ground
truth: the demo set's ``real/clock_motion.png``) are deblurred with ``--weights`` through
:class:`tpdiff_plugin.inference.Deblurrer` and shown below the grid as blurry | deblurred. The network is
the one stored in the checkpoint; ``--opt`` wins when given (and is needed for a checkpoint saved without
its network options).
"""
import glob
import os
import sys

import cv2
import numpy as np
from basicsr.metrics import calculate_psnr, calculate_ssim

from tpdiff_plugin.data.image_sets import read_images
from tpdiff_plugin.inference import Deblurrer
from tpdiff_plugin.utils.artifacts import periodic_artifact_db
from tpdiff_plugin.utils.errors import UserError

COMMAND = 'report'
HELP = 'Demo report: input vs output PSNR/SSIM of a basicsr test run, and a blurry | deblurred | sharp grid.'
DEFAULT_BLUR = os.path.join('datasets_lmdb', 'demo', 'val_blur.lmdb')
DEFAULT_SHARP = os.path.join('datasets_lmdb', 'demo', 'val_sharp.lmdb')


def add_arguments(parser):
    parser.add_argument('--results', required=True, help='the test results folder, e.g. results/TPDiff_Demo_Test')
    parser.add_argument('--blur', default=DEFAULT_BLUR, help=f'blurry inputs, LMDB or folder (default {DEFAULT_BLUR})')
    parser.add_argument('--sharp', default=DEFAULT_SHARP, help=f'sharp references (default {DEFAULT_SHARP})')
    parser.add_argument('--out', default=None,
                        help='grid PNG to write (default: results/<results folder name>_grid.png beside --results)')
    parser.add_argument('--real', default=None, help='a folder of real blurry images without ground truth to add '
                        'to the grid (needs --weights), e.g. datasets_lmdb/demo/real')
    parser.add_argument('--weights', default=None, help='the checkpoint that deblurs --real')
    parser.add_argument('--opt', default=None, help='the options file whose network_g --weights holds (default: '
                        'the network options stored in the checkpoint)')


def find_result(results_dir, key):
    """The deblurred image basicsr test wrote for ``key``: ``visualization/<dataset>/<key>_<suffix>.png``.

    The suffix is the test's name (the results folder's name) unless ``val.suffix`` was set; the exact
    name is preferred, so that key ``cat`` never picks up ``cat_2_<name>.png``.
    """
    vis = os.path.join(glob.escape(os.path.normpath(results_dir)), 'visualization', '*')
    name = os.path.basename(os.path.normpath(results_dir))
    for pattern in (f'{glob.escape(key)}_{glob.escape(name)}.png', f'{glob.escape(key)}_*.png'):
        matches = sorted(glob.glob(os.path.join(vis, pattern)))
        if matches:
            return matches[0]
    return None


def collect(results_dir, blur_root, sharp_root):
    """Rows ``(key, blurry, deblurred, sharp)`` for every validation key with a result."""
    if not os.path.isdir(results_dir):
        raise UserError(f'--results: no such folder: {results_dir} (run `basicsr test -opt ...` first)')
    blurs, sharps = read_images(blur_root), read_images(sharp_root)
    missing_sharp = sorted(set(blurs) - set(sharps))
    if missing_sharp:
        raise UserError(f'--sharp {sharp_root}: no sharp image for key {missing_sharp[0]!r} of --blur {blur_root}')
    rows, missing = [], []
    for key in sorted(blurs):
        path = find_result(results_dir, key)
        if path is None:
            missing.append(key)
            continue
        out = cv2.imread(path, cv2.IMREAD_COLOR)
        if out is None:
            raise UserError(f'{path}: not a readable image')
        if out.shape != blurs[key].shape or sharps[key].shape != blurs[key].shape:
            raise UserError(f'{key}: sizes differ: blurry {blurs[key].shape}, deblurred {out.shape} ({path}), '
                            f'sharp {sharps[key].shape}')
        rows.append((key, blurs[key], out, sharps[key]))
    if not rows:
        raise UserError(f'{results_dir}: no result images for the keys of {blur_root} '
                        f'(expected visualization/<dataset>/<key>_<suffix>.png)')
    if missing:
        print(f'warning: no result for {len(missing)} key(s), e.g. {missing[0]!r}', file=sys.stderr)
    return rows


def metrics_table(rows):
    """``(per-image list of dicts, mean dict)`` of input/output PSNR and SSIM."""
    per_image = []
    for key, blur, out, sharp in rows:
        per_image.append({
            'key': key,
            'in_psnr': float(calculate_psnr(blur, sharp, crop_border=0)),
            'in_ssim': float(calculate_ssim(blur, sharp, crop_border=0)),
            'out_psnr': float(calculate_psnr(out, sharp, crop_border=0)),
            'out_ssim': float(calculate_ssim(out, sharp, crop_border=0)),
            'artifact_db': periodic_artifact_db(out, blur),
        })
    mean = {k: float(np.mean([r[k] for r in per_image]))
            for k in ('in_psnr', 'in_ssim', 'out_psnr', 'out_ssim', 'artifact_db')}
    return per_image, mean


def format_table(per_image, mean):
    width = max(len('mean'), max(len(r['key']) for r in per_image))
    head = (f'{"image":<{width}}  {"input PSNR":>10}  {"input SSIM":>10}  {"output PSNR":>11}  {"output SSIM":>11}'
            f'  {"artifact dB":>11}')
    lines = [head, '-' * len(head)]
    for r in per_image + [dict(mean, key='mean')]:
        if r['key'] == 'mean':
            lines.append('-' * len(head))
        lines.append(f'{r["key"]:<{width}}  {r["in_psnr"]:>10.2f}  {r["in_ssim"]:>10.4f}  '
                     f'{r["out_psnr"]:>11.2f}  {r["out_ssim"]:>11.4f}  {r["artifact_db"]:>+11.2f}')
    return '\n'.join(lines)


def make_grid(rows, gap=4, header=22, real_rows=()):
    """One row per image (blurry | deblurred | sharp) under a header naming the columns; BGR uint8.

    ``real_rows`` (``(name, blurry, deblurred)``, no ground truth) follow below, each under its own caption,
    as blurry | deblurred at their own size; the canvas is as wide as the widest part."""
    h = max(r[1].shape[0] for r in rows)
    w = max(r[1].shape[1] for r in rows)
    height = header + len(rows) * (h + gap)
    width = 3 * w + 2 * gap
    for _, blur, _ in real_rows:
        height += header + blur.shape[0] + gap
        width = max(width, 2 * blur.shape[1] + gap)
    grid = np.full((height, width, 3), 255, np.uint8)

    def caption(text, x, y):
        cv2.putText(grid, text, (x + 4, y - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)

    for col, label in enumerate(('blurry', 'deblurred', 'sharp')):
        caption(label, col * (w + gap), header)
    for i, (_, blur, out, sharp) in enumerate(rows):
        y = header + i * (h + gap)
        for col, img in enumerate((blur, out, sharp)):
            x = col * (w + gap)
            grid[y:y + img.shape[0], x:x + img.shape[1]] = img
    y = header + len(rows) * (h + gap)
    for name, blur, out in real_rows:
        caption(f'{name}: real blur, no ground truth (blurry | deblurred)', 0, y + header)
        y += header
        grid[y:y + blur.shape[0], :blur.shape[1]] = blur
        grid[y:y + out.shape[0], blur.shape[1] + gap:blur.shape[1] + gap + out.shape[1]] = out
        y += blur.shape[0] + gap
    return grid


def deblur_real(folder, weights, opt):
    """``[(name, blurry BGR, deblurred BGR)]`` for the images of ``folder``, deblurred with ``weights`` (the
    network of ``opt``, or None: the one stored in the checkpoint)."""
    images = read_images(folder)
    deblur = Deblurrer.from_checkpoint(weights, opt=opt, seed=0)
    return [(name, img, np.ascontiguousarray(deblur(np.ascontiguousarray(img[:, :, ::-1]))[:, :, ::-1]))
            for name, img in sorted(images.items())]


def run(args):
    if args.real and not args.weights:
        raise UserError('--real needs --weights (the checkpoint that deblurs those images)')
    rows = collect(args.results, args.blur, args.sharp)
    per_image, mean = metrics_table(rows)
    print(format_table(per_image, mean))
    real_rows = deblur_real(args.real, args.weights, args.opt) if args.real else ()
    for name, blur, out in real_rows:
        print(f'{name} (real blur, no ground truth): artifact {periodic_artifact_db(out, blur):+.2f} dB, '
              f'mean |output - input| {np.abs(out.astype(float) - blur).mean():.2f} grey levels')
    results = os.path.normpath(args.results)
    out = args.out or os.path.join(os.path.dirname(results) or '.', f'{os.path.basename(results)}_grid.png')
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not cv2.imwrite(out, make_grid(rows, real_rows=real_rows)):
        raise UserError(f'--out: cannot write {out}')
    print(f'grid (blurry | deblurred | sharp): {out}')
    return 0
