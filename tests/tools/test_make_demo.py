"""tpdiff make-demo: layout, counts, matched (and split) unpaired training tiles, paired aligned val, reproducibility."""
import json
import os

import cv2
import lmdb
import numpy as np
import pytest
from scipy import ndimage

from basicsr.data.paired_image_dataset import PairedImageDataset

from tpdiff_plugin.cli import tpdiff_main
from tpdiff_plugin.data.unpaired_image_dataset import UnpairedImageDataset
from tpdiff_plugin.data.demo_set import build_demo, load_photo
from tpdiff_plugin.utils.errors import UserError

LMDBS = ('train_blur', 'train_sharp', 'train_blur_gt', 'val_blur', 'val_sharp')


def raw_values(path):
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): bytes(v) for k, v in txn.cursor()}
    env.close()
    return out


def decoded(path):
    return {k: cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_UNCHANGED) for k, v in raw_values(path).items()}


def photo_of(key):
    return key.split('-', 1)[0]


def box_of(key):
    """``<photo>-y<top>x<left>`` -> (top, left)."""
    pos = key.split('-', 1)[1]
    return int(pos[1:5]), int(pos[6:10])


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    info = build_demo(str(root / 'a' / 'demo'), seed=0)
    build_demo(str(root / 'b' / 'demo'), seed=0)
    build_demo(str(root / 'c' / 'demo'), seed=1)
    build_demo(str(root / 'split' / 'demo'), seed=0, domains='split')
    return root, info


def test_layout_and_counts(demo):
    root, info = demo
    out = root / 'a' / 'demo'
    assert sorted(os.listdir(out)) == ['README.txt', 'info.json', 'real', 'train_blur.lmdb', 'train_blur_gt.lmdb',
                                       'train_sharp.lmdb', 'val', 'val_blur.lmdb', 'val_sharp.lmdb']
    clock = cv2.imread(str(out / 'real' / 'clock_motion.png'))  # the real motion-blurred sample
    assert clock.shape == (300, 400, 3) and np.array_equal(clock[..., 0], clock[..., 2])
    assert sorted(os.listdir(root / 'a')) == ['demo']  # no temporary folders left beside it
    for name in LMDBS:
        assert {'data.mdb', 'meta_info.txt'} <= set(os.listdir(out / f'{name}.lmdb'))
        images = decoded(out / f'{name}.lmdb')
        assert all(v.shape == (128, 128, 3) and v.dtype == np.uint8 for v in images.values())
        assert info[f'n_{name}'] == len(images)
    blur, sharp = decoded(out / 'train_blur.lmdb'), decoded(out / 'train_sharp.lmdb')
    assert 24 <= len(blur) <= 80 and 24 <= len(sharp) <= 80  # a few dozen each
    val_b, val_s = decoded(out / 'val_blur.lmdb'), decoded(out / 'val_sharp.lmdb')
    assert len(val_b) == 4 and set(val_b) == set(val_s)  # paired
    for key in val_b:  # the PNG copies hold the same pixels
        assert np.array_equal(cv2.imread(str(out / 'val' / 'blur' / f'{key}.png')), val_b[key])
        assert np.array_equal(cv2.imread(str(out / 'val' / 'sharp' / f'{key}.png')), val_s[key])
    assert sorted(os.listdir(out / 'val' / 'kernels')) == sorted(f'{k}.npy' for k in val_b)
    recorded = json.loads((out / 'info.json').read_text())
    assert recorded['seed'] == 0 and 7 <= min(recorded['kernel_sizes']) and max(recorded['kernel_sizes']) <= 25
    sizes = [v['kernel_size'] for k, v in recorded['images'].items() if not k.startswith('train_sharp/')]
    assert len(sizes) == len(blur) + 4 and all(7 <= n <= 25 for n in sizes) and len(set(sizes)) >= 4
    assert 'Seed 0' in (out / 'README.txt').read_text()


