"""Reading and checking the images and LMDBs behind the datasets (helpers; not auto-imported).

One colour rule is applied everywhere an image enters the project, by ``tpdiff make-lmdb`` when it
writes an LMDB and by ``UnpairedImageDataset`` when it reads a file or an LMDB value, so the disk and
LMDB backends give the same pixels (see ``datasets_lmdb/README.md``):

- 8-bit, 3 channels (BGR as OpenCV decodes it): used as is.
- Grayscale (1 channel): the channel is copied to B, G and R.
- 16-bit: reduced to 8 bits by keeping the high byte (``v >> 8``), which is what OpenCV's
  ``IMREAD_COLOR`` and therefore basicsr's own readers (``PairedImageDataset``) do.
- An alpha channel (gray+alpha, BGRA) that is fully opaque is dropped. An image with any transparent
  pixel is refused: the colour stored under transparent pixels is arbitrary, so there is no right way
  to flatten it for a deblurring pair; flatten it yourself on the background you want.
- Anything else (float or 32-bit images, other channel counts, undecodable files) is refused.

LMDBs follow basicsr's layout (``data.mdb``, ``lock.mdb``, ``meta_info.txt`` with lines
``<key>.png (h,w,c) <compress_level>``). Problems raise :class:`UserError` naming the file and what
to do.
"""
import collections
import io
import os
import re
import warnings

import cv2
import lmdb
import numpy as np
from basicsr.utils import imfrombytes
from PIL import Image

from tpdiff_plugin.data import lmdb_pages
from tpdiff_plugin.utils.errors import UserError, read_bytes

#: the largest value of each accepted pixel type (white)
PIXEL_PEAKS = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}
#: the most pixels a dataset image's header may declare (150 MP, as ``tpdiff deblur``'s default): past it the
#: bytes are refused undecoded, since a few corrupt header bytes can declare gigabytes
MAX_PIXELS = 150_000_000
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
_META_LINE = re.compile(r'^(?P<name>\S+)\s+\((?P<h>\d+),\s*(?P<w>\d+),\s*(?P<c>\d+)\)(\s+\S+)?\s*$')
_KEY_UNSAFE = re.compile(r'[^A-Za-z0-9_-]')


def sanitize_key(text):
    """An LMDB key basicsr can round-trip: ASCII letters, digits, ``_`` and ``-`` only.

    basicsr reads keys back from meta_info.txt with ``line.split('.')[0]`` and encodes them as ASCII,
    so dots, spaces and non-ASCII characters would break ``PairedImageDataset``.
    """
    return _KEY_UNSAFE.sub('_', text)


def to_bgr8(img, name):
    """Apply the colour rule above to a decoded image: returns an ``HxWx3`` uint8 BGR array.

    Args:
        img (ndarray): as ``cv2.imdecode(..., IMREAD_UNCHANGED)`` returns it (HxW or HxWxC).
        name (str): the file or key, for error messages.
    """
    if img is None:
        raise UserError(f'{name}: cannot decode this image (corrupt or unsupported format)')
    depth_max = PIXEL_PEAKS.get(img.dtype)
    if depth_max is None:
        raise UserError(f'{name}: unsupported pixel type {img.dtype}; only 8-bit and 16-bit images are '
                        'accepted (convert it to an 8-bit PNG)')
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 2, 3, 4):
        raise UserError(f'{name}: unsupported image shape {tuple(img.shape)}; expected gray, gray+alpha, '
                        'BGR or BGRA')
    channels = img.shape[2]
    if channels in (2, 4):
        alpha = img[:, :, -1]
        if int(alpha.min()) < depth_max:
            transparent = int((alpha < depth_max).sum())
            raise UserError(f'{name}: has an alpha channel with {transparent} transparent pixel(s); the colour '
                            'under transparent pixels is undefined, so it is refused. Flatten it on a '
                            'background of your choice (or remove the alpha channel) and retry')
        img = img[:, :, :-1]
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img)


def decode_bgr8(content, name):
    """Decode image bytes (a file's or an LMDB value) and apply :func:`to_bgr8`.

    A header declaring more than :data:`MAX_PIXELS` is refused before decoding (a few bytes could otherwise
    make OpenCV allocate gigabytes), and a header OpenCV rejects is a UserError, not a ``cv2.error``."""
    if content is None:
        raise UserError(f'{name}: no such key or file')
    if len(content) == 0:
        raise UserError(f'{name}: empty file / value')
    size = _oversize(io.BytesIO(content), MAX_PIXELS)
    if size is not None:
        raise UserError(f'{name}: its header declares {size}, over the limit of {MAX_PIXELS / 1e6:.0f} MP for '
                        'dataset images; not decoded (a corrupt file, or split the image into tiles)')
    try:
        img = imfrombytes(content, flag='unchanged', float32=False)
    except cv2.error as e:  # e.g. a declared size over OpenCV's own limit, in a format Pillow cannot parse
        raise UserError(f'{name}: cannot decode this image ({str(e).strip().splitlines()[-1]})') from None
    return to_bgr8(img, name)


def read_bgr8(path):
    """Read an image file from disk under the colour rule."""
    return decode_bgr8(read_bytes(path, ''), path)


