"""tpdiff make-lmdb on tiny fake GoPro / HIDE / RealBlur / folder trees: pixels, keys, splits, errors."""
import json
import os

import cv2
import lmdb
import numpy as np
import pytest
import torch

from basicsr.data.paired_image_dataset import PairedImageDataset

from tpdiff_plugin.cli import tpdiff_main
from tpdiff_plugin.data.unpaired_image_dataset import UnpairedImageDataset
from tpdiff_plugin.tools.make_lmdb import Pair, collect_pairs, make_lmdbs, unpaired_split
from tpdiff_plugin.utils.errors import UserError

GOPRO_TRAIN = ['GOPR0372_07_00', 'GOPR0374_11_00', 'GOPR0378_13_00', 'GOPR0384_11_01', 'GOPR0477_11_00']
GOPRO_TEST = ['GOPR0384_11_00', 'GOPR0410_11_00']


def img(rng, shape=(40, 48, 3)):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def put(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return image


def lmdb_images(path):
    """{key: decoded image (unchanged)} of an LMDB."""
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {k.decode(): cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_UNCHANGED) for k, v in txn.cursor()}
    env.close()
    return out


def meta_keys(path):
    with open(os.path.join(path, 'meta_info.txt')) as f:
        return [line.split('.')[0] for line in f]  # exactly how basicsr parses it


def scene_of(key):
    return key.split('-', 1)[0]


@pytest.fixture
def gopro(tmp_path):
    """GOPRO_Large layout: {split: {key: (blur, sharp)}} of the images written."""
    rng = np.random.default_rng(0)
    root = tmp_path / 'GOPRO_Large'
    truth = {}
    for split, scenes in (('train', GOPRO_TRAIN), ('test', GOPRO_TEST)):
        truth[split] = {}
        for scene in scenes:
            for frame in ('000001', '000002', '000047'):
                b = put(root / split / scene / 'blur' / f'{frame}.png', img(rng))
                s = put(root / split / scene / 'sharp' / f'{frame}.png', img(rng))
                truth[split][f'{scene}-{frame}'] = (b, s)
    (root / 'train' / 'notes.txt').write_text('not a scene')  # stray files are ignored
    return root, truth


def test_gopro_test_split_is_paired_and_exact(gopro, tmp_path):
    root, truth = gopro
    out = tmp_path / 'lmdb'
    res = make_lmdbs('gopro', str(root), str(out), split='test', quiet=True)
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    assert os.path.basename(res['blur']) == 'gopro_test_blur.lmdb'
    assert set(blur) == set(sharp) == set(truth['test'])  # identical keys, scene in each key
    assert meta_keys(res['blur']) == meta_keys(res['sharp'])
    for key, (b, s) in truth['test'].items():
        assert np.array_equal(blur[key], b) and np.array_equal(sharp[key], s)
    assert sorted(os.listdir(out)) == ['gopro_test_blur.lmdb', 'gopro_test_sharp.lmdb']  # no leftovers

    # basicsr's own paired dataset accepts the pair and reads the source pixels
    ds = PairedImageDataset({'dataroot_lq': res['blur'], 'dataroot_gt': res['sharp'], 'io_backend': {'type': 'lmdb'},
                             'phase': 'val', 'scale': 1})
    assert len(ds) == len(truth['test'])
    for i in range(len(ds)):
        item = ds[i]
        b, s = truth['test'][item['lq_path']]
        assert item['gt_path'] == item['lq_path']
        assert torch.equal(item['lq'], torch.from_numpy(b[:, :, ::-1].transpose(2, 0, 1) / 255.).float())
        assert torch.equal(item['gt'], torch.from_numpy(s[:, :, ::-1].transpose(2, 0, 1) / 255.).float())


def test_gopro_unpaired_train_split_has_no_leak(gopro, tmp_path):
    root, truth = gopro
    out = tmp_path / 'lmdb'
    res = make_lmdbs('gopro', str(root), str(out), split='train', unpaired=True, seed=0, quiet=True)
    assert sorted(os.listdir(out)) == ['gopro_train_blur.lmdb', 'gopro_train_sharp.lmdb', 'gopro_train_split.json']
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    blur_scenes, sharp_scenes = {scene_of(k) for k in blur}, {scene_of(k) for k in sharp}
    assert not blur_scenes & sharp_scenes  # no scene on both sides, so no pair can leak
    assert blur_scenes | sharp_scenes == set(GOPRO_TRAIN)
    assert abs(len(blur_scenes) - len(sharp_scenes)) <= 1
    for key, image in blur.items():  # blurry frames in the blur set, sharp frames in the sharp set
        assert np.array_equal(image, truth['train'][key][0])
    for key, image in sharp.items():
        assert np.array_equal(image, truth['train'][key][1])
    info = json.loads((out / 'gopro_train_split.json').read_text())
    assert set(info['blur_scenes']) == blur_scenes and set(info['sharp_scenes']) == sharp_scenes
    assert info['seed'] == 0

    # the unpaired LMDBs feed UnpairedImageDataset directly
    ds = UnpairedImageDataset({'dataroot_blur': res['blur'], 'dataroot_sharp': res['sharp'], 'phase': 'train',
                               'io_backend': {'type': 'lmdb'}, 'gt_size': 32, 'use_hflip': True, 'use_rot': True})
    item = ds[0]
    assert scene_of(item['lq_path']) in blur_scenes and scene_of(item['ref_path']) in sharp_scenes


