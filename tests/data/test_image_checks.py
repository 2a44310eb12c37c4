"""image_checks / lmdb_pages: inputs the fuzz suite (tests/fuzz) found ending in a traceback, a crash of the
interpreter or a multi-gigabyte decode; each now ends in one UserError line."""
import multiprocessing
import struct

import cv2
import lmdb
import numpy as np
import pytest

from tpdiff_plugin.data import image_checks
from tpdiff_plugin.utils.errors import UserError


def jpeg_declaring(width, height):
    """A valid 8x8 JPEG whose SOF header declares ``width`` x ``height``."""
    data = bytearray(cv2.imencode('.jpg', np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    sof = data.find(b'\xff\xc0')
    data[sof + 5:sof + 9] = struct.pack('>HH', height, width)
    return bytes(data)


def test_a_header_declaring_gigapixels_is_refused_before_decoding(tmp_path):
    bomb = jpeg_declaring(30000, 30000)  # OpenCV decoded this to a 2.7 GB array (10 s, 5 GB of memory)
    (tmp_path / 'bomb.jpg').write_bytes(bomb)
    for call in (lambda: image_checks.decode_bgr8(bomb, 'k'), lambda: image_checks.image_size(tmp_path / 'bomb.jpg'),
                 lambda: image_checks.read_bgr8(tmp_path / 'bomb.jpg')):
        with pytest.raises(UserError, match='its header declares more than 179 MP, over the limit of 150 MP'):
            call()


def test_the_dataset_size_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(image_checks, 'MAX_PIXELS', 100)
    data = cv2.imencode('.png', np.zeros((10, 11, 3), np.uint8))[1].tobytes()
    (tmp_path / 'a.png').write_bytes(data)
    with pytest.raises(UserError, match=r'declares 11x10 \(0 MP\), over the limit'):
        image_checks.decode_bgr8(data, 'k')
    with pytest.raises(UserError, match='over the limit'):
        image_checks.image_size(tmp_path / 'a.png')
    monkeypatch.setattr(image_checks, 'MAX_PIXELS', 110)
    assert image_checks.decode_bgr8(data, 'k').shape == (10, 11, 3)


def test_a_header_opencv_rejects_is_a_user_error():
    data = bytearray(cv2.imencode('.bmp', np.zeros((1, 1), np.uint8))[1].tobytes())
    data[22:26] = struct.pack('<i', 1 << 21)  # height over OpenCV's 2^20: was a cv2.error traceback
    with pytest.raises(UserError, match=r'k: cannot decode this image \(.*validateInputImageSize'):
        image_checks.decode_bgr8(bytes(data), 'k')


def small_lmdb(path, n=1):
    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i in range(n):
            txn.put(f'k{i}'.encode(), b'v' * 100)
    env.close()
    (path / 'meta_info.txt').write_text(''.join(f'k{i}.png (1,1,3) 1\n' for i in range(n)))
    return path


def test_meta_info_that_is_not_utf8(tmp_path):
    path = small_lmdb(tmp_path / 'a.lmdb', 2)
    (path / 'meta_info.txt').write_bytes(b'k0.png (1,1,3) 1\n\x80k1.png (1,1,3) 1\n')  # was UnicodeDecodeError
    with pytest.raises(UserError, match=r'meta_info.txt line 2: not UTF-8 text \(byte 0x80\)'):
        image_checks.check_lmdb(str(path), 'dataroot_blur')


def _check_in_child(path, conn):
    try:
        image_checks.check_lmdb_complete(path, 'dataroot_blur')
        conn.send('passed')
    except UserError as e:
        conn.send(str(e))


def check_isolated(path):
    """check_lmdb_complete in a forked child: before the fix these inputs killed the interpreter."""
    parent, child = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.get_context('fork').Process(target=_check_in_child, args=(str(path), child))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0, f'crashed (exit code {proc.exitcode})'
    return parent.recv()


@pytest.mark.parametrize('edit, match', [
    ('page_size', r'invalid page size \(0\)'),  # SIGFPE in lmdb.open
    ('leaf_lower', 'page 2 has impossible bounds'),  # each of these three: SIGBUS listing the keys
    ('node_offset', 'page 2 has a node outside the page'),
    ('key_size', 'page 2 has a key running past the page'),
])
def test_a_corrupt_lmdb_is_refused_not_a_crash(tmp_path, edit, match):
    path = small_lmdb(tmp_path / 'a.lmdb')
    mdb = bytearray((path / 'data.mdb').read_bytes())
    leaf = 2 * 4096  # the one leaf page, after the two meta pages
    if edit == 'page_size':
        mdb[21:21] = b'\x00\x00\x00'  # shifts the meta fields: the page size reads 0
    elif edit == 'leaf_lower':
        mdb[leaf + 12] = 0
    elif edit == 'node_offset':
        mdb[leaf + 16:leaf + 18] = struct.pack('=H', 4095)
    else:
        node = leaf + struct.unpack_from('=H', mdb, leaf + 16)[0]
        mdb[node + 6:node + 8] = b'\xff\xff'
    (path / 'data.mdb').write_bytes(bytes(mdb))
    assert check_isolated(path) != 'passed'
    with pytest.raises(UserError, match=f'dataroot_blur: .*data.mdb.*{match}.*; rebuild or re-copy the LMDB'):
        image_checks.check_lmdb_complete(str(path), 'dataroot_blur')


def test_an_lmdb_with_branch_and_overflow_pages_passes(tmp_path):
    path = tmp_path / 'big.lmdb'
    env = lmdb.open(str(path), map_size=1 << 26)
    rng = np.random.default_rng(0)
    with env.begin(write=True) as txn:
        for i in range(2000):
            txn.put(f'img_{i:05d}'.encode(), rng.bytes(int(rng.integers(1, 9000))))
    with env.begin(write=True) as txn:  # a second transaction: the other meta page becomes current
        for i in range(0, 2000, 3):
            txn.delete(f'img_{i:05d}'.encode())
    env.close()
    image_checks.check_lmdb_complete(str(path), 'dataroot_blur')
    assert len(image_checks.lmdb_keys(str(path))) == 1333