def _oversize(source, max_pixels):
    """``'WxH (N MP)'`` when the header of ``source`` (a path or a file object) declares more than ``max_pixels``
    pixels, else None. Read by Pillow without decoding; formats Pillow cannot parse are left to the decoder
    (OpenCV refuses over 2^30 pixels itself)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # DecompressionBombWarning, and Pillow's notes on odd headers
            with Image.open(source) as im:
                w, h = im.size
    except Image.DecompressionBombError:
        return 'more than {:.0f} MP'.format(2 * Image.MAX_IMAGE_PIXELS / 1e6)
    except Exception:  # noqa: BLE001  (not an image Pillow knows: the decoder decides)
        return None
    return f'{w}x{h} ({w * h / 1e6:.0f} MP)' if w * h > max_pixels else None


def check_declared_size(source, max_pixels):
    """Refuse, before decoding, an image (a path or a file object) whose header declares more than ``max_pixels``
    pixels (a decompression bomb, or a photo too large for memory): ValueError with the declared size."""
    size = _oversize(source, max_pixels)
    if size is not None:
        raise ValueError(f'its header declares {size}, over the limit of {max_pixels / 1e6:.0f} MP '
                         '(--max-megapixels); not decoded')


def list_images(folder, what):
    """Sorted full paths of the image files under ``folder`` (recursive). ``what`` names the option."""
    if not os.path.isdir(folder):
        raise UserError(f'{what}: image folder not found: {folder}')
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        paths.extend(os.path.join(root, f) for f in files
                     if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise UserError(f'{what}: no images ({", ".join(IMAGE_EXTENSIONS)}) in {folder}')
    return sorted(paths)


def image_size(path):
    """``(h, w)`` of an image file from its header (Pillow, no decode), falling back to a full decode.

    Also refuses, at this point, files whose alpha channel has transparent pixels (decoding only the
    files that have an alpha channel at all) and files declaring more than :data:`MAX_PIXELS`.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            alpha = im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info
    except Exception:  # Pillow cannot parse the header: let OpenCV decide  # noqa: BLE001
        img = read_bgr8(path)
        return img.shape[0], img.shape[1]
    if w * h > MAX_PIXELS or alpha:
        read_bgr8(path)  # raises on transparent pixels, and on a declared size over MAX_PIXELS
    return h, w


def read_meta_info(lmdb_path, what):
    """Parse ``lmdb_path/meta_info.txt``: a list of ``(key, (h, w, c))`` in file order.

    The key is the name without its extension, as basicsr uses it.
    """
    meta = os.path.join(lmdb_path, 'meta_info.txt')
    if not os.path.isfile(meta):
        raise UserError(f'{what}: {lmdb_path} has no meta_info.txt; it is not an LMDB in basicsr layout '
                        '(build it with `tpdiff make-lmdb`)')
    entries = []
    for lineno, line in numbered_lines(meta):
        m = _META_LINE.match(line)
        if m is None:
            raise UserError(f'{what}: {meta} line {lineno} is not "<name>.png (h,w,c) <level>": {line!r}')
        name = m.group('name')
        key = name.rsplit('.', 1)[0] if '.' in name else name
        entries.append((key, (int(m.group('h')), int(m.group('w')), int(m.group('c')))))
    return entries


def numbered_lines(path):
    """``(line number, stripped line)`` for each non-blank line of the UTF-8 text file ``path``; a file that
    cannot be read or is not UTF-8 is a UserError naming it (and the line)."""
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise UserError(f'{path}: cannot read ({e.strerror})') from None
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        lineno = data.count(b'\n', 0, e.start) + 1
        raise UserError(f'{path} line {lineno}: not UTF-8 text (byte {data[e.start]:#04x}); save it as UTF-8') \
            from None
    for lineno, line in enumerate(io.StringIO(text, newline=None), 1):  # newlines as text mode reads them
        if line.strip():
            yield lineno, line.strip()


def lmdb_keys(lmdb_path):
    """All keys stored in an LMDB (decoded as ASCII), without reading the values."""
    env = lmdb.open(lmdb_path, readonly=True, lock=False, readahead=False)
    try:
        with env.begin(write=False) as txn:
            return [k.decode('ascii', errors='replace') for k in txn.cursor().iternext(keys=True, values=False)]
    finally:
        env.close()


def _describe(keys, limit=3):
    keys = sorted(keys)
    more = f' (and {len(keys) - limit} more)' if len(keys) > limit else ''
    return ', '.join(repr(k) for k in keys[:limit]) + more