def test_unpaired_split_is_seeded():
    items = [Pair(f'scene{i}', f'scene{i}-0', f'b{i}', f's{i}') for i in range(8)]
    first = unpaired_split(items, 0)
    assert unpaired_split(items, 0) == first
    halves = {tuple(unpaired_split(items, seed)[2]) for seed in range(10)}
    assert len(halves) > 1  # the seed changes the split
    for seed in range(10):
        _, _, a, b = unpaired_split(items, seed)
        assert len(a) == len(b) == 4 and not set(a) & set(b)


def test_gopro_paired_train_without_unpaired_flag(gopro, tmp_path):
    root, truth = gopro
    res = make_lmdbs('gopro', str(root), str(tmp_path / 'o'), split='train', quiet=True)
    assert res['blur'].endswith('gopro_train_paired_blur.lmdb')
    assert set(lmdb_images(res['blur'])) == set(lmdb_images(res['sharp'])) == set(truth['train'])


@pytest.fixture
def hide(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / 'HIDE_dataset'
    truth = {'train': {}, 'test': {}}
    for name, sub, split in [('1fromGOPR0950.MP4.png', 'train', 'train'), ('2fromGOPR0950.MP4.png', 'train', 'train'),
                             ('5fromGOPR1011.MP4.png', 'train', 'train'), ('7fromGOPR1096.MP4.png', 'train', 'train'),
                             ('3fromGOPR0951.MP4.png', 'test/test-close-ups', 'test'),
                             ('9fromGOPR1100.MP4.png', 'test/test-long-shot', 'test')]:
        b = put(root / sub / name, img(rng))
        s = put(root / 'GT' / name, img(rng))
        truth[split][name] = (b, s)
    return root, truth


def test_hide_layout(hide, tmp_path):
    root, truth = hide
    res = make_lmdbs('hide', str(root), str(tmp_path / 'o'), split='test', quiet=True)
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    # both test folders; the key carries the source video; no dots (basicsr splits keys at the first dot)
    assert set(blur) == set(sharp) == {'GOPR0951-3fromGOPR0951_MP4', 'GOPR1100-9fromGOPR1100_MP4'}
    assert np.array_equal(blur['GOPR1100-9fromGOPR1100_MP4'], truth['test']['9fromGOPR1100.MP4.png'][0])
    assert np.array_equal(sharp['GOPR1100-9fromGOPR1100_MP4'], truth['test']['9fromGOPR1100.MP4.png'][1])
    assert meta_keys(res['blur']) == sorted(blur)

    res = make_lmdbs('hide', str(root), str(tmp_path / 'u'), split='train', unpaired=True, seed=3, quiet=True)
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    assert not {scene_of(k) for k in blur} & {scene_of(k) for k in sharp}
    assert {scene_of(k) for k in blur} | {scene_of(k) for k in sharp} == {'GOPR0950', 'GOPR1011', 'GOPR1096'}


@pytest.fixture
def realblur(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / 'RealBlur'
    truth = {}
    for variant in ('J', 'R'):
        folder = f'RealBlur-{variant}_ECC_IMCORR_centroid_itensity_ref'
        for split, scenes in (('train', ['scene001', 'scene002', 'scene003']), ('test', ['scene230'])):
            lines = []
            for scene in scenes:
                for i in (1, 2):
                    gt, blur = f'{folder}/{scene}/gt/gt_{i}.png', f'{folder}/{scene}/blur/blur_{i}.png'
                    truth[(variant, split, f'{scene}-{i}')] = (put(root / blur, img(rng)), put(root / gt, img(rng)))
                    lines.append(f'{gt} {blur}\n')
            (root / f'RealBlur_{variant}_{split}_list.txt').write_text(''.join(lines))
    return root, truth


@pytest.mark.parametrize('variant', ['J', 'R'])
def test_realblur_lists(realblur, tmp_path, variant):
    root, truth = realblur
    layout = f'realblur_{variant.lower()}'
    res = make_lmdbs(layout, str(root), str(tmp_path / 'o'), split='test', quiet=True)
    assert res['blur'].endswith(f'{layout}_test_blur.lmdb')
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    assert set(blur) == set(sharp) == {'scene230-1', 'scene230-2'}
    for key in blur:  # the right variant's files, blur from the second column, gt from the first
        assert np.array_equal(blur[key], truth[(variant, 'test', key)][0])
        assert np.array_equal(sharp[key], truth[(variant, 'test', key)][1])
    res = make_lmdbs(layout, str(root), str(tmp_path / 'u'), split='train', unpaired=True, quiet=True)
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    assert not {scene_of(k) for k in blur} & {scene_of(k) for k in sharp}
    for key in blur:
        assert np.array_equal(blur[key], truth[(variant, 'train', key)][0])


def test_folder_layout_and_colour_rule(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / 'photos'
    rgb = put(src / 'a.png', img(rng))
    sub = put(src / 'more' / 'b c.jpg', img(rng, (32, 32, 3)))
    gray = put(src / 'gray.png', img(rng, (20, 24)))
    deep = put(src / 'deep.png', rng.integers(0, 65536, (20, 24, 3), dtype=np.uint16))
    rgba = img(rng, (20, 24, 4))
    rgba[:, :, 3] = 255
    put(src / 'rgba.png', rgba)
    res = make_lmdbs('folder', str(src), str(tmp_path / 'o'), quiet=True)
    assert res['images'].endswith('photos.lmdb')
    got = lmdb_images(res['images'])
    assert set(got) == {'a', 'more_b_c', 'gray', 'deep', 'rgba'}
    assert np.array_equal(got['a'], rgb)
    assert np.array_equal(got['more_b_c'], cv2.imread(str(src / 'more' / 'b c.jpg')))  # decoded JPEG pixels
    assert sub.shape == got['more_b_c'].shape
    assert np.array_equal(got['gray'], np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(got['deep'], (deep >> 8).astype(np.uint8))
    assert np.array_equal(got['rgba'], rgba[:, :, :3])
    assert all(v.dtype == np.uint8 and v.shape[2] == 3 for v in got.values())
    with open(os.path.join(res['images'], 'meta_info.txt')) as f:
        assert 'gray.png (20,24,3) 1' in f.read().splitlines()
    assert res['converted'] == {'gray -> RGB': 1, '16-bit -> 8-bit': 1, 'opaque alpha dropped': 1}


# ------------------------------------------------------------------------------------------ errors

def run_cli(capsys, *argv):
    code = tpdiff_main(['make-lmdb', *argv])
    return code, capsys.readouterr().err


def looks_complete(folder):
    """Anything in ``folder`` that could pass for an LMDB or a split file."""
    return [n for n in os.listdir(folder) if n.endswith(('.lmdb', '.json'))] if os.path.isdir(folder) else []


def test_cli_errors_name_the_culprit(gopro, tmp_path, capsys):
    root, _ = gopro
    out = str(tmp_path / 'o')
    code, err = run_cli(capsys, '--layout', 'gopr', '--input', str(root), '--output', out, '--split', 'test')
    assert code == 2 and "'gopr'" in err and 'gopro, hide, realblur_j, realblur_r, rsblur, rb2v, folder' in err
    code, err = run_cli(capsys, '--layout', 'gopro', '--input', str(tmp_path / 'nope'), '--output', out,
                        '--split', 'test')
    assert code == 2 and 'nope' in err
    code, err = run_cli(capsys, '--layout', 'gopro', '--input', str(root / 'train'), '--output', out,
                        '--split', 'test')
    assert code == 2 and 'expected' in err and 'blur' in err and 'sharp' in err
    code, err = run_cli(capsys, '--layout', 'hide', '--input', str(root), '--output', out, '--split', 'test')
    assert code == 2 and 'GT/' in err and 'HIDE' in err
    code, err = run_cli(capsys, '--layout', 'realblur_j', '--input', str(root), '--output', out, '--split', 'test')
    assert code == 2 and 'RealBlur_J_test_list.txt' in err
    code, err = run_cli(capsys, '--layout', 'gopro', '--input', str(root), '--output', out)
    assert code == 2 and '--split' in err
    code, err = run_cli(capsys, '--layout', 'gopro', '--input', str(root), '--output', out, '--split', 'test',
                        '--unpaired')
    assert code == 2 and '--unpaired' in err
    code, err = run_cli(capsys, '--layout', 'gopro', '--input', str(root), '--output', out, '--split', 'train',
                        '--unpaired', '--protocol', 'whole')
    assert code == 2 and "--protocol: unknown protocol 'whole'; one of: scene_split, whole_set" in err
    code, err = run_cli(capsys, '--layout', 'gopro', '--input', str(root), '--output', out, '--split', 'train',
                        '--protocol', 'whole_set')
    assert code == 2 and '--protocol whole_set: only with --unpaired' in err
    assert not os.path.exists(out)  # nothing was created by any of these


def test_existing_output_is_refused_and_untouched(gopro, tmp_path, capsys):
    root, _ = gopro
    out = tmp_path / 'o'
    (out / 'gopro_test_sharp.lmdb').mkdir(parents=True)
    (out / 'gopro_test_sharp.lmdb' / 'mine.txt').write_text('keep me')
    code, err = run_cli(capsys, '--layout', 'gopro', '--input', str(root), '--output', str(out), '--split', 'test')
    assert code == 2 and 'gopro_test_sharp.lmdb already exists' in err
    assert sorted(os.listdir(out)) == ['gopro_test_sharp.lmdb']  # the blur LMDB was not written either
    assert os.listdir(out / 'gopro_test_sharp.lmdb') == ['mine.txt']
    assert (out / 'gopro_test_sharp.lmdb' / 'mine.txt').read_text() == 'keep me'


def test_failed_build_leaves_nothing_that_looks_complete(gopro, tmp_path, capsys):
    root, _ = gopro
    # the blur LMDB is written first and would succeed; a corrupt sharp frame fails the second one
    (root / 'test' / GOPRO_TEST[1] / 'sharp' / '000047.png').write_bytes(b'not a png')
    out = tmp_path / 'o'
    code, err = run_cli(capsys, '--layout', 'gopro', '--input', str(root), '--output', str(out), '--split', 'test')
    assert code == 2 and '000047.png' in err and 'decode' in err
    assert not os.path.exists(out)  # created by the run, removed again: no LMDB and no partial folder
    out.mkdir()
    (out / 'other.txt').write_text('x')
    assert run_cli(capsys, '--layout', 'gopro', '--input', str(root), '--output', str(out), '--split', 'test')[0] == 2
    assert os.listdir(out) == ['other.txt']  # an existing output folder keeps only what it had


def test_layout_mismatches(gopro, hide, realblur, tmp_path):
    root, _ = gopro
    os.remove(root / 'train' / GOPRO_TRAIN[0] / 'sharp' / '000002.png')
    with pytest.raises(UserError, match=rf"{GOPRO_TRAIN[0]}.*'000002'"):
        make_lmdbs('gopro', str(root), str(tmp_path / 'o'), split='train')
    hide_root, _ = hide
    os.remove(hide_root / 'GT' / '5fromGOPR1011.MP4.png')
    with pytest.raises(UserError, match=r'5fromGOPR1011\.MP4\.png has no sharp counterpart'):
        make_lmdbs('hide', str(hide_root), str(tmp_path / 'o'), split='train')
    rb_root, _ = realblur
    with open(rb_root / 'RealBlur_R_test_list.txt', 'a') as f:
        f.write('only_one_column.png\n')
    with pytest.raises(UserError, match=r'RealBlur_R_test_list\.txt line 3'):
        make_lmdbs('realblur_r', str(rb_root), str(tmp_path / 'o'), split='test')
    with pytest.raises(UserError, match='at least 2'):  # one scene cannot be split in two halves
        unpaired_split(collect_pairs('realblur_j', str(rb_root), 'test'), 0)
    assert looks_complete(tmp_path / 'o') == []


def test_transparent_image_is_refused(tmp_path, capsys):
    src = tmp_path / 'photos'
    rgba = np.full((20, 24, 4), 200, np.uint8)
    rgba[3, 4, 3] = 10
    put(src / 'a.png', np.zeros((20, 24, 3), np.uint8))
    put(src / 'ghost.png', rgba)
    code, err = run_cli(capsys, '--layout', 'folder', '--input', str(src), '--output', str(tmp_path / 'o'))
    assert code == 2 and 'ghost.png' in err and 'transparent' in err
    assert not os.path.exists(tmp_path / 'o')


def test_console_script(gopro, tmp_path, cli_runner):
    root, truth = gopro
    r = cli_runner(['tpdiff', 'make-lmdb', '--layout', 'gopro', '--input', str(root), '--output',
                    str(tmp_path / 'o'), '--split', 'test'], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'gopro_test_blur.lmdb (6 images)' in r.stdout
    assert set(lmdb_images(tmp_path / 'o' / 'gopro_test_blur.lmdb')) == set(truth['test'])
