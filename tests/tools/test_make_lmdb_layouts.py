"""tpdiff make-lmdb: the RSBlur and RB2V layouts on fixture trees that mimic them, and the whole-set protocol.

RSBlur (Rim et al., ECCV 2022): ``RSBlur/<session>/<frame>/{real_blur/real_blur.png, gt/gt_sharp.png}`` and the
repository's lists ``datalist/RSBlur/RSBlur_real_<split>.txt`` (``<gt> <blur>`` lines). RB2V (HyperCUT):
``<seq>/blur/NNNN.png``, ``<seq>/sharp/NNNN_<1..7>.png`` and ``metadata.json`` with a partition per entry.
"""
import json
import os

import numpy as np
import pytest

from tpdiff_plugin.data.dataset_layouts import collect_pairs, unpaired_sets
from tpdiff_plugin.tools.make_lmdb import make_lmdbs
from tpdiff_plugin.utils.errors import UserError
from test_make_lmdb import GOPRO_TRAIN, gopro, img, lmdb_images, put, scene_of  # noqa: F401 (gopro: a fixture)


@pytest.fixture
def rsblur(tmp_path):
    """The RSBlur download beside the repository's datalist folder; {(split, key): (blur, sharp)}."""
    rng = np.random.default_rng(3)
    root = tmp_path / 'rsblur_root'
    truth = {}
    for split, frames in (('train', [('0019', '000722'), ('0019', '000723'), ('0002', '000100'), ('0005', '000007')]),
                          ('test', [('0001', '000022'), ('0001', '000023')])):
        lines = []
        for session, frame in frames:
            blur = f'RSBlur/{session}/{frame}/real_blur/real_blur.png'
            gt = f'RSBlur/{session}/{frame}/gt/gt_sharp.png'
            # the synthetic blur of the same frame is in the download too; the lists never name it
            put(root / f'RSBlur/{session}/{frame}/avg65_img/avg_blur.png', img(rng))
            truth[(split, f'{session}-{frame}')] = (put(root / blur, img(rng)), put(root / gt, img(rng)))
            lines.append(f'{gt} {blur}\n')
        (root / 'datalist' / 'RSBlur').mkdir(parents=True, exist_ok=True)
        (root / 'datalist' / 'RSBlur' / f'RSBlur_real_{split}.txt').write_text(''.join(lines))
    return root, truth


def test_rsblur_layout(rsblur, tmp_path):
    root, truth = rsblur
    res = make_lmdbs('rsblur', str(root), str(tmp_path / 'o'), split='test', quiet=True)
    assert os.path.basename(res['blur']) == 'rsblur_test_blur.lmdb'
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    assert set(blur) == set(sharp) == {'0001-000022', '0001-000023'}
    for key in blur:  # the real blur (second column), not the synthetic one; gt from the first column
        assert np.array_equal(blur[key], truth[('test', key)][0])
        assert np.array_equal(sharp[key], truth[('test', key)][1])
    # the list may also sit in the root itself; the session is the scene of the unpaired split
    os.rename(root / 'datalist' / 'RSBlur' / 'RSBlur_real_train.txt', root / 'RSBlur_real_train.txt')
    res = make_lmdbs('rsblur', str(root), str(tmp_path / 'u'), split='train', unpaired=True, quiet=True)
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    assert not {scene_of(k) for k in blur} & {scene_of(k) for k in sharp}
    assert {scene_of(k) for k in blur} | {scene_of(k) for k in sharp} == {'0019', '0002', '0005'}
    for key in blur:
        assert np.array_equal(blur[key], truth[('train', key)][0])
    for key in sharp:
        assert np.array_equal(sharp[key], truth[('train', key)][1])


def test_rsblur_errors(rsblur, tmp_path):
    root, _ = rsblur
    os.remove(root / 'datalist' / 'RSBlur' / 'RSBlur_real_test.txt')
    with pytest.raises(UserError, match=r'no RSBlur_real_test\.txt .*datalist/RSBlur'):
        make_lmdbs('rsblur', str(root), str(tmp_path / 'o'), split='test')
    os.remove(root / 'RSBlur/0002/000100/gt/gt_sharp.png')
    with pytest.raises(UserError, match=r'RSBlur_real_train\.txt line 3: file not found: .*0002/000100/gt'):
        make_lmdbs('rsblur', str(root), str(tmp_path / 'o'), split='train')


