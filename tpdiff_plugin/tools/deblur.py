"""``tpdiff deblur -i PATH... -o OUT --weights W.pth``: deblur images of any size with a trained TP-Diff.

Inputs (``-i``, one or more): image files, folders (their image files, not recursive) or glob patterns
(quoted, e.g. ``-i 'shots/*.png'``). Output (``-o``): a folder, created if needed, where each result keeps
its input's file name; or, for a single input file, a file name with an image extension. Results keep
the input's format and bit depth (16-bit PNG/TIFF in, 16-bit out; processed in float32), gray images
stay gray and an alpha channel is copied through. Each file is written atomically (temporary file, rename).

The network is the one the checkpoint says it holds: the plugin stores the ``network_g`` block next to the
weights of every checkpoint it saves. ``--opt`` (the ``network_g`` block of a basicsr options file, e.g.
the training options) wins when given, and is needed for a checkpoint without stored options (older ones,
or not saved by the plugin), for which the default is the paper-size ``TPDiffNet``. The weights are
``params_ema`` if the checkpoint has them, else ``params`` (``torch.load(weights_only=True)``).
Images are processed in overlapping tiles (``--tile-overlap 32``; ``--tile`` 384 px on the CPU, where a 3840x2160
photo then peaks under 4 GiB, and 512 px on a GPU; ``--tile 0`` for whole images), with the DM's initial noise
drawn once per image from ``--seed`` and cropped per tile (see ``tpdiff_plugin.inference``), so memory is bounded
by the tile and the result does not depend on the tiling beyond the blend.

Errors: bad options (missing weights, a checkpoint of another architecture, ``--tile <= 2 x overlap``,
an output that would overwrite an input) stop before any work with one line. A file that cannot be
read or decoded is reported and skipped; the others are still processed, a summary lists the failures
and the exit code is 1.
"""
import glob
import io
import os

import cv2
import numpy as np
import torch
from tqdm import tqdm

from tpdiff_plugin.data.image_checks import IMAGE_EXTENSIONS, MAX_PIXELS, check_declared_size
from tpdiff_plugin.inference import (Deblurrer, add_checkpoint_arguments, check_tiling, image_to_tensor,
                                     resolve_device, tensor_to_image)
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.precision import HALF_CHOICES

COMMAND = 'deblur'
# Per device type. CPU: one 384 px tile of the paper-size net peaks at 2.4 GiB RSS against 3.3 GiB at 512, for
# about 5 % more time per megapixel (bench/README.md, issue 10), so a 4K photo fits the 4 GiB target.
DEFAULT_TILE = {'cpu': 384, 'cuda': 512}
HELP = 'Deblur images (files, folders or globs) of any size with a trained TP-Diff checkpoint, tiled.'
GLOB_CHARS = '*?['
DEFAULT_MAX_MEGAPIXELS = MAX_PIXELS / 1e6  # 150 MP, the dataset limit: 1.8 GB as the float32 RGB input of tiling


def add_arguments(parser):
    parser.add_argument('-i', '--input', nargs='+', required=True, metavar='PATH',
                        help='image files, folders (not recursive) or quoted glob patterns')
    parser.add_argument('-o', '--output', required=True, metavar='OUT',
                        help='output folder (created); or an image file name for a single input file')
    add_checkpoint_arguments(parser)
    parser.add_argument('--tile', type=int, default=None,
                        help='tile size in pixels, rounded down to the network size multiple; 0: whole images '
                             f'(default {DEFAULT_TILE["cpu"]} on the CPU, {DEFAULT_TILE["cuda"]} on a GPU)')
    parser.add_argument('--tile-overlap', type=int, default=32, help='overlap of neighbouring tiles (default 32)')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                        help='default: cuda when available, else cpu')
    parser.add_argument('--half', action='store_true',
                        help='autocast in reduced precision, weights fp32: bf16 (fp16 on a GPU without bf16)')
    parser.add_argument('--half-dtype', choices=HALF_CHOICES, default=None,
                        help='the reduced precision (implies --half; default bf16)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the DM initial noise (default 0)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    parser.add_argument('--max-megapixels', type=float, default=DEFAULT_MAX_MEGAPIXELS,
                        help='refuse images whose header declares more pixels than this, before decoding '
                             f'(default {DEFAULT_MAX_MEGAPIXELS:g}: a 3840x2160 photo is 8.3)')


def _is_image(path):
    return path.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(path).startswith('.')


