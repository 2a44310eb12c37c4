"""tpdiff make-demo: layout, counts, disjoint unpaired training photos, paired aligned val, reproducibility."""
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
from tpdiff_plugin.tools.make_demo import build_demo, load_photo

LMDBS = ('train_blur', 'train_sharp', 'val_blur', 'val_sharp')


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
    return root, info


def test_layout_and_counts(demo):
    root, info = demo
    out = root / 'a' / 'demo'
    assert sorted(os.listdir(out)) == ['README.txt', 'info.json', 'train_blur.lmdb', 'train_sharp.lmdb', 'val',
                                       'val_blur.lmdb', 'val_sharp.lmdb']
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


def test_training_sets_come_from_disjoint_photos_and_val_from_others(demo):
    root, _ = demo
    out = root / 'a' / 'demo'
    blur, sharp = decoded(out / 'train_blur.lmdb'), decoded(out / 'train_sharp.lmdb')
    val = decoded(out / 'val_sharp.lmdb')
    blur_photos, sharp_photos, val_photos = ({photo_of(k) for k in d} for d in (blur, sharp, val))
    assert not blur_photos & sharp_photos
    assert not val_photos & (blur_photos | sharp_photos)
    # the motorcycle stereo pair (one scene from two viewpoints) stays on one side
    assert {'motorcycle_left', 'motorcycle_right'} <= sharp_photos
    # keys tell the truth: sharp tiles are the named photo's pixels at the named box
    for images in (sharp, val):
        for key, tile in images.items():
            top, left = box_of(key)
            src = load_photo(photo_of(key))[top:top + 128, left:left + 128, ::-1]
            assert np.array_equal(tile, src)


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
        # and no shift: among integer shifts, the sharp image matches best (nearly) where it is
        m = 12
        err = {(dy, dx): ((b[m:-m, m:-m] - s[m + dy:128 - m + dy, m + dx:128 - m + dx]) ** 2).mean()
               for dy in range(-6, 7) for dx in range(-6, 7)}
        best = min(err, key=err.get)
        assert abs(best[0]) <= 2 and abs(best[1]) <= 2
    for key, tile in decoded(out / 'train_blur.lmdb').items():
        top, left = box_of(key)
        src = load_photo(photo_of(key))[top:top + 128, left:left + 128, ::-1]
        assert sharpness(tile) < sharpness(src)


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
    assert raw_values(root / 'a' / 'demo' / 'train_sharp.lmdb') == raw_values(root / 'c' / 'demo' / 'train_sharp.lmdb')


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
