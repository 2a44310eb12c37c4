"""Writing an LMDB in basicsr's layout from image files, under the colour rule, verified afterwards.

Used by ``tpdiff make-lmdb`` and ``tpdiff make-demo`` (see :mod:`tpdiff_plugin.data.image_checks` for
the colour rule and the layout).
"""
import collections
import contextlib
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import cv2
from basicsr.utils.lmdb_util import make_lmdb_from_imgs

from tpdiff_plugin.data.image_checks import to_bgr8, verify_lmdb
from tpdiff_plugin.utils.errors import UserError


def _prepare_images(items, staging_dir, workers):
    """Decode every source image under the colour rule.

    Returns ``(paths, shapes, converted)``: the file each key is written from (the source itself when it
    is already 8-bit BGR, else a converted PNG in ``staging_dir``), key -> ``(h, w, 3)``, and a count of
    conversions by kind.
    """
    def one(item):
        key, path = item
        raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        img = to_bgr8(raw, path)  # raises UserError on undecodable / refused images
        kinds = []
        if raw.dtype != 'uint8':
            kinds.append('16-bit -> 8-bit')
        if raw.ndim == 2 or raw.shape[2] in (1, 2):
            kinds.append('gray -> RGB')
        if raw.ndim == 3 and raw.shape[2] in (2, 4):
            kinds.append('opaque alpha dropped')
        if kinds:
            out = os.path.join(staging_dir, f'{key}.png')
            if not cv2.imwrite(out, img):
                raise UserError(f'{out}: cannot write the converted image')
            path = out
        return key, path, img.shape, kinds

    os.makedirs(staging_dir, exist_ok=True)
    paths, shapes, converted = {}, {}, collections.Counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for key, path, shape, kinds in pool.map(one, items):
            paths[key], shapes[key] = path, tuple(shape)
            converted.update(kinds)
    return paths, shapes, converted


def write_lmdb(lmdb_path, items, compress_level=1, workers=None, quiet=False):
    """Write ``items`` (``[(key, image_path)]``) to a new LMDB with basicsr's ``make_lmdb_from_imgs``.

    Images are converted under the colour rule first (converted copies go to a ``_staging`` folder beside
    ``lmdb_path``, removed afterwards), and the result is verified (key count, every image decodes,
    meta_info matches keys and shapes). ``lmdb_path`` must not exist; callers build in a temporary folder.

    Returns:
        dict: counts of conversions by kind.
    """
    if not items:
        raise UserError(f'{lmdb_path}: nothing to write (no images)')
    workers = workers or min(8, os.cpu_count() or 1)
    staging = lmdb_path + '._staging'
    try:
        paths, shapes, converted = _prepare_images(items, staging, workers)
        keys = [k for k, _ in items]
        raw_bytes = sum(h * w * c for h, w, c in shapes.values())
        map_size = 2 * raw_bytes + 64 * 1024 * 1024  # PNG never exceeds raw size much; LMDB files are sparse
        sources = [os.path.abspath(paths[k]) for k in keys]  # absolute: joined to data_path, they stay as is
        with contextlib.ExitStack() as stack:
            # basicsr prints its progress to stdout; keep our stdout for the summary (or silence it all)
            out = stack.enter_context(open(os.devnull, 'w')) if quiet else sys.stderr
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(out))
            make_lmdb_from_imgs(os.path.commonpath(sources), lmdb_path, sources, keys,
                                compress_level=compress_level, map_size=map_size)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    verify_lmdb(lmdb_path, shapes)
    return dict(converted)
