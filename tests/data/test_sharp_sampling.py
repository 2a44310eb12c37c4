"""UnpairedImageDataset's ``sharp_sampling``: random (unchanged), clustered (a batch from one scene), single."""
import collections
import os
import random

import pytest
import torch
import yaml

from basicsr.data.data_sampler import EnlargedSampler
from tpdiff_plugin.data.unpaired_image_dataset import UnpairedImageDataset
from tpdiff_plugin.option_check import validate_schema
from tpdiff_plugin.utils.errors import UserError
from test_unpaired_image_dataset import basicsr_lmdb, make, sources, to_bgr_uint8, write_images  # noqa: F401

SCENES = {'alley': 3, 'bridge': 2, 'canal': 1}  # sharp images per scene


@pytest.fixture
def scenes(tmp_path, sources):  # noqa: F811 (a fixture)
    """The 3 blurry images of ``sources`` and 6 sharp images named <scene>-<frame>, as an LMDB and as a folder
    with one sub-folder per scene."""
    names = [f'{s}-{i}' for s, n in SCENES.items() for i in range(n)]
    write_images(tmp_path / 'sharp_scenes', names, seed=3)
    for s, n in SCENES.items():
        write_images(tmp_path / 'sharp_tree' / s, [f'{i:03d}' for i in range(n)], seed=4)
    return dict(sources, sharp_lmdb=basicsr_lmdb(str(tmp_path / 'sharp_scenes'), str(tmp_path / 'scenes.lmdb')),
                sharp_dir=str(tmp_path / 'sharp_tree'))


def scene(ref_path):
    """The scene of an LMDB key (``alley-2``) or of a file of the scene tree (``.../alley/002.png``)."""
    return os.path.basename(os.path.dirname(ref_path)) if os.path.isabs(ref_path) else ref_path.split('-')[0]


def test_random_draws_are_the_draws_of_before(sources):  # noqa: F811
    """The default draws the sharp index first, with one ``random.randrange`` over all sharp images."""
    ds = make(sources)
    assert ds.sharp_sampling == 'random'
    for seed in range(20):
        random.seed(seed)
        got = ds[seed % 3]['ref_path']
        assert got == ds.sharp.names[random.Random(seed).randrange(4)]
    # batched fetching (what a DataLoader does) gives the items one by one would, seeded keys too
    keys = [(0, 5), (1, 6), (2, 7)]
    assert [it['ref_path'] for it in ds.__getitems__(keys)] == [ds[k]['ref_path'] for k in keys]


@pytest.mark.parametrize('backend', ['lmdb', 'disk'])
def test_single_repeats_one_image_with_varying_crops(sources, backend):  # noqa: F811
    ds = make(sources, backend, sharp_sampling='single')
    first = sorted(ds.sharp.names)[0]  # the default: the first image in sorted order
    random.seed(0)
    items = [ds[i % 3] for i in range(30)]
    assert {it['ref_path'] for it in items} == {first}
    assert len({to_bgr_uint8(it['ref']).tobytes() for it in items}) > 5  # crops still vary
    for name in ('s2', 's2.png') if backend == 'disk' else ('s2',):
        ds = make(sources, backend, sharp_sampling='single', sharp_image=name)
        assert {os.path.basename(ds[i % 3]['ref_path']).split('.')[0] for i in range(10)} == {'s2'}
    # the image is what the sharp source holds
    ref = to_bgr_uint8(ds[0]['ref'])
    full = sources['sharp']['s2']
    assert any((full[y:y + 16, x:x + 16] == ref).all() for y in range(25) for x in range(33))


@pytest.mark.parametrize('backend', ['lmdb', 'disk'])
def test_clustered_batches_draw_from_one_scene(scenes, backend):
    ds = make(scenes, backend, sharp_sampling='clustered')
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=EnlargedSampler(ds, 1, 0, ratio=20),
                                         num_workers=0, drop_last=True)
    random.seed(0)
    torch.manual_seed(0)
    seen = collections.Counter()
    for batch in loader:
        batch_scenes = {scene(p) for p in batch['ref_path']}
        assert len(batch_scenes) == 1, batch['ref_path']  # one cluster per batch
        seen.update(batch_scenes)
    assert set(seen) == set(SCENES)  # every cluster comes up
    # the same items under random sampling mix scenes within batches
    ds_random = make(scenes, backend)
    random.seed(0)
    mixed = [{scene(it['ref_path']) for it in ds_random.__getitems__([0, 1, 2])} for _ in range(20)]
    assert max(map(len, mixed)) > 1


