"""UnpairedImageDataset: real pixels from LMDB and disk, independent draws, exact flips, clear errors."""
import os
import random

import cv2
import lmdb
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from basicsr.data import build_dataset
from basicsr.utils.lmdb_util import make_lmdb_from_imgs
from basicsr.utils.registry import DATASET_REGISTRY

from tpdiff_plugin.data.unpaired_image_dataset import UnpairedImageDataset
from tpdiff_plugin.utils.errors import UserError


def write_images(folder, names, shape=(40, 48, 3), seed=0, dtype=np.uint8):
    """Random images ``<name>.png`` in ``folder``; returns {name: array as written (BGR)}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    hi = 256 if dtype == np.uint8 else 65536
    out = {}
    for n in names:
        img = rng.integers(0, hi, shape, dtype=dtype)
        assert cv2.imwrite(os.path.join(folder, f'{n}.png'), img)
        out[n] = img
    return out


def basicsr_lmdb(folder, lmdb_path):
    """An LMDB built by basicsr's own tool from every PNG of ``folder`` (keys: file stems)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith('.png'))
    make_lmdb_from_imgs(folder, lmdb_path, files, [f[:-4] for f in files])
    return lmdb_path


@pytest.fixture
def sources(tmp_path):
    """3 blurry and 4 sharp 40x48 random images, as folders and as basicsr LMDBs."""
    blur = write_images(tmp_path / 'blur', ['b0', 'b1', 'b2'], seed=1)
    sharp = write_images(tmp_path / 'sharp', ['s0', 's1', 's2', 's3'], seed=2)
    return {
        'blur': blur, 'sharp': sharp,
        'blur_dir': str(tmp_path / 'blur'), 'sharp_dir': str(tmp_path / 'sharp'),
        'blur_lmdb': basicsr_lmdb(str(tmp_path / 'blur'), str(tmp_path / 'blur.lmdb')),
        'sharp_lmdb': basicsr_lmdb(str(tmp_path / 'sharp'), str(tmp_path / 'sharp.lmdb')),
    }


def make(src, backend='lmdb', **over):
    opt = {'name': 't', 'type': 'UnpairedImageDataset', 'phase': 'train', 'io_backend': {'type': backend},
           'dataroot_blur': src['blur_lmdb'] if backend == 'lmdb' else src['blur_dir'],
           'dataroot_sharp': src['sharp_lmdb'] if backend == 'lmdb' else src['sharp_dir'],
           'gt_size': 16, 'use_hflip': False, 'use_rot': False}
    opt.update(over)
    return UnpairedImageDataset(opt)


def to_bgr_uint8(t):
    """3xHxW RGB tensor in [0, 1] -> HxWx3 BGR uint8 (exact for images that came from uint8)."""
    return np.rint(t.numpy().transpose(1, 2, 0)[:, :, ::-1] * 255).astype(np.uint8)


def crop_offsets(src, patch):
    """All (top, left) where ``patch`` equals a crop of ``src``."""
    win = sliding_window_view(src, patch.shape)[:, :, 0]
    return list(zip(*np.nonzero((win == patch).all(axis=(2, 3, 4)))))


def dihedral(img):
    """The 8 flips/rotations of an HxWxC array, by name, computed with numpy."""
    out = {}
    for t in (False, True):
        for v in (False, True):
            for h in (False, True):
                x = img
                if h:
                    x = x[:, ::-1]
                if v:
                    x = x[::-1]
                if t:
                    x = x.transpose(1, 0, 2)
                out[(h, v, t)] = x
    return out


