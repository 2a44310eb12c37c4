"""read_images: the same pixels from a folder and from a basicsr LMDB of it; one-line errors."""
import cv2
import numpy as np
import pytest

from tpdiff_plugin.data.image_sets import read_images
from tpdiff_plugin.utils.errors import UserError


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    images = {key: rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for key in ('b', 'a', 'c_2')}
    (tmp_path / 'imgs' / 'sub').mkdir(parents=True)
    for key, img in images.items():
        cv2.imwrite(str(tmp_path / 'imgs' / ('sub' if key == 'c_2' else '') / f'{key}.png'), img)
    return tmp_path / 'imgs', images


def test_folder_and_lmdb_give_the_same_images(folder, tmp_path):
    from basicsr.utils.lmdb_util import make_lmdb_from_imgs
    root, images = folder
    read = read_images(str(root))
    assert sorted(read) == sorted(images)  # recursive, keyed by file name without extension
    keys = ['a', 'b']
    make_lmdb_from_imgs(str(root), str(tmp_path / 'x.lmdb'), [f'{k}.png' for k in keys], keys)
    from_lmdb = read_images(str(tmp_path / 'x.lmdb'))
    assert sorted(from_lmdb) == keys
    for key in keys:
        assert np.array_equal(read[key], images[key]) and np.array_equal(from_lmdb[key], images[key])


def test_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match='no such LMDB or folder'):
        read_images(str(tmp_path / 'nope'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match='no images'):
        read_images(str(tmp_path / 'empty'))
    lmdb_dir = tmp_path / 'half.lmdb'
    lmdb_dir.mkdir()
    (lmdb_dir / 'data.mdb').write_bytes(b'')
    with pytest.raises(UserError, match='meta_info.txt'):
        read_images(str(lmdb_dir))
