"""Every row of the paper's tables (``options/README.md``, "The paper's tables, row by row") has options files
that exist, build and train.

Each training file named there is shrunk (tiny widths, 32 px patches, batch 2, tiny LMDBs with
``<scene>-<frame>`` keys) but keeps every switch it sets (``use_dm``, ``filter_type``, ``dm_timesteps``,
``sharp_sampling``, the losses, ...). It is parsed as ``basicsr train`` parses it, built, fed one batch from
its own dataset options through a DataLoader and trained three iterations. Stage-1 runs save their networks and
state where the stage-2 files look for them (``experiments/<name>/...``), so each stage-2 file starts from its
stage-1 run as in a real run. Test files build their model from the tiny stage-2 checkpoint and deblur one
image. A file with a self-enhancement teacher (``train.self_enhance``) gets a tiny teacher of the same type, with
weights written next to the tiny data.
"""
import copy
import importlib.util
import itertools
import math
import os
import re
import sys

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from basicsr.archs import build_network
from basicsr.data import build_dataset
from basicsr.models import build_model
from basicsr.utils.options import parse_options
from conftest import REPO
from tpdiff_plugin.data.lmdb_writer import write_lmdb

OPTIONS = REPO / 'options'
SECTION = "## The paper's tables, row by row"
TINY_TEACHERS = {'PeerNAFNet': dict(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])}


def table_rows():
    """The table's rows, each a list of its cells."""
    text = (OPTIONS / 'README.md').read_text(encoding='utf-8')
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split('\n## ', 1)[0]
    return [[c.strip() for c in line.strip().strip('|').split('|')] for line in section.splitlines()
            if line.startswith('| ') and not line.startswith('| table')]


def table_files():
    return sorted({f for row in table_rows() for f in re.findall(r'`([\w/.-]+\.yml)`', row[2])})


def load(name):
    with open(OPTIONS / name, encoding='utf-8') as f:
        return yaml.safe_load(f)


def test_the_table_covers_the_paper_and_every_variant_file():
    rows = table_rows()
    assert all(len(row) == 4 for row in rows), [row for row in rows if len(row) != 4]
    text = '\n'.join(' | '.join(row) for row in rows)
    for row in ('GoPro, 28.13', 'HIDE, 26.70', 'RealBlur-R, 34.95', 'RealBlur-J', '11.89M', 'TP-Diff-se', 'RSBlur',
                'RB2V_Street', 'w/o DM, 26.46', 'w/o TPE, 27.36', 'w/o TTformer, 27.19', 'w/o Multi-Scale, 27.89',
                'w/o Joint-Train, 27.65', 'w/o WaveLoss, 28.01', '| random', '| clustered', 'single repeated image',
                'adaptive filter', 'no filtering', 'plain filtering', 'deformable filtering', 'separable filtering',
                'T = 8', 'Sparse Coding'):
        assert row in text, row
    files = table_files()
    for name in files:
        assert (OPTIONS / name).is_file(), name
    # every variant file shipped is in the table (a new ablation or analysis file must get its row)
    shipped = {os.path.relpath(p, OPTIONS) for sub in ('ablations', 'analysis', 'whole_set', 'test')
               for p in map(str, (OPTIONS / sub).glob('*.yml'))} - {'test/demo.yml'}
    assert shipped <= set(files), sorted(shipped - set(files))


# --------------------------------------------------------------------------- tiny runs

def tiny(opt, data):
    """``opt`` at a tiny width on the tiny data, every switch it sets kept."""
    opt = copy.deepcopy(opt)
    opt['num_gpu'] = 0
    opt['network_g'].update(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1],
                            ffn_expansion_factor=2.0, prior_ch=8, prior_hidden=4, dm_feats=8, dm_blocks=1,
                            dm_cond_blocks=1, mem_slots=8, grad_checkpoint=False)
    if 'network_tpe' in opt:
        opt['network_tpe'].update(prior_ch=8, mem_slots=8, enc_ch=4)
    for label in ('d_sharp', 'd_blur', 'd_wave'):
        if f'network_{label}' in opt:
            opt[f'network_{label}'].update(base_ch=4, num_layers=2)
    if 'network_rb' in opt:
        opt['network_rb'].update(base_ch=4, num_levels=2)
    for phase, dataset in opt['datasets'].items():
        if phase == 'train':
            dataset.update(dataroot_blur=data['blur'], dataroot_sharp=data['sharp'], gt_size=32,
                           batch_size_per_gpu=2, num_worker_per_gpu=0)
        else:
            dataset.update(dataroot_lq=data['test_blur'], dataroot_gt=data['test_sharp'])
    if 'train' in opt:
        opt['datasets'].pop('val', None)
        opt['train']['total_iter'] = 1
    teacher = (opt.get('train') or {}).get('self_enhance')
    if teacher:
        teacher['teacher_weights'] = tiny_teacher(teacher['teacher'], os.path.dirname(data['blur']))
    return opt


def tiny_teacher(block, folder):
    """Shrink the teacher ``block`` in place and write random weights for it; returns the checkpoint path."""
    if block['type'].startswith('Peer') and importlib.util.find_spec('spandrel') is None:
        pytest.skip('the self-enhancement teacher is a spandrel peer; spandrel is not installed')
    block.update(TINY_TEACHERS[block['type']])
    path = os.path.join(folder, f'teacher_{block["type"]}.pth')
    torch.save({'params': build_network(copy.deepcopy(block)).state_dict()}, path)
    return path


