"""Fuzzed LMDBs (basicsr layout) through every LMDB reader: success, or one clear UserError line.

A valid 3-image LMDB is copied and damaged per example: ``meta_info.txt`` rewritten (lines of the right shape
with wrong numbers, unknown or duplicate keys, random text, non-UTF-8 bytes, byte edits), values replaced by
fuzzed image bytes, keys removed or added, and ``data.mdb`` truncated or byte-edited. Readers:
``check_lmdb`` / ``read_meta_info`` / ``check_lmdb_complete`` / ``verify_lmdb`` and ``UnpairedImageDataset``
(construction, then every item). A damaged ``data.mdb`` is read in a forked child: lmdb maps the file, so a
crash there must not take the test run with it.
"""
import shutil

import cv2
import lmdb
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import _EDIT, fuzz_settings, isolated, mutate, mutated_bytes, outcome
from tpdiff_plugin.data import image_checks
from tpdiff_plugin.data.unpaired_image_dataset import UnpairedImageDataset

KEYS = ['k0', 'k1', 'k2']
SHAPE = (12, 10, 3)
PATCH = 8


def write_lmdb(path, values, meta_lines):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key.encode('ascii'), value)
    env.close()
    (path / 'meta_info.txt').write_text(''.join(line + '\n' for line in meta_lines))


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """A valid LMDB as basicsr writes it (PNG values, ``<key>.png (h,w,c) 1`` lines) and a clean sharp one."""
    root = tmp_path_factory.mktemp('fuzz_lmdb')
    rng = np.random.default_rng(0)
    values = {k: cv2.imencode('.png', rng.integers(0, 256, SHAPE, dtype=np.uint8))[1].tobytes() for k in KEYS}
    meta = [f'{k}.png ({SHAPE[0]},{SHAPE[1]},{SHAPE[2]}) 1' for k in KEYS]
    for name in ('clean.lmdb', 'sharp.lmdb'):
        (root / name).mkdir()
        write_lmdb(root / name, values, meta)
    return root, values, meta


_NUMBER = st.one_of(st.integers(0, 20), st.just(10 ** 30), st.sampled_from([SHAPE[0], SHAPE[1], 3]))
_META_LINE = st.one_of(
    st.builds(lambda k, h, w, c, ext: f'{k}{ext} ({h},{w},{c}) 1', st.sampled_from(KEYS + ['zz', 'k0.x', '']),
              _NUMBER, _NUMBER, _NUMBER, st.sampled_from(['.png', '', '.']),),
    st.text(max_size=40))


@st.composite
def damage(draw):
    """A list of damage steps for one LMDB copy."""
    steps = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(['meta_lines', 'meta_bytes', 'value', 'drop_key', 'add_key', 'mdb']))
        if kind == 'meta_lines':
            steps.append((kind, draw(st.lists(_META_LINE, max_size=5))))
        elif kind in ('meta_bytes', 'mdb'):
            steps.append((kind, draw(st.lists(_EDIT, min_size=1, max_size=4))))
        elif kind == 'value':
            steps.append((kind, (draw(st.sampled_from(KEYS)), draw(mutated_bytes()))))
        else:
            steps.append((kind, draw(st.sampled_from(KEYS + ['new']))))
    return steps


def apply(path, values, meta, steps):
    """Rebuild the LMDB at ``path`` with ``steps`` applied; True when data.mdb itself was edited."""
    values, meta_text = dict(values), ''.join(line + '\n' for line in meta).encode()
    mdb_edits = []
    for kind, arg in steps:
        if kind == 'meta_lines':
            meta_text = ''.join(line + '\n' for line in arg).encode('utf-8', errors='surrogatepass')
        elif kind == 'meta_bytes':
            meta_text = mutate(meta_text, arg)
        elif kind == 'value':
            values[arg[0]] = arg[1] or b'\x00'  # lmdb stores no empty values... almost: keep one byte
        elif kind == 'drop_key':
            values.pop(arg, None)
        elif kind == 'add_key':
            values[arg + '_extra'] = values.get(arg, b'junk')
        else:
            mdb_edits.extend(arg)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()
    write_lmdb(path, values, [])
    (path / 'meta_info.txt').write_bytes(meta_text)
    if mdb_edits:
        data = path / 'data.mdb'
        data.write_bytes(mutate(data.read_bytes(), mdb_edits))
    return bool(mdb_edits)


def read_everything(root, sharp, expected):
    """Every LMDB reader on ``root``; a dataset's items too (``root`` blurry, ``sharp`` clean)."""
    entries, _ = outcome(image_checks.check_lmdb, root, 'dataroot_blur')
    outcome(image_checks.verify_lmdb, root, expected)
    for phase in ('train', 'val'):
        opt = {'name': 'fuzz', 'type': 'UnpairedImageDataset', 'phase': phase, 'io_backend': {'type': 'lmdb'},
               'dataroot_blur': root, 'dataroot_sharp': sharp, 'gt_size': PATCH}
        dataset, _ = outcome(UnpairedImageDataset, opt)
        if dataset is None:
            continue
        for index in range(len(dataset)):
            item, _ = outcome(dataset.__getitem__, index)
            if item is not None:
                assert item['lq'].dtype == torch.float32 and item['lq'].shape[0] == 3
                assert phase != 'train' or tuple(item['lq'].shape) == (3, PATCH, PATCH)
    return entries


@fuzz_settings(2)
@given(damage())
def test_damaged_lmdb(base, steps):
    root, values, meta = base
    path = root / 'fuzzed.lmdb'
    mdb_edited = apply(path, values, meta, steps)
    expected = {k: SHAPE for k in KEYS}
    if mdb_edited:  # lmdb maps data.mdb: a crash must not take the test run with it
        isolated(read_everything, str(path), str(root / 'sharp.lmdb'), expected)
    else:
        read_everything(str(path), str(root / 'sharp.lmdb'), expected)


def test_the_undamaged_lmdb_reads(base):
    root, _, _ = base
    entries = read_everything(str(root / 'clean.lmdb'), str(root / 'sharp.lmdb'), {k: SHAPE for k in KEYS})
    assert entries == [(k, SHAPE) for k in KEYS]


@pytest.fixture(scope='module')
def big_mdb(tmp_path_factory):
    """data.mdb of a 300-key LMDB with branch pages and values in overflow pages (2-9000 bytes)."""
    path = tmp_path_factory.mktemp('fuzz_big') / 'big.lmdb'
    rng = np.random.default_rng(1)
    write_lmdb(path, {f'img_{i:04d}': rng.bytes(int(rng.integers(2, 9000))) for i in range(300)}, [])
    return (path / 'data.mdb').read_bytes()


def read_all_values(path):
    """What the training loop does with an LMDB that passed the check: every key, then every value."""
    image_checks.check_lmdb_complete(path, 'dataroot_blur')
    keys = image_checks.lmdb_keys(path)
    env = lmdb.open(path, readonly=True, lock=False, readahead=False)
    with env.begin(write=False) as txn:
        for key in keys:
            value = txn.get(key.encode('ascii', errors='replace'))
            assert value is None or len(bytes(value)) >= 0
    env.close()


@fuzz_settings(2)
@given(st.lists(_EDIT, min_size=1, max_size=4))
def test_damaged_data_mdb_pages(big_mdb, tmp_path_factory, edits):
    path = tmp_path_factory.getbasetemp() / 'fuzz_big_damaged.lmdb'
    path.mkdir(exist_ok=True)
    (path / 'data.mdb').write_bytes(mutate(big_mdb, edits))
    isolated(read_all_values, str(path))
