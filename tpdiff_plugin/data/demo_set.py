"""The embedded demo set (``tpdiff make-demo``), built offline from the photos scikit-image ships.

TP-Diff trains on unpaired blurry and sharp images; :func:`build_demo` makes a small such set with no
download, so the demo options and the tests run anywhere. Blur is synthetic camera shake
(:mod:`tpdiff_plugin.data.blur_kernels`): a random kernel of 7 to 25 pixels per blurry image, then
light Gaussian noise (sigma 1 to 2 / 255), rounded to 8 bits.

Output (fixed names; the demo options and the Makefile point at them), default ``datasets_lmdb/demo``:

- ``train_blur.lmdb``: 128 px tiles, blurred (unpaired with the next).
- ``train_sharp.lmdb``: other 128 px tiles, sharp. Which tiles go where is ``--domains``:
  - ``matched`` (default): both sets come from the same five photos (``MATCHED_PHOTOS``), alternate tiles
    of each photo's grid (a checkerboard: blurry where row + column is even). The sets share no pixel,
    but their colours and content are alike, so only blur tells them apart. With photo groups instead,
    a discriminator separates the sets by palette first, and the unpaired GAN learned a colour cast
    (docs/training-quality.md). motorcycle_right, the stereo twin of motorcycle_left, is left out: its
    tiles would nearly pair with the other set's.
  - ``split`` (the first demo set, kept for comparison): the photos of group A blurred, those of group B
    sharp, no photo in both.
  - ``--photos DIR`` adds the photos of a folder to the matched pool (a larger training set, e.g. desktop
    wallpaper photos from Debian's ``mate-backgrounds``), each scaled down to a longer side of at most
    ``MAX_SIDE`` px, so their blur is at the scale of the demo's. Keys are ``<file stem>-y<top>x<left>``.
- ``train_blur_gt.lmdb``: the sharp originals of the blurry training tiles (same keys). Unpaired
  training never reads it; it is there for the supervised ceiling of ``bench/quality.py`` (the same
  network trained on the paired version of the same tiles).
- ``val_blur.lmdb`` + ``val_sharp.lmdb``: 4 pairs of 128 x 128 (the same keys), from photos used by
  neither training set; also as PNGs in ``val/blur/`` and ``val/sharp/``, with their blur kernels
  (float64 ``.npy``, in the orientation of a convolution) in ``val/kernels/``.
- ``real/clock_motion.png``: scikit-image's photo of a wall clock taken with a moving camera (real motion
  blur, grayscale, no ground truth), the qualitative sample of the demo report.
- ``info.json`` (seed, per-image source box, kernel size, noise sigma) and ``README.txt``.

Keys are ``<photo>-y<top>x<left>``. Tiles with almost no texture (flat sky) are skipped. The build is
seeded (``--seed``) and reproducible bit for bit. It is written to a hidden temporary folder beside the
output and renamed into place; an existing output is refused unless ``--force``, which replaces it.
"""
import json
import os
import re
import shutil

import cv2
import numpy as np
import skimage.data

from tpdiff_plugin.data.blur_kernels import random_shake_kernel
from tpdiff_plugin.data.image_checks import IMAGE_EXTENSIONS
from tpdiff_plugin.data.lmdb_writer import write_lmdb
from tpdiff_plugin.utils.errors import UserError

DEFAULT_OUTPUT = os.path.join('datasets_lmdb', 'demo')
TILE = 128
KERNEL_SIZES = tuple(range(7, 26, 2))  # odd sizes, so the kernel's centre is a pixel
NOISE_SIGMA = (1.0, 2.0)  # in 1/255 units
MAX_SIDE = 800  # photos larger than this are halved first (closer to the others' scale)
MIN_TEXTURE = 0.01  # tiles whose mean |luminance gradient| (in [0, 1] units) is below this are skipped
BLUR_PHOTOS = ('astronaut', 'rocket', 'hubble_deep_field')  # split: group A, blurry training tiles
SHARP_PHOTOS = ('motorcycle_left', 'motorcycle_right', 'immunohistochemistry')  # split: group B, sharp tiles
MATCHED_PHOTOS = ('astronaut', 'rocket', 'hubble_deep_field', 'motorcycle_left', 'immunohistochemistry')
DOMAINS = ('matched', 'split')
VAL_CROPS = (('chelsea', 50, 110), ('chelsea', 150, 190), ('coffee', 20, 200), ('coffee', 200, 310))
# Not used: retina (smooth, mostly flat: little to deblur) and the grayscale photos (the sets would
# differ in colour, which an unpaired discriminator could learn instead of blur).