@pytest.fixture
def rb2v(tmp_path):
    """One RB2V category (Street) in HyperCUT's format; {(partition, key): (blur, middle sharp frame)}."""
    rng = np.random.default_rng(4)
    root = tmp_path / 'RB2V' / 'Street'
    truth, data = {}, []
    for seq, frame, partition in (('00000', '0000', 'train'), ('00000', '0001', 'train'), ('00001', '0000', 'train'),
                                  ('00002', '0000', 'train'), ('00007', '0003', 'test')):
        entry = {'id': f'{seq}/{frame}', 'order': 'ignore', 'partition': partition,
                 'blur_path': f'{seq}/blur/{frame}.png'}
        blur = put(root / entry['blur_path'], img(rng))
        frames = []
        for t in range(1, 8):
            entry[f'frame{t:03d}_path'] = f'{seq}/sharp/{frame}_{t}.png'
            frames.append(put(root / entry[f'frame{t:03d}_path'], img(rng)))
        truth[(partition, f'{seq}-{frame}')] = (blur, frames[3])  # frame004: the middle of the exposure
        data.append(entry)
    (root / 'metadata.json').write_text(json.dumps({'name': 'Street', 'frame_per_seq': 7, 'data': data}))
    return root, truth


def test_rb2v_layout(rb2v, tmp_path):
    root, truth = rb2v
    res = make_lmdbs('rb2v', str(root), str(tmp_path / 'o'), split='test', name='rb2v_street', quiet=True)
    assert os.path.basename(res['sharp']) == 'rb2v_street_test_sharp.lmdb'
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    assert set(blur) == set(sharp) == {'00007-0003'}  # the test partition only
    assert np.array_equal(blur['00007-0003'], truth[('test', '00007-0003')][0])
    assert np.array_equal(sharp['00007-0003'], truth[('test', '00007-0003')][1])
    res = make_lmdbs('rb2v', str(root), str(tmp_path / 'u'), split='train', unpaired=True, seed=1, quiet=True)
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    assert not {scene_of(k) for k in blur} & {scene_of(k) for k in sharp}
    assert {scene_of(k) for k in blur} | {scene_of(k) for k in sharp} == {'00000', '00001', '00002'}
    for key in sharp:
        assert np.array_equal(sharp[key], truth[('train', key)][1])


def test_rb2v_errors(rb2v, tmp_path):
    root, _ = rb2v
    with pytest.raises(UserError, match=r'no metadata\.json; expected the RB2V layout'):
        make_lmdbs('rb2v', str(root.parent), str(tmp_path / 'o'), split='test')
    meta = json.loads((root / 'metadata.json').read_text())
    del meta['data'][4]['frame004_path']
    (root / 'metadata.json').write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"data\[4\] has no 'frame004_path'"):
        make_lmdbs('rb2v', str(root), str(tmp_path / 'o'), split='test')
    (root / 'metadata.json').write_text('{"frame_per_seq": 7')
    with pytest.raises(UserError, match=r'metadata\.json: not readable'):
        make_lmdbs('rb2v', str(root), str(tmp_path / 'o'), split='test')
    assert not os.path.exists(tmp_path / 'o')


def test_whole_set_protocol(gopro, tmp_path):
    """Every blurry frame in one LMDB, every sharp frame in the other; recorded; the scene split is unchanged."""
    root, truth = gopro
    out = tmp_path / 'lmdb'
    res = make_lmdbs('gopro', str(root), str(out), split='train', unpaired=True, protocol='whole_set', quiet=True)
    assert sorted(os.listdir(out)) == ['gopro_train_all_blur.lmdb', 'gopro_train_all_sharp.lmdb',
                                       'gopro_train_all_split.json']
    blur, sharp = lmdb_images(res['blur']), lmdb_images(res['sharp'])
    assert set(blur) == set(sharp) == set(truth['train'])
    for key, (b, s) in truth['train'].items():
        assert np.array_equal(blur[key], b) and np.array_equal(sharp[key], s)
    info = json.loads((out / 'gopro_train_all_split.json').read_text())
    assert info['protocol'] == 'whole_set' and info['n_blur'] == info['n_sharp'] == len(truth['train'])
    assert info['scenes'] == sorted(GOPRO_TRAIN)
    # both protocols from the same pairs: the split takes about half on each side, the whole set all of it
    pairs = collect_pairs('gopro', str(root), 'train')
    split_blur, split_sharp, split_info = unpaired_sets(pairs, 'scene_split', 0)
    assert split_info['protocol'] == 'scene_split' and len(split_blur) + len(split_sharp) == len(pairs)
    assert len(unpaired_sets(pairs, 'whole_set', 0)[0]) == len(pairs)