def test_matched_training_sets_alternate_tiles_of_the_same_photos(demo):
    """Default --domains matched: blurry and sharp tiles come from the same photos (alike in colour), never
    the same tile, and in a checkerboard (no two tiles of one set side by side); val photos are others."""
    root, _ = demo
    out = root / 'a' / 'demo'
    blur, sharp = decoded(out / 'train_blur.lmdb'), decoded(out / 'train_sharp.lmdb')
    val = decoded(out / 'val_sharp.lmdb')
    blur_photos, sharp_photos, val_photos = ({photo_of(k) for k in d} for d in (blur, sharp, val))
    assert blur_photos == sharp_photos and len(blur_photos) == 5
    assert 'motorcycle_right' not in blur_photos  # the stereo twin would nearly pair the sets
    assert not set(blur) & set(sharp)
    assert not val_photos & blur_photos
    for key in blur:
        top, left = box_of(key)
        neighbours = {f'{photo_of(key)}-y{top + dy:04d}x{left + dx:04d}' for dy, dx in
                      ((0, 128), (128, 0), (0, -128), (-128, 0))}
        assert not neighbours & set(blur), key
    # alike in colour: the per-channel means of the two sets differ by less than 6 grey levels
    mean_b = np.mean([v.reshape(-1, 3).mean(0) for v in blur.values()], axis=0)
    mean_s = np.mean([v.reshape(-1, 3).mean(0) for v in sharp.values()], axis=0)
    assert np.abs(mean_b - mean_s).max() < 6, (mean_b, mean_s)
    # keys tell the truth: sharp tiles (and the blurry tiles' originals) are the named photo's pixels
    for images in (sharp, val, decoded(out / 'train_blur_gt.lmdb')):
        for key, tile in images.items():
            top, left = box_of(key)
            src = load_photo(photo_of(key))[top:top + 128, left:left + 128, ::-1]
            assert np.array_equal(tile, src)


def test_split_training_sets_come_from_disjoint_photos(demo):
    root, _ = demo
    out = root / 'split' / 'demo'
    blur, sharp = decoded(out / 'train_blur.lmdb'), decoded(out / 'train_sharp.lmdb')
    blur_photos, sharp_photos = ({photo_of(k) for k in d} for d in (blur, sharp))
    assert not blur_photos & sharp_photos
    # the motorcycle stereo pair (one scene from two viewpoints) stays on one side
    assert {'motorcycle_left', 'motorcycle_right'} <= sharp_photos
    assert set(decoded(out / 'train_blur_gt.lmdb')) == set(blur)
    # the val set does not depend on how the training tiles were drawn
    for name in ('val_blur', 'val_sharp'):
        assert raw_values(out / f'{name}.lmdb') == raw_values(root / 'a' / 'demo' / f'{name}.lmdb')
    assert json.loads((out / 'info.json').read_text())['domains'] == 'split'


def sharpness(x):
    g = x.astype(np.float64).mean(axis=2)
    return np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()


def test_blurry_images_are_blurred_aligned_versions_of_their_box(demo):
    root, _ = demo
    out = root / 'a' / 'demo'
    info = json.loads((out / 'info.json').read_text())
    val_b, val_s = decoded(out / 'val_blur.lmdb'), decoded(out / 'val_sharp.lmdb')
    for key in val_b:
        b, s = val_b[key].astype(np.float64), val_s[key].astype(np.float64)
        assert sharpness(val_b[key]) < 0.8 * sharpness(val_s[key])  # visibly blurred
        # the recorded kernel, applied as a true convolution (scipy, independent of the tool) to the photo
        # around the box, gives the blurry image up to the recorded noise
        kernel = np.load(out / 'val' / 'kernels' / f'{key}.npy')
        meta = info['images'][f'val/{key}']
        assert kernel.shape == (meta['kernel_size'],) * 2
        top, left = box_of(key)
        photo = load_photo(photo_of(key))[:, :, ::-1].astype(np.float64)
        r = kernel.shape[0] // 2
        padded = np.pad(photo, ((r, r), (r, r), (0, 0)), mode='reflect')
        region = padded[top:top + 128 + 2 * r, left:left + 128 + 2 * r]
        expected = np.stack([ndimage.convolve(region[:, :, c], kernel, mode='mirror') for c in range(3)], axis=2)
        residual = b - expected[r:r + 128, r:r + 128]
        sigma = meta['noise_sigma_255']
        assert abs(residual.mean()) < 0.2 and abs(residual.std() - sigma) < 0.3 * sigma + 0.3
        assert np.abs(residual).max() < 6 * sigma + 1
        # and no shift: the kernel's centre of mass is its centre pixel, so the blurry image is centred on
        # the sharp box (a best-matching integer shift can still be a few pixels off for a long, curved path)
        n = kernel.shape[0]
        yy, xx = np.mgrid[:n, :n]
        assert abs((kernel * yy).sum() - n // 2) < 1e-6 and abs((kernel * xx).sum() - n // 2) < 1e-6
        assert ((b - s) ** 2).mean() < ((b - np.roll(s, 8, axis=(0, 1))) ** 2).mean()
    gt = decoded(out / 'train_blur_gt.lmdb')
    for key, tile in decoded(out / 'train_blur.lmdb').items():
        assert sharpness(tile) < sharpness(gt[key])
        # paired with its original: closer to it than to any other original of the same photo
        err = {k: np.abs(tile.astype(float) - v).mean() for k, v in gt.items() if photo_of(k) == photo_of(key)}
        assert min(err, key=err.get) == key


def test_reproducible_bit_for_bit_and_seed_dependent(demo):
    root, _ = demo
    for name in LMDBS:
        a, b = raw_values(root / 'a' / 'demo' / f'{name}.lmdb'), raw_values(root / 'b' / 'demo' / f'{name}.lmdb')
        assert a == b
        with open(root / 'a' / 'demo' / f'{name}.lmdb' / 'meta_info.txt') as fa, \
                open(root / 'b' / 'demo' / f'{name}.lmdb' / 'meta_info.txt') as fb:
            assert fa.read() == fb.read()
    a, c = raw_values(root / 'a' / 'demo' / 'train_blur.lmdb'), raw_values(root / 'c' / 'demo' / 'train_blur.lmdb')
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)  # another seed: other kernels and noise
    for name in ('train_sharp', 'train_blur_gt'):
        assert raw_values(root / 'a' / 'demo' / f'{name}.lmdb') == raw_values(root / 'c' / 'demo' / f'{name}.lmdb')