def load_photo(name):
    """An RGB uint8 photo from ``skimage.data`` (offline), halved if larger than ``MAX_SIDE``."""
    if name.startswith('motorcycle_'):
        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name == 'motorcycle_left' else right
    else:
        img = getattr(skimage.data, name)()
    if max(img.shape[:2]) > MAX_SIDE:
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return img


def texture(tile_rgb):
    """Mean absolute horizontal + vertical luminance gradient of a tile, in [0, 1] units."""
    g = tile_rgb.astype(np.float64).mean(axis=2) / 255.
    return (np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()) / 2


def tile_boxes(img, tile=TILE):
    """Top-left corners of a centred grid of non-overlapping ``tile`` squares covering ``img``."""
    h, w = img.shape[:2]
    rows, cols = h // tile, w // tile
    top0, left0 = (h - rows * tile) // 2, (w - cols * tile) // 2
    return [(top0 + r * tile, left0 + c * tile) for r in range(rows) for c in range(cols)]


def blur_crop(img, top, left, size, kernel, noise_sigma, rng):
    """Blur ``img`` with ``kernel`` and return the ``size`` crop at ``(top, left)``, with noise, as uint8.

    ``noise_sigma`` is in 0-255 units.

    The convolution sees the photo around the crop (reflected at the photo's border), so the crop has
    no artificial border; the kernel's centre of mass is its centre, so the crop stays aligned with the
    sharp crop at the same box.
    """
    r = kernel.shape[0] // 2
    padded = cv2.copyMakeBorder(img, r, r, r, r, cv2.BORDER_REFLECT_101)
    region = padded[top:top + size + 2 * r, left:left + size + 2 * r].astype(np.float32)
    # filter2D correlates; flipping the kernel makes it a convolution.
    blurred = cv2.filter2D(region, -1, np.ascontiguousarray(kernel[::-1, ::-1]).astype(np.float32),
                           borderType=cv2.BORDER_REFLECT_101)[r:r + size, r:r + size]
    noisy = blurred + rng.standard_normal(blurred.shape).astype(np.float32) * noise_sigma  # 0-255 units
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _blurry(img, photo, top, left, rng):
    size = int(rng.choice(KERNEL_SIZES))
    kernel = random_shake_kernel(size, rng)
    sigma = float(rng.uniform(*NOISE_SIGMA))
    out = blur_crop(img, top, left, TILE, kernel, sigma, rng)
    return out, kernel, {'source': photo, 'box': [top, left, TILE, TILE], 'kernel_size': size,
                         'noise_sigma_255': round(sigma, 4)}


def _key(photo, top, left):
    return f'{photo}-y{top:04d}x{left:04d}'


def load_folder_photos(folder):
    """``{name: RGB uint8 image}`` of the images in ``folder`` (sorted, not recursive), each scaled down to a
    longer side of at most ``MAX_SIDE``; names are the file stems with other characters than letters and
    digits replaced by ``_``. Unreadable, non-colour or too small files are a UserError naming them."""
    if not os.path.isdir(folder):
        raise UserError(f'--photos: no such folder: {folder}')
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise UserError(f'--photos: no images in {folder}')
    photos = {}
    for f in files:
        path = os.path.join(folder, f)
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise UserError(f'--photos: {path}: not a readable image')
        scale = MAX_SIDE / max(img.shape[:2])
        if scale < 1:
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        if min(img.shape[:2]) < TILE:
            raise UserError(f'--photos: {path} is smaller than one {TILE} px tile')
        name = re.sub(r'[^A-Za-z0-9]', '_', os.path.splitext(f)[0])
        if name in photos or name in MATCHED_PHOTOS:
            raise UserError(f'--photos: two photos are named {name!r} once cleaned up ({f}); rename one')
        photos[name] = img[:, :, ::-1].copy()
    return photos