def test_registered_and_built_by_basicsr(sources):
    assert DATASET_REGISTRY.get('UnpairedImageDataset') is UnpairedImageDataset
    ds = build_dataset({'name': 't', 'type': 'UnpairedImageDataset', 'phase': 'train',
                        'io_backend': {'type': 'lmdb'}, 'dataroot_blur': sources['blur_lmdb'],
                        'dataroot_sharp': sources['sharp_lmdb'], 'gt_size': 16, 'use_hflip': True,
                        'use_rot': True})
    assert len(ds) == 3  # the number of blurry images
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch['lq'].shape == (2, 3, 16, 16) and batch['ref'].shape == (2, 3, 16, 16)
    assert batch['lq'].dtype == torch.float32
    assert 0 <= batch['lq'].min() and batch['lq'].max() <= 1


@pytest.mark.parametrize('backend', ['lmdb', 'disk'])
def test_patches_are_crops_of_the_named_sources(sources, backend):
    random.seed(0)
    ds = make(sources, backend)
    tops = set()
    for index in [0, 1, 2, 0, 1, 2, 0, 1]:
        item = ds[index]
        blur_name = os.path.splitext(os.path.basename(item['lq_path']))[0]
        sharp_name = os.path.splitext(os.path.basename(item['ref_path']))[0]
        assert blur_name == f'b{index}'
        lq, ref = to_bgr_uint8(item['lq']), to_bgr_uint8(item['ref'])
        offsets = crop_offsets(sources['blur'][blur_name], lq)
        assert len(offsets) == 1  # random 40x48 images: the crop is found at exactly one place
        assert len(crop_offsets(sources['sharp'][sharp_name], ref)) == 1
        tops.add(offsets[0])
    assert len(tops) > 1  # the crop position is random


def test_disk_and_lmdb_backends_give_the_same_pixels(sources):
    lm, dk = make(sources, 'lmdb', phase='val'), make(sources, 'disk', phase='val')
    for i in range(len(lm)):
        a, b = lm[i], dk[i]
        assert a['lq_path'] == os.path.splitext(os.path.basename(b['lq_path']))[0]
        assert torch.equal(a['lq'], b['lq']) and torch.equal(a['ref'], b['ref'])
        assert np.array_equal(to_bgr_uint8(a['lq']), sources['blur'][a['lq_path']])  # whole image, exact
    random.seed(5)
    lm_items = [make(sources, 'lmdb', use_hflip=True, use_rot=True)[1] for _ in range(5)]
    random.seed(5)
    dk_items = [make(sources, 'disk', use_hflip=True, use_rot=True)[1] for _ in range(5)]
    for a, b in zip(lm_items, dk_items):
        assert torch.equal(a['lq'], b['lq']) and torch.equal(a['ref'], b['ref'])


def test_sharp_draw_is_independent_of_the_blurry_index(sources):
    random.seed(0)
    ds = make(sources)
    for index in range(3):
        drawn = [ds[index]['ref_path'] for _ in range(60)]
        assert set(drawn) == {'s0', 's1', 's2', 's3'}  # every sharp image turns up for every blurry one
    # and the crops of one sharp image vary from draw to draw
    patches = {to_bgr_uint8(ds[0]['ref']).tobytes() for _ in range(20)}
    assert len(patches) > 10


def test_blur_and_sharp_get_their_own_flips(sources, tmp_path):
    # 16x16 sources and gt_size 16: the patch is the whole image, so only the flips/rotations act.
    blur = write_images(tmp_path / 'b16', ['b'], shape=(16, 16, 3), seed=3)['b']
    sharp = write_images(tmp_path / 's16', ['s'], shape=(16, 16, 3), seed=4)['s']
    src = {'blur_dir': str(tmp_path / 'b16'), 'sharp_dir': str(tmp_path / 's16')}
    blur_t, sharp_t = dihedral(blur), dihedral(sharp)

    def which(patch, table):
        hits = [k for k, v in table.items() if np.array_equal(v, patch)]
        assert len(hits) == 1, 'the patch is not exactly a flip/rotation of the source'
        return hits[0]

    random.seed(1)
    ds = make(src, 'disk', use_hflip=True, use_rot=True)
    seen = [(which(to_bgr_uint8(it['lq']), blur_t), which(to_bgr_uint8(it['ref']), sharp_t))
            for it in (ds[0] for _ in range(80))]
    assert {b for b, _ in seen} == set(blur_t) and {s for _, s in seen} == set(sharp_t)  # all 8 appear
    assert any(b != s for b, s in seen)  # blur and sharp are augmented independently

    ds = make(src, 'disk', use_hflip=True, use_rot=False)
    assert {which(to_bgr_uint8(ds[0]['lq']), blur_t) for _ in range(30)} == {
        (False, False, False), (True, False, False)}
    ds = make(src, 'disk')
    assert {which(to_bgr_uint8(ds[0]['lq']), blur_t) for _ in range(10)} == {(False, False, False)}