def test_demo_feeds_the_datasets(demo):
    root, _ = demo
    out = root / 'a' / 'demo'
    ds = UnpairedImageDataset({'dataroot_blur': str(out / 'train_blur.lmdb'), 'io_backend': {'type': 'lmdb'},
                               'dataroot_sharp': str(out / 'train_sharp.lmdb'), 'phase': 'train', 'gt_size': 64,
                               'use_hflip': True, 'use_rot': True})
    assert ds[0]['lq'].shape == (3, 64, 64)
    val = PairedImageDataset({'dataroot_lq': str(out / 'val_blur.lmdb'), 'dataroot_gt': str(out / 'val_sharp.lmdb'),
                              'io_backend': {'type': 'lmdb'}, 'phase': 'val', 'scale': 1})
    assert len(val) == 4 and val[0]['lq'].shape == (3, 128, 128)


def test_existing_output_refused_unless_force(demo, tmp_path, capsys):
    out = tmp_path / 'demo'
    out.mkdir()
    (out / 'mine.txt').write_text('keep')
    code = tpdiff_main(['make-demo', '--output', str(out)])
    err = capsys.readouterr().err
    assert code == 2 and str(out) in err and '--force' in err
    assert os.listdir(out) == ['mine.txt']
    assert tpdiff_main(['make-demo', '--output', str(out), '--force']) == 0
    assert 'mine.txt' not in os.listdir(out) and 'train_blur.lmdb' in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ['demo']  # the old folder and the temporary one are gone
    root, _ = demo
    assert raw_values(out / 'val_blur.lmdb') == raw_values(root / 'a' / 'demo' / 'val_blur.lmdb')


def test_photos_folder_joins_the_matched_pool(demo, tmp_path):
    """--photos: a folder's photos are scaled to MAX_SIDE and tiled into both sets like the built-in ones."""
    rng = np.random.default_rng(3)
    photos = tmp_path / 'photos'
    photos.mkdir()
    big = cv2.resize(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8), (1800, 1200), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(photos / 'my-photo 1.png'), big)  # 1200x1800 -> 533x800
    info = build_demo(str(tmp_path / 'out'), seed=0, photos_dir=str(photos))
    blur, sharp = decoded(tmp_path / 'out' / 'train_blur.lmdb'), decoded(tmp_path / 'out' / 'train_sharp.lmdb')
    mine_b = [k for k in blur if photo_of(k) == 'my_photo_1']
    mine_s = [k for k in sharp if photo_of(k) == 'my_photo_1']
    assert len(mine_b) + len(mine_s) == (533 // 128) * (800 // 128)  # every tile is textured
    assert abs(len(mine_b) - len(mine_s)) <= 1 and info['photos_dir'] == str(photos)
    root, _ = demo
    assert raw_values(tmp_path / 'out' / 'val_blur.lmdb') == raw_values(root / 'a' / 'demo' / 'val_blur.lmdb')
    with pytest.raises(UserError, match='--photos: no such folder'):
        build_demo(str(tmp_path / 'x'), photos_dir=str(tmp_path / 'missing'))
    (photos / 'broken.jpg').write_bytes(b'not a jpeg')
    with pytest.raises(UserError, match='broken.jpg: not a readable image'):
        build_demo(str(tmp_path / 'y'), photos_dir=str(photos))
    assert not (tmp_path / 'y').exists()
    with pytest.raises(UserError, match='--domains matched'):
        build_demo(str(tmp_path / 'z'), photos_dir=str(photos), domains='split')