def training_tiles(domains, extra_photos=None):
    """``(blurry, sharp)``: lists of ``(photo, top, left)`` training tiles for ``domains`` (see the module
    docstring), in a fixed order, and ``{photo: RGB image}``. Tiles with too little texture are skipped.
    ``extra_photos`` join the matched pool (``build_demo`` refuses them with ``split`` before loading them)."""
    if domains not in DOMAINS:
        raise UserError(f'--domains: must be one of {", ".join(DOMAINS)}, got {domains!r}')
    blurry, sharp = [], []
    names = MATCHED_PHOTOS if domains == 'matched' else BLUR_PHOTOS + SHARP_PHOTOS
    photos = {name: load_photo(name) for name in names}
    photos.update(extra_photos or {})
    for photo, img in photos.items():
        boxes = tile_boxes(img)
        for top, left in boxes:
            if texture(img[top:top + TILE, left:left + TILE]) < MIN_TEXTURE:
                continue
            if domains == 'matched':
                row, col = (top - boxes[0][0]) // TILE, (left - boxes[0][1]) // TILE
                to_blur = (row + col) % 2 == 0
            else:
                to_blur = photo in BLUR_PHOTOS
            (blurry if to_blur else sharp).append((photo, top, left))
    return blurry, sharp, photos


def build_demo(output=DEFAULT_OUTPUT, seed=0, force=False, quiet=True, domains='matched', photos_dir=None):
    """Build the demo set into ``output`` (see the module docstring). Returns the info dict written."""
    output = os.path.normpath(output)
    if os.path.lexists(output):
        if not force:
            raise UserError(f'--output: {output} already exists; pass --force to replace it, or choose another '
                            '--output')
        if not os.path.isdir(output) or os.path.islink(output):
            raise UserError(f'--output: {output} exists and is not a folder; refusing to replace it')
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f'.{os.path.basename(output)}.partial-{os.getpid()}')
    old = os.path.join(parent, f'.{os.path.basename(output)}.old-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    if photos_dir and domains != 'matched':
        raise UserError('--photos: extra photos join the matched pool; use --domains matched')
    extra = load_folder_photos(photos_dir) if photos_dir else None
    blur_tiles, sharp_tiles, photos = training_tiles(domains, extra)
    rng = np.random.default_rng(seed)
    val_rng = np.random.default_rng([seed, 1])  # its own stream: the same val set whatever --domains draws
    info = {'seed': seed, 'tile': TILE, 'kernel_sizes': list(KERNEL_SIZES), 'noise_sigma_255': list(NOISE_SIGMA),
            'domains': domains, 'photos_dir': photos_dir, 'blur_photos': sorted({p for p, _, _ in blur_tiles}),
            'sharp_photos': sorted({p for p, _, _ in sharp_tiles}),
            'val_photos': sorted({p for p, _, _ in VAL_CROPS}), 'min_texture': MIN_TEXTURE,
            'source': 'skimage.data (scikit-image, offline)', 'images': {}}
    try:
        staging = os.path.join(tmp, '_staging')
        sets = {name: [] for name in ('train_blur', 'train_sharp', 'train_blur_gt', 'val_blur', 'val_sharp')}

        def save(folder, key, img_rgb):
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f'{key}.png')
            if not cv2.imwrite(path, np.ascontiguousarray(img_rgb[:, :, ::-1])):
                raise UserError(f'{path}: cannot write')
            return path

        for photo, top, left in blur_tiles:
            key = _key(photo, top, left)
            img = photos[photo]
            out, _, meta = _blurry(img, photo, top, left, rng)
            sets['train_blur'].append((key, save(os.path.join(staging, 'train_blur'), key, out)))
            sets['train_blur_gt'].append((key, save(os.path.join(staging, 'train_blur_gt'), key,
                                                    img[top:top + TILE, left:left + TILE])))
            info['images'][f'train_blur/{key}'] = meta
        for photo, top, left in sharp_tiles:
            key = _key(photo, top, left)
            tile = photos[photo][top:top + TILE, left:left + TILE]
            sets['train_sharp'].append((key, save(os.path.join(staging, 'train_sharp'), key, tile)))
            info['images'][f'train_sharp/{key}'] = {'source': photo, 'box': [top, left, TILE, TILE]}
        for photo, top, left in VAL_CROPS:
            img = load_photo(photo)
            key = _key(photo, top, left)
            out, kernel, meta = _blurry(img, photo, top, left, val_rng)
            os.makedirs(os.path.join(tmp, 'val', 'kernels'), exist_ok=True)
            np.save(os.path.join(tmp, 'val', 'kernels', f'{key}.npy'), kernel)
            sets['val_blur'].append((key, save(os.path.join(tmp, 'val', 'blur'), key, out)))
            sets['val_sharp'].append((key, save(os.path.join(tmp, 'val', 'sharp'), key,
                                                img[top:top + TILE, left:left + TILE])))
            info['images'][f'val/{key}'] = meta

        save(os.path.join(tmp, 'real'), 'clock_motion', np.repeat(skimage.data.clock()[:, :, None], 3, axis=2))

        for name, items in sets.items():
            write_lmdb(os.path.join(tmp, f'{name}.lmdb'), items, compress_level=1, quiet=quiet)
            info[f'n_{name}'] = len(items)
        shutil.rmtree(staging)
        with open(os.path.join(tmp, 'info.json'), 'w', encoding='utf-8') as f:
            json.dump(info, f, indent=1, sort_keys=True)
        with open(os.path.join(tmp, 'README.txt'), 'w', encoding='utf-8') as f:
            f.write(_readme(info))

        if os.path.lexists(output):  # --force: swap the old folder out, the new one in, then delete the old
            os.rename(output, old)
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return info