def parsed(opt, root, monkeypatch):
    """``opt`` as ``basicsr train|test -opt`` parses it (upstream's ``parse_options``), run folders made."""
    path = root / 'options' / f'{opt["name"]}.yml'
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(opt), encoding='utf-8')
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', str(path)])
    opt = parse_options(str(root), is_train='train' in opt)[0]
    for key in ('models', 'training_states', 'visualization'):
        if opt['path'].get(key):
            os.makedirs(opt['path'][key], exist_ok=True)
    return opt


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """A run folder and tiny LMDBs: blurry and sharp training sets in scenes (2+ images each, for clustered
    sampling), and a paired test set."""
    root = tmp_path_factory.mktemp('paper_tables')
    rng = np.random.default_rng(0)
    images = root / 'images'
    data = {}
    for role, keys in (('blur', ['alley-0', 'alley-1', 'bridge-0', 'bridge-1']),
                       ('sharp', ['canal-0', 'canal-1', 'dock-0', 'dock-1', 'dock-2']),
                       ('test_blur', ['pier-0']), ('test_sharp', ['pier-0'])):
        items = []
        for key in keys:
            path = images / role / f'{key}.png'
            path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(path), rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
            items.append((key, str(path)))
        data[role] = str(root / f'{role}.lmdb')
        write_lmdb(data[role], items, 1, 1, True)
    return root, data, {}


def train_a_few_iterations(name, workspace, monkeypatch, iterations=3):
    root, data, _ = workspace
    monkeypatch.chdir(root)  # the files' relative paths (experiments/<stage-1 run>/...) start here
    opt = parsed(tiny(load(name), data), root, monkeypatch)
    loader = DataLoader(build_dataset(opt['datasets']['train']), batch_size=2, shuffle=False, drop_last=True)
    torch.manual_seed(0)
    model = build_model(opt)
    dn_before = [p.detach().clone() for p in model.bare('g').parameters()]
    for it, batch in zip(range(1, iterations + 1), itertools.cycle(loader)):
        model.feed_data(batch)
        model.optimize_parameters(it)
        losses = model.get_current_log()
        assert losses and all(math.isfinite(v) for v in losses.values()), (name, it, losses)
    assert any(not torch.equal(a, b) for a, b in zip(dn_before, model.bare('g').parameters())), name  # DN trained
    model.save(0, -1)  # net_<label>_latest.pth, as the stage-2 and test files expect
    model.save_training_state(0, 1)  # the state a stage-2 file's resume_optim_d reads
    return opt, model


def _stage(name):
    return load(name).get('stage') if 'train' in load(name) else None


TRAIN_FILES = [f for f in table_files() if 'train' in load(f)]
STAGE1 = [f for f in TRAIN_FILES if _stage(f) == 1]
STAGE2 = [f for f in TRAIN_FILES if _stage(f) == 2]
TEST_FILES = [f for f in table_files() if 'train' not in load(f)]


def test_the_table_has_runs_of_every_kind():
    assert STAGE1 and STAGE2 and TEST_FILES and set(STAGE1 + STAGE2 + TEST_FILES) == set(table_files())


@pytest.mark.parametrize('name', STAGE1)
def test_stage1_files_build_and_train(name, workspace, monkeypatch):
    opt, model = train_a_few_iterations(name, workspace, monkeypatch)
    assert model.stage == 1
    assert os.path.isfile(os.path.join(opt['path']['models'], 'net_tpe_latest.pth'))
    workspace[2][opt['name']] = True


@pytest.mark.parametrize('name', STAGE2)
def test_stage2_files_load_their_stage1_run_and_train(name, workspace, monkeypatch):
    stage1_run = load(name)['path']['pretrain_network_tpe'].split('/')[1]
    if stage1_run not in workspace[2]:  # run alone (-k): train the stage-1 file of that run first
        stage1 = next(f for f in STAGE1 if load(f)['name'] == stage1_run)
        test_stage1_files_build_and_train(stage1, workspace, monkeypatch)
    opt, model = train_a_few_iterations(name, workspace, monkeypatch)
    assert model.stage == 2
    assert ('l_self_enhance' in model.get_current_log()) == ('self_enhance' in opt['train'])  # TP-Diff-se's term
    if 'tpe' in model.net_labels:  # the frozen TPE is the stage-1 run's (w/o TPE has none)
        tpe = torch.load(os.path.join('experiments', stage1_run, 'models', 'net_tpe_latest.pth'), weights_only=True)
        assert all(torch.equal(v, model.bare('tpe').state_dict()[k]) for k, v in tpe['params'].items())
    workspace[2][opt['name']] = True


@pytest.mark.parametrize('name', TEST_FILES)
def test_test_files_build_from_the_stage2_run_and_deblur(name, workspace, monkeypatch):
    root, data, runs = workspace
    stage2_run = load(name)['path']['pretrain_network_g'].split('/')[1]
    if stage2_run not in runs:
        test_stage2_files_load_their_stage1_run_and_train(
            next(f for f in STAGE2 if load(f)['name'] == stage2_run), workspace, monkeypatch)
    monkeypatch.chdir(root)
    opt = parsed(tiny(load(name), data), root, monkeypatch)
    model = build_model(opt)
    dataset = build_dataset(dict(next(iter(opt['datasets'].values())), phase='test'))
    item = dataset[0]
    model.feed_data({'lq': item['lq'][None], 'gt': item['gt'][None]})
    model.test()
    out = model.get_current_visuals()['result']
    assert out.shape == item['lq'][None].shape and torch.isfinite(out).all()
