"""``tpdiff make-demo``: the embedded demo set, built offline from the photos scikit-image ships.

TP-Diff trains on unpaired blurry and sharp images; this tool makes a small such set with no download,
so the demo options and the tests run anywhere. Blur is synthetic camera shake
(:mod:`tpdiff_plugin.tools.blur_kernels`): a random kernel of 7 to 25 pixels per blurry image, then
light Gaussian noise (sigma 1 to 2 / 255), rounded to 8 bits.

Output (fixed names; the demo options and the Makefile point at them), default ``datasets_lmdb/demo``:

- ``train_blur.lmdb``: 128 px tiles of the photos of group A, blurred (unpaired with the next).
- ``train_sharp.lmdb``: 128 px tiles of the photos of group B, sharp. A and B share no photo
  (motorcycle_left and _right, a stereo pair of one scene, stay together in B).
- ``val_blur.lmdb`` + ``val_sharp.lmdb``: 4 pairs of 128 x 128 (the same keys), from photos used by
  neither training set; also as PNGs in ``val/blur/`` and ``val/sharp/``, with their blur kernels
  (float64 ``.npy``, in the orientation of a convolution) in ``val/kernels/``.
- ``info.json`` (seed, per-image source box, kernel size, noise sigma) and ``README.txt``.

Keys are ``<photo>-y<top>x<left>``. Tiles with almost no texture (flat sky) are skipped. The build is
seeded (``--seed``) and reproducible bit for bit. It is written to a hidden temporary folder beside the
output and renamed into place; an existing output is refused unless ``--force``, which replaces it.
"""
import json
import os
import shutil

from tpdiff_plugin.utils.errors import UserError

COMMAND = 'make-demo'
HELP = 'Build the embedded demo set (datasets_lmdb/demo) from scikit-image photos with synthetic camera shake.'
DEFAULT_OUTPUT = os.path.join('datasets_lmdb', 'demo')
TILE = 128
KERNEL_SIZES = tuple(range(7, 26, 2))  # odd sizes, so the kernel's centre is a pixel
NOISE_SIGMA = (1.0, 2.0)  # in 1/255 units
MAX_SIDE = 800  # photos larger than this are halved first (closer to the others' scale)
MIN_TEXTURE = 0.01  # tiles whose mean |luminance gradient| (in [0, 1] units) is below this are skipped
BLUR_PHOTOS = ('astronaut', 'rocket', 'hubble_deep_field')  # group A: blurry training tiles
SHARP_PHOTOS = ('motorcycle_left', 'motorcycle_right', 'immunohistochemistry')  # group B: sharp training tiles
VAL_CROPS = (('chelsea', 50, 110), ('chelsea', 150, 190), ('coffee', 20, 200), ('coffee', 200, 310))
# Not used: retina (smooth, mostly flat: little to deblur) and the grayscale photos (the sets would
# differ in colour, which an unpaired discriminator could learn instead of blur).


def add_arguments(parser):
    parser.add_argument('--output', default=DEFAULT_OUTPUT, help=f'output folder (default {DEFAULT_OUTPUT})')
    parser.add_argument('--seed', type=int, default=0, help='seed of kernels and noise (default 0)')
    parser.add_argument('--force', action='store_true', help='replace the output folder if it exists')


def load_photo(name):
    """An RGB uint8 photo from ``skimage.data`` (offline), halved if larger than ``MAX_SIDE``."""
    import cv2
    from skimage import data
    if name.startswith('motorcycle_'):
        left, right, _ = data.stereo_motorcycle()
        img = left if name == 'motorcycle_left' else right
    else:
        img = getattr(data, name)()
    if max(img.shape[:2]) > MAX_SIDE:
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return img


def texture(tile_rgb):
    """Mean absolute horizontal + vertical luminance gradient of a tile, in [0, 1] units."""
    import numpy as np
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
    import cv2
    import numpy as np
    r = kernel.shape[0] // 2
    padded = cv2.copyMakeBorder(img, r, r, r, r, cv2.BORDER_REFLECT_101)
    region = padded[top:top + size + 2 * r, left:left + size + 2 * r].astype(np.float32)
    # filter2D correlates; flipping the kernel makes it a convolution.
    blurred = cv2.filter2D(region, -1, np.ascontiguousarray(kernel[::-1, ::-1]).astype(np.float32),
                           borderType=cv2.BORDER_REFLECT_101)[r:r + size, r:r + size]
    noisy = blurred + rng.standard_normal(blurred.shape).astype(np.float32) * noise_sigma  # 0-255 units
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _blurry(img, photo, top, left, rng):
    from tpdiff_plugin.tools.blur_kernels import random_shake_kernel
    size = int(rng.choice(KERNEL_SIZES))
    kernel = random_shake_kernel(size, rng)
    sigma = float(rng.uniform(*NOISE_SIGMA))
    out = blur_crop(img, top, left, TILE, kernel, sigma, rng)
    return out, kernel, {'source': photo, 'box': [top, left, TILE, TILE], 'kernel_size': size,
                         'noise_sigma_255': round(sigma, 4)}