def _readme(info):
    return (
        'tpdiff-plugin demo set, built by `tpdiff make-demo` (see datasets_lmdb/README.md).\n\n'
        f'Photos from {info["source"]}. Seed {info["seed"]}.\n'
        f'train_blur.lmdb  ({info["n_train_blur"]} tiles of {info["tile"]} px): blurred tiles of '
        f'{", ".join(info["blur_photos"])}.\n'
        f'train_sharp.lmdb ({info["n_train_sharp"]} tiles): sharp tiles of {", ".join(info["sharp_photos"])}.\n'
        + ('  Alternate tiles of the same photos (--domains matched): the sets share no pixel, they are unpaired.\n'
           if info['domains'] == 'matched' else '  The two training sets share no photo: they are unpaired.\n') +
        'train_blur_gt.lmdb: the sharp originals of train_blur (same keys), for the supervised ceiling only;\n'
        '  unpaired training never reads it.\n'
        f'val_blur.lmdb / val_sharp.lmdb ({info["n_val_blur"]} pairs, same keys; PNGs in val/blur, val/sharp): '
        f'crops of {", ".join(info["val_photos"])}, not used for training.\n'
        f'Blur: random camera-shake kernels (random-walk trajectories), sizes {info["kernel_sizes"][0]}-'
        f'{info["kernel_sizes"][-1]} px, one per image, then Gaussian noise with sigma '
        f'{info["noise_sigma_255"][0]}-{info["noise_sigma_255"][1]}/255, 8-bit.\n'
        'Per-image source box, kernel size and noise level: info.json. Val kernels: val/kernels/*.npy.\n'
        'real/clock_motion.png: a real motion-blurred photo from scikit-image (no ground truth).\n')