def test_clustered_items_are_uniform_over_the_images(scenes):
    """The batch's cluster is that of a uniformly drawn image, so each item is uniform over all 6 images."""
    ds = make(scenes, sharp_sampling='clustered')
    random.seed(1)
    counts = collections.Counter(ds.sharp.names[ds._sharp_choice.draw([None])] for _ in range(6000))
    assert set(counts) == {f'{s}-{i}' for s, n in SCENES.items() for i in range(n)}
    assert all(abs(c - 1000) < 120 for c in counts.values()), counts
    # a batch's cluster holds for the whole batch: 'canal' (one image) batches repeat that image
    random.seed(2)
    batches = [[ds.sharp.names[i] for i in (lambda b: [ds._sharp_choice.draw(b) for _ in range(4)])([None])]
               for _ in range(300)]
    assert ['canal-0'] * 4 in batches and all(len({scene(n) for n in b}) == 1 for b in batches)


def test_clustered_seeded_keys_are_exact(scenes):
    """With per-sample seeds (dataloader workers), a batch's draws depend on its keys only: the global stream is
    untouched, and the cluster comes from the first key's seed."""
    ds = make(scenes, sharp_sampling='clustered')
    keys = [(0, 101), (1, 102), (2, 103)]
    random.seed(0)
    before = random.getstate()
    first = [(it['ref_path'], to_bgr_uint8(it['ref']).tobytes()) for it in ds.__getitems__(keys)]
    assert random.getstate() == before
    random.seed(99)
    assert [(it['ref_path'], to_bgr_uint8(it['ref']).tobytes()) for it in ds.__getitems__(keys)] == first
    clusters = {tuple(sorted({scene(it['ref_path']) for it in ds.__getitems__([(0, s), (1, s + 1), (2, s + 2)])}))
                for s in range(0, 300, 3)}
    assert all(len(c) == 1 for c in clusters) and len(clusters) == 3


def test_bad_values_are_one_line_errors_naming_the_option(sources, scenes, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match=r"^sharp_sampling: 'clusterd' is not one of random, clustered, single$"):
        make(sources, sharp_sampling='clusterd')
    with pytest.raises(UserError, match=r'^sharp_image: only read with sharp_sampling: single'):
        make(sources, sharp_image='s1')
    with pytest.raises(UserError, match=r"^sharp_image: 'nope' is not an image of dataroot_sharp"):
        make(sources, sharp_sampling='single', sharp_image='nope')
    with pytest.raises(UserError, match=r'^sharp_image: must be a key or a path'):
        make(sources, sharp_sampling='single', sharp_image=3)
    with pytest.raises(UserError, match=r'^sharp_sampling: clustered found no two images in one cluster'):
        make(sources, sharp_sampling='clustered')  # keys s0..s3: every image its own cluster
    write_images(tmp_path / 'one_scene', ['x-0', 'x-1'], seed=5)
    one = basicsr_lmdb(str(tmp_path / 'one_scene'), str(tmp_path / 'one.lmdb'))
    with pytest.raises(UserError, match=r'^sharp_sampling: clustered found 1 cluster'):
        make(dict(sources, sharp_lmdb=one), sharp_sampling='clustered')
    # the options check names the key before anything is built
    opt = yaml.safe_load((__import__('pathlib').Path(__file__).resolve().parents[2] / 'options' / 'demo'
                          / 'stage1.yml').read_text())
    opt['datasets']['train']['sharp_sampling'] = 'clusterd'
    with pytest.raises(UserError, match=r"datasets\.train\.sharp_sampling: 'clusterd' is not one of random, "
                                         r'clustered, single'):
        validate_schema(opt, 'x.yml')
    opt['datasets']['train']['sharp_sampling'] = 'single'
    validate_schema(opt, 'x.yml')
    assert isinstance(UnpairedImageDataset.CHOICE_OPTIONS['sharp_sampling'], tuple)