def _key(photo, top, left):
    return f'{photo}-y{top:04d}x{left:04d}'


def build_demo(output=DEFAULT_OUTPUT, seed=0, force=False, quiet=True):
    """Build the demo set into ``output`` (see the module docstring). Returns the info dict written."""
    import cv2
    import numpy as np

    from tpdiff_plugin.tools.make_lmdb import write_lmdb

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
    rng = np.random.default_rng(seed)
    info = {'seed': seed, 'tile': TILE, 'kernel_sizes': list(KERNEL_SIZES), 'noise_sigma_255': list(NOISE_SIGMA),
            'blur_photos': list(BLUR_PHOTOS), 'sharp_photos': list(SHARP_PHOTOS),
            'val_photos': sorted({p for p, _, _ in VAL_CROPS}), 'min_texture': MIN_TEXTURE,
            'source': 'skimage.data (scikit-image, offline)', 'images': {}}
    try:
        staging = os.path.join(tmp, '_staging')
        sets = {name: [] for name in ('train_blur', 'train_sharp', 'val_blur', 'val_sharp')}

        def save(folder, key, img_rgb):
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f'{key}.png')
            if not cv2.imwrite(path, np.ascontiguousarray(img_rgb[:, :, ::-1])):
                raise UserError(f'{path}: cannot write')
            return path

        def textured_tiles(photos):
            """``(photo, img, top, left)`` for every tile of ``photos`` with enough texture to learn from."""
            for photo in photos:
                img = load_photo(photo)
                for top, left in tile_boxes(img):
                    if texture(img[top:top + TILE, left:left + TILE]) >= MIN_TEXTURE:
                        yield photo, img, top, left

        for photo, img, top, left in textured_tiles(BLUR_PHOTOS):
            key = _key(photo, top, left)
            out, _, meta = _blurry(img, photo, top, left, rng)
            sets['train_blur'].append((key, save(os.path.join(staging, 'train_blur'), key, out)))
            info['images'][f'train_blur/{key}'] = meta
        for photo, img, top, left in textured_tiles(SHARP_PHOTOS):
            key = _key(photo, top, left)
            tile = img[top:top + TILE, left:left + TILE]
            sets['train_sharp'].append((key, save(os.path.join(staging, 'train_sharp'), key, tile)))
            info['images'][f'train_sharp/{key}'] = {'source': photo, 'box': [top, left, TILE, TILE]}
        for photo, top, left in VAL_CROPS:
            img = load_photo(photo)
            key = _key(photo, top, left)
            out, kernel, meta = _blurry(img, photo, top, left, rng)
            os.makedirs(os.path.join(tmp, 'val', 'kernels'), exist_ok=True)
            np.save(os.path.join(tmp, 'val', 'kernels', f'{key}.npy'), kernel)
            sets['val_blur'].append((key, save(os.path.join(tmp, 'val', 'blur'), key, out)))
            sets['val_sharp'].append((key, save(os.path.join(tmp, 'val', 'sharp'), key,
                                                img[top:top + TILE, left:left + TILE])))
            info['images'][f'val/{key}'] = meta

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
        '  The two training sets share no photo: they are unpaired.\n'
        f'val_blur.lmdb / val_sharp.lmdb ({info["n_val_blur"]} pairs, same keys; PNGs in val/blur, val/sharp): '
        f'crops of {", ".join(info["val_photos"])}, not used for training.\n'
        f'Blur: random camera-shake kernels (random-walk trajectories), sizes {info["kernel_sizes"][0]}-'
        f'{info["kernel_sizes"][-1]} px, one per image, then Gaussian noise with sigma '
        f'{info["noise_sigma_255"][0]}-{info["noise_sigma_255"][1]}/255, 8-bit.\n'
        'Per-image source box, kernel size and noise level: info.json. Val kernels: val/kernels/*.npy.\n')


def run(args):
    info = build_demo(args.output, seed=args.seed, force=args.force)
    print(f'demo set written to {args.output}: {info["n_train_blur"]} blurry + {info["n_train_sharp"]} sharp '
          f'training tiles (unpaired), {info["n_val_blur"]} validation pairs')
    return 0