def test_seeded_keys_draw_from_their_own_seed(sources):
    """An ``(index, seed)`` key (what the train sampler passes when workers load the data) gives the same item
    whatever the global ``random`` state, leaves that state untouched, and other seeds give other draws; a
    plain index still draws from the global stream."""
    ds = make(sources, use_hflip=True, use_rot=True)

    def item(key):
        it = ds[key]
        return it['lq_path'], it['ref_path'], to_bgr_uint8(it['lq']).tobytes(), to_bgr_uint8(it['ref']).tobytes()

    random.seed(0)
    first = item((1, 12345))
    random.seed(99)
    before = random.getstate()
    assert item((1, 12345)) == first and random.getstate() == before
    assert first[0] == 'b1'
    assert len({item((1, seed)) for seed in range(20)}) > 10
    random.seed(7)
    plain = item(1)
    random.seed(7)
    assert item(1) == plain and random.getstate() != before


def test_patch_size_alias_and_normalisation(sources):
    random.seed(0)
    ds = make(sources, gt_size=None, patch_size=20, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    item = ds[0]
    assert item['lq'].shape == (3, 20, 20)
    raw = (item['lq'] * 0.25 + 0.5)  # undo the normalisation: a crop of the source again
    assert len(crop_offsets(sources['blur']['b0'], to_bgr_uint8(raw))) == 1
    assert item['lq'].min() < 0  # normalised values leave [0, 1]


def test_non_train_phase_returns_whole_images_deterministically(sources):
    ds = make(sources, phase='val', gt_size=None)
    item = ds[2]
    assert item['lq'].shape == (3, 40, 48) and item['ref_path'] == 's2'
    assert np.array_equal(to_bgr_uint8(item['ref']), sources['sharp']['s2'])


def test_colour_rule_gray_16bit_and_opaque_alpha(tmp_path, sources):
    folder = tmp_path / 'odd'
    gray = write_images(folder, ['gray'], shape=(20, 24), seed=5)['gray']
    deep = write_images(folder, ['deep'], shape=(20, 24, 3), seed=6, dtype=np.uint16)['deep']
    rgba = write_images(folder, ['rgba'], shape=(20, 24, 4), seed=7)['rgba']
    rgba[:, :, 3] = 255
    cv2.imwrite(str(folder / 'rgba.png'), rgba)
    ds = make({'blur_dir': str(folder), 'sharp_dir': sources['sharp_dir']}, 'disk', phase='val', gt_size=None)
    got = {os.path.basename(ds[i]['lq_path'])[:-4]: to_bgr_uint8(ds[i]['lq']) for i in range(len(ds))}
    assert np.array_equal(got['gray'], np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(got['deep'], (deep >> 8).astype(np.uint8))
    assert np.array_equal(got['rgba'], rgba[:, :, :3])
    # the same rule through an LMDB built by basicsr from the same files (it stores them unchanged)
    lm = make({'blur_lmdb': basicsr_lmdb(str(folder), str(tmp_path / 'odd.lmdb')),
               'sharp_lmdb': sources['sharp_lmdb']}, 'lmdb', phase='val', gt_size=None)
    for i in range(len(lm)):
        assert np.array_equal(to_bgr_uint8(lm[i]['lq']), got[lm[i]['lq_path']])


# ------------------------------------------------------------------------------------------ errors

def test_missing_roots(sources, tmp_path):
    with pytest.raises(UserError, match=r'dataroot_blur.*nowhere\.lmdb'):
        make({**sources, 'blur_lmdb': str(tmp_path / 'nowhere.lmdb')})
    with pytest.raises(UserError, match=r'dataroot_sharp.*nofolder'):
        make({**sources, 'sharp_dir': str(tmp_path / 'nofolder')}, 'disk')
    with pytest.raises(UserError, match='dataroot_sharp: missing'):
        make(sources, dataroot_sharp=None)
    with pytest.raises(UserError, match='same'):
        make(sources, dataroot_sharp=sources['blur_lmdb'])
    with pytest.raises(UserError, match='io_backend.type'):
        make(sources, io_backend={'type': 'memcached'})
    with pytest.raises(UserError, match='gt_size'):
        make(sources, gt_size=None)


def test_not_an_lmdb_and_empty_lmdb(sources, tmp_path):
    fake = tmp_path / 'fake.lmdb'
    fake.mkdir()
    (fake / 'meta_info.txt').write_text('b0.png (40,48,3) 1\n')
    with pytest.raises(UserError, match=r'dataroot_blur.*fake\.lmdb.*data\.mdb'):
        make({**sources, 'blur_lmdb': str(fake)})
    empty = tmp_path / 'empty.lmdb'
    lmdb.open(str(empty), map_size=1 << 20).close()
    (empty / 'meta_info.txt').write_text('')
    with pytest.raises(UserError, match=r'dataroot_sharp.*empty\.lmdb.*empty'):
        make({**sources, 'sharp_lmdb': str(empty)})
    no_meta = tmp_path / 'nometa.lmdb'
    lmdb.open(str(no_meta), map_size=1 << 20).close()
    with pytest.raises(UserError, match='meta_info.txt'):
        make({**sources, 'blur_lmdb': str(no_meta)})


def test_meta_info_disagreeing_with_keys(sources):
    meta = os.path.join(sources['blur_lmdb'], 'meta_info.txt')
    with open(meta) as f:
        text = f.read()
    with open(meta, 'w') as f:
        f.write(text.replace('b1.png', 'b9.png'))
    with pytest.raises(UserError, match=r"dataroot_blur.*disagrees.*'b9'.*'b1'"):
        make(sources)


def test_image_smaller_than_patch(sources, tmp_path):
    write_images(tmp_path / 'sharp', ['tiny'], shape=(12, 30, 3), seed=9)
    with pytest.raises(UserError, match=r"dataroot_sharp: image .*tiny\.png' is 12x30.*gt_size 16"):
        make(sources, 'disk')
    make(sources, 'disk', gt_size=12)  # fits
    # LMDB: checked from meta_info.txt, without decoding
    with pytest.raises(UserError, match=r"dataroot_blur: image 'b0' is 40x48.*patch_size 41.*3 images"):
        make(sources, gt_size=None, patch_size=41)


def test_transparent_alpha_is_refused_at_construction(sources, tmp_path):
    img = write_images(tmp_path / 'alpha', ['see_through'], shape=(40, 48, 4), seed=8)['see_through']
    img[:, :, 3] = 255
    img[0, 0, 3] = 0
    cv2.imwrite(str(tmp_path / 'alpha' / 'see_through.png'), img)
    with pytest.raises(UserError, match=r'see_through\.png.*transparent'):
        make({**sources, 'sharp_dir': str(tmp_path / 'alpha')}, 'disk')
    lm = basicsr_lmdb(str(tmp_path / 'alpha'), str(tmp_path / 'alpha.lmdb'))
    with pytest.raises(UserError, match=r'see_through.*transparent'):
        make({**sources, 'sharp_lmdb': lm})