def check_lmdb_complete(path, option):
    """Refuse an LMDB whose ``data.mdb`` is shorter than the pages its header says are in use (a copy or
    download that stopped early), or whose header or tree is corrupt (:mod:`lmdb_pages`). Reading such a file
    kills the process (SIGBUS, SIGSEGV, SIGFPE: lmdb maps it and trusts it), so this must be checked before
    any worker touches it."""
    data = os.path.join(path, 'data.mdb')
    if not os.path.isfile(data):
        return
    size = os.path.getsize(data)
    if size < 2 * 4096:
        raise UserError(f'{option}: {data} is truncated ({size} bytes, less than its two header pages); '
                        'rebuild or re-copy the LMDB')
    try:
        header = lmdb_pages.read_header(data, size)
        if isinstance(header, str):
            raise UserError(f'{option}: {data}: {header}; rebuild or re-copy the LMDB')
        psize, last_pg, root = header
        if size < (last_pg + 1) * psize:
            raise UserError(f'{option}: {data} is truncated ({size} bytes, its header needs '
                            f'{(last_pg + 1) * psize}); rebuild or re-copy the LMDB')
        problem = lmdb_pages.tree_problem(data, psize, last_pg, root)
    except OSError as e:
        raise UserError(f'{option}: cannot read {data} ({e.strerror})') from None
    if problem:
        raise UserError(f'{option}: {data} is corrupt ({problem}); rebuild or re-copy the LMDB')
    try:
        lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True).close()
    except lmdb.Error as e:
        raise UserError(f'{option}: cannot open LMDB {path}: {e}') from None


def check_lmdb(lmdb_path, what):
    """Check an LMDB folder and return its meta_info entries ``[(key, (h, w, c)), ...]``.

    Refuses (UserError naming ``what`` and the path): a missing folder, a folder without ``data.mdb``
    or ``meta_info.txt``, an empty LMDB, duplicate meta_info keys, and a meta_info.txt whose keys
    disagree with the keys stored in the LMDB.
    """
    if not os.path.exists(lmdb_path):
        raise UserError(f'{what}: LMDB not found: {lmdb_path} (build it with `tpdiff make-lmdb`, or '
                        '`tpdiff make-demo` for the demo set)')
    if not os.path.isdir(lmdb_path) or not os.path.isfile(os.path.join(lmdb_path, 'data.mdb')):
        raise UserError(f'{what}: {lmdb_path} is not an LMDB folder (no data.mdb inside)')
    check_lmdb_complete(lmdb_path, what)
    entries = read_meta_info(lmdb_path, what)
    meta_keys = [k for k, _ in entries]
    dups = {k for k, n in collections.Counter(meta_keys).items() if n > 1}
    if dups:
        raise UserError(f'{what}: {lmdb_path}/meta_info.txt lists keys more than once: {_describe(dups)}')
    try:
        stored = set(lmdb_keys(lmdb_path))
    except lmdb.Error as e:
        raise UserError(f'{what}: cannot open LMDB {lmdb_path}: {e}') from None
    if not stored and not entries:
        raise UserError(f'{what}: LMDB {lmdb_path} is empty (no images); rebuild it')
    missing = set(meta_keys) - stored
    extra = stored - set(meta_keys)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f'{len(missing)} key(s) in meta_info.txt but not in the LMDB: {_describe(missing)}')
        if extra:
            parts.append(f'{len(extra)} key(s) in the LMDB but not in meta_info.txt: {_describe(extra)}')
        raise UserError(f'{what}: {lmdb_path}: meta_info.txt disagrees with the LMDB: ' + '; '.join(parts) +
                        '. The LMDB is inconsistent; rebuild it with `tpdiff make-lmdb`')
    return entries


def read_lmdb_value(lmdb_path, key):
    """One raw value of an LMDB (bytes or None), opening and closing the environment (after
    :func:`check_lmdb_complete`: a corrupt header would crash the process)."""
    check_lmdb_complete(lmdb_path, 'LMDB')
    env = lmdb.open(lmdb_path, readonly=True, lock=False, readahead=False)
    try:
        with env.begin(write=False) as txn:
            value = txn.get(key.encode('ascii'))
            return None if value is None else bytes(value)
    finally:
        env.close()


def verify_lmdb(lmdb_path, expected_shapes):
    """Verify a freshly written LMDB: key count, keys, every value decodes, shapes match meta_info.

    Args:
        lmdb_path (str): the LMDB folder.
        expected_shapes (dict): key -> ``(h, w, c)`` the writer intended.
    Raises:
        UserError: naming the first disagreement.
    """
    entries = check_lmdb(lmdb_path, 'make-lmdb verification')
    meta = dict(entries)
    if len(meta) != len(expected_shapes) or set(meta) != set(expected_shapes):
        raise UserError(f'{lmdb_path}: wrote {len(meta)} keys, expected {len(expected_shapes)}')
    env = lmdb.open(lmdb_path, readonly=True, lock=False, readahead=False)
    try:
        with env.begin(write=False) as txn:
            for key, shape in meta.items():
                img = cv2.imdecode(np.frombuffer(txn.get(key.encode('ascii')), np.uint8), cv2.IMREAD_UNCHANGED)
                if img is None:
                    raise UserError(f'{lmdb_path}: value of key {key!r} does not decode')
                got = img.shape if img.ndim == 3 else img.shape + (1,)
                if tuple(got) != tuple(shape) or tuple(shape) != tuple(expected_shapes[key]):
                    raise UserError(f'{lmdb_path}: key {key!r}: decoded shape {tuple(got)}, meta_info '
                                    f'{tuple(shape)}, expected {tuple(expected_shapes[key])}')
    finally:
        env.close()