def collect_inputs(patterns):
    """Expand ``-i`` values to a sorted-per-value, de-duplicated list of image files."""
    files, seen = [], set()
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if _is_image(f) and os.path.isfile(os.path.join(pattern, f)))
            if not found:
                raise UserError(f'-i: no image files ({", ".join(IMAGE_EXTENSIONS)}) in folder {pattern}')
        elif os.path.isfile(pattern):
            found = [pattern]
        elif any(ch in pattern for ch in GLOB_CHARS):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p) and _is_image(p))
            if not found:
                raise UserError(f'-i: the pattern {pattern!r} matches no image files')
        else:
            raise UserError(f'-i: no such file or folder: {pattern}')
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def plan_outputs(inputs, output, single_file_arg):
    """``[(input, output path)]``; refuses name clashes and outputs that would overwrite an input."""
    if single_file_arg and len(inputs) == 1 and _is_image(output) and not os.path.isdir(output):
        pairs = [(inputs[0], output)]
    else:
        if os.path.exists(output) and not os.path.isdir(output):
            raise UserError(f'-o: {output} exists and is not a folder; give a folder for several inputs')
        pairs = [(p, os.path.join(output, os.path.basename(p))) for p in inputs]
        names = {}
        for src, dst in pairs:
            if dst in names:
                raise UserError(f'-o: {names[dst]} and {src} would both be written to {dst}; '
                                'deblur them into different folders')
            names[dst] = src
    in_real = {os.path.realpath(p): p for p in inputs}
    for src, dst in pairs:
        if os.path.realpath(dst) in in_real:
            raise UserError(f'-o: writing {dst} would overwrite the input {in_real[os.path.realpath(dst)]}; '
                            'choose another output folder')
        if os.path.splitext(dst)[1].lower() not in IMAGE_EXTENSIONS:
            raise UserError(f'-o: {dst} has no image extension ({", ".join(IMAGE_EXTENSIONS)})')
    return pairs


def read_image(path, max_pixels=MAX_PIXELS):
    """Decode ``path`` (any bit depth OpenCV reads) to an RGB(A) / gray array; raises ValueError with a reason.

    An image whose header declares more than ``max_pixels`` is refused before it is decoded."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ValueError(f'cannot read ({e.strerror})') from None
    if data.size == 0:
        raise ValueError('empty file')
    check_declared_size(io.BytesIO(data), max_pixels)  # the bytes already read, header only
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # OpenCV's own size limit, or a header it rejects
        raise ValueError(f'cannot decode this image ({str(e).strip().splitlines()[-1]})') from None
    if img is None:
        raise ValueError('cannot decode this image (corrupt or unsupported format)')
    if img.dtype not in (np.uint8, np.uint16):
        raise ValueError(f'unsupported pixel type {img.dtype}; only 8-bit and 16-bit images are accepted')
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    elif img.ndim == 3 and img.shape[2] == 2:  # gray + alpha: process the gray, keep the alpha
        img = np.dstack([img[..., 0]] * 3 + [img[..., 1]])
    elif not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1)):
        raise ValueError(f'unsupported image shape {tuple(img.shape)}')
    return img


def write_image(path, img):
    """Write an RGB(A) / gray array to ``path`` via a temporary file in the same folder, then rename."""
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    folder, name = os.path.split(os.path.abspath(path))
    ext = os.path.splitext(name)[1]
    tmp = os.path.join(folder, f'.{name}.tmp{os.getpid()}{ext}')
    try:
        ok, buf = cv2.imencode(ext, img)
        if not ok:
            raise ValueError(f'cannot encode as {ext}')
        buf.tofile(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run(args):
    if args.tile is None:
        args.tile = DEFAULT_TILE[resolve_device(args.device).type]
    tile = args.tile if args.tile else None
    inputs = collect_inputs(args.input)
    single = len(args.input) == 1 and os.path.isfile(args.input[0])
    pairs = plan_outputs(inputs, args.output, single)
    if not os.path.isfile(args.weights):
        raise UserError(f'--weights: no such checkpoint file: {args.weights}')
    if args.tile < 0:
        raise UserError(f'--tile: expected a positive number of pixels or 0 (no tiling), got {args.tile}')
    check_tiling(tile, args.tile_overlap)  # the cheap checks first, before building the network
    deblurrer = Deblurrer.from_checkpoint(args.weights, opt=args.opt, device=args.device, tile=tile,
                                          tile_overlap=args.tile_overlap, half=args.half_dtype or args.half,
                                          seed=args.seed, param_key=args.param_key)
    failures = []
    bar = tqdm(pairs, unit='img', disable=args.quiet or len(pairs) < 2, desc='deblur')
    for src, dst in bar:
        try:
            img = read_image(src, max_pixels=args.max_megapixels * 1e6)
        except ValueError as e:
            failures.append((src, str(e)))
            continue
        x, info = image_to_tensor(img)
        tiles = None
        if len(pairs) == 1 and not args.quiet and deblurrer.tile is not None:
            tiles = tqdm(unit='tile', desc='deblur')

            def progress(done, total, bar=tiles):
                bar.total = total
                bar.n = done
                bar.refresh()
        y = deblurrer(x, progress=None if tiles is None else progress)
        if tiles is not None:
            tiles.close()
        if not torch.isfinite(y).all():
            failures.append((src, 'the network produced NaN/Inf values; nothing written'))
            continue
        out = tensor_to_image(y, info)
        try:
            os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
            write_image(dst, out)
        except (OSError, ValueError) as e:
            failures.append((src, f'cannot write {dst}: {getattr(e, "strerror", None) or e}'))
    done = len(pairs) - len(failures)
    where = args.output
    print(f'deblurred {done} of {len(pairs)} image(s) into {where} '
          f'(device {deblurrer.device}, tile {deblurrer.tile or "off"}, seed {args.seed})')
    if failures:
        print(f'{len(failures)} image(s) failed:')
        for src, reason in failures:
            print(f'  {src}: {reason}')
        return 1
    return 0
