"""Every YAML under options/: parses, builds its networks, agrees with its siblings, and ablations are minimal.

The behaviour checked is what ``basicsr train|test -opt FILE`` does: basicsr's own ``parse_options`` reads the
file, and our models take their values from that parse (a number YAML reads as text, such as ``lr: 2e-4``,
would reach the optimizer as a string).
"""
import glob
import inspect
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.models import build_model
from basicsr.utils.options import ordered_yaml, parse_options
from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY
from tpdiff_plugin.archs.peers_arch import PUBLISHED_CONFIGS
from tpdiff_plugin.data.dataset_layouts import Pair, unpaired_sets

OPTIONS = Path(__file__).resolve().parents[1] / 'options'
ALL_YAML = sorted(glob.glob(str(OPTIONS / '**' / '*.yml'), recursive=True))
# ablations/tpdiff_stage2_<part>.yml, named TPDiff_Stage2_GoPro_<part> -> the dotted keys that may differ
# from tpdiff_stage2.yml besides the name
ABLATIONS = {
    'wo_dm': {'network_g.use_dm': False, 'path.strict_load_g': False},
    'wo_tpe': {'train.use_tpe': False},
    'wo_ttformer': {'network_g.fm_msa': False, 'path.strict_load_g': False},
    'wo_multiscale': {'network_g.multi_scale_prior': False, 'path.strict_load_g': False},
    'wo_joint_train': {'train.joint_train': False},
    'wo_waveloss': {'train.wave_opt.loss_weight': 0},
    # the paper's filter comparison (adaptive vs no / plain / deformable / separable filtering) and the
    # other readings of FM-MSA's filter and of where TM-FFN modulates (issue 13)
    **{f'filter_{t}': {'network_g.filter_type': t, 'path.strict_load_g': False}
       for t in ('predicted', 'feature_deform', 'plain', 'separable', 'none')},
    'ffn_before_dwconv': {'network_g.tm_ffn_modulation': 'before_dwconv', 'path.strict_load_g': False},
}
OURS = ('stage', 'train.joint_train', 'train.use_tpe', 'train.pool_size', 'train.gan_opt', 'train.cycle_opt',
        'train.wave_opt', 'train.diff_opt', 'val.sample_seed', 'network_g', 'network_tpe', 'network_rb',
        'network_d_sharp', 'network_d_blur', 'network_d_wave', 'pretrain_network_tpe', 'pretrain_network_rb',
        'wavelet', 'mode', 'optim_d', 'ema_decay', 'identity_init', 'icnr_init', 'mem_ema_decay',
        'train.sharp_cycle_prior', 'train.dm_target', 'resume_optim_d', 'train.cycle_sharp_opt',
        'train.gan_sharp_opt', 'train.identity_opt', 'train.sharp_cycle_trains_rb', 'train.r1_weight',
        'train.d_update_every', 'filter_type', 'tm_ffn_modulation', 'sharp_sampling', 'sharp_image',
        'prior_generator', 'train.self_enhance', 'train.channels_last')


def load(path):
    with open(path, encoding='utf-8') as f:
        return yaml.load(f, Loader=ordered_yaml()[0])


def name(path):
    return os.path.relpath(path, OPTIONS)


def flatten(d, prefix=''):
    out = {}
    for k, v in d.items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            out.update(flatten(v, key + '.'))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _is_basicsr_options(path):
    """BasicSR train/test files have a model_type; other tools' YAML (e.g. `tpdiff compare`) do not."""
    with open(path, encoding='utf-8') as f:
        return 'model_type' in (yaml.safe_load(f) or {})


BASICSR_FILES = [p for p in ALL_YAML if _is_basicsr_options(p)]


def test_every_yaml_parses_and_the_expected_files_exist():
    for path in ALL_YAML:
        assert isinstance(load(path), dict), name(path)
    expected = ['tpdiff_stage1.yml', 'tpdiff_stage2.yml', 'test/gopro.yml', 'test/hide.yml',
                'test/realblur_j.yml', 'test/realblur_r.yml', 'test/rsblur.yml', 'test/rb2v_street.yml',
                'demo/stage1.yml', 'demo/stage2.yml',
                'test/demo.yml'] + [f'ablations/tpdiff_stage2_{p}.yml' for p in ABLATIONS]
    assert set(expected) <= {name(p) for p in BASICSR_FILES}
    assert (OPTIONS / 'README.md').is_file()


def basicsr_parse(path, root, monkeypatch):
    """The options as ``basicsr train|test -opt path`` parses them (upstream's ``parse_options``)."""
    monkeypatch.setattr(sys, 'argv', ['basicsr', '-opt', str(path)])
    return parse_options(str(root), is_train='train' in load(path))[0]


def numbers_read_as_text(opt):
    """Dotted keys whose value (or a list item) is a string that reads as a number: YAML 1.1 reads ``2e-4``
    (no dot) as text, and ``torch.optim`` or a loss would then get a string."""
    def is_number_text(v):
        if not isinstance(v, str):
            return False
        try:
            float(v)
        except ValueError:
            return False
        return True
    return [k for k, v in flatten(opt).items() if any(map(is_number_text, v if isinstance(v, list) else [v]))]


@pytest.mark.parametrize('path', BASICSR_FILES, ids=name)
def test_basicsr_parses_every_number_as_a_number(path, tmp_path, monkeypatch):
    assert numbers_read_as_text(basicsr_parse(path, tmp_path, monkeypatch)) == []


def test_a_number_read_as_text_is_caught(tmp_path, monkeypatch):
    """The control of the test above: ``!!float`` dropped from the demo's learning rates."""
    text = (OPTIONS / 'demo/stage1.yml').read_text(encoding='utf-8')
    assert text.count('lr: !!float ') == 2
    broken = tmp_path / 'stage1.yml'
    broken.write_text(text.replace('lr: !!float ', 'lr: '), encoding='utf-8')
    assert numbers_read_as_text(basicsr_parse(broken, tmp_path, monkeypatch)) == ['train.optim_g.lr', 'train.optim_d.lr']


@pytest.mark.parametrize('path', ['tpdiff_stage1.yml', 'demo/stage1.yml'])
def test_the_model_trains_with_the_values_basicsr_parses(path, tmp_path, monkeypatch):
    """The model that ``basicsr train`` builds from the file holds the file's optimizers, loss weights and
    recipe switches (a key our model reads under another name, or not at all, shows up here)."""
    opt = basicsr_parse(OPTIONS / path, tmp_path, monkeypatch)
    train = opt['train']
    torch.manual_seed(0)
    model = build_model(opt)
    assert type(model).__name__ == opt['model_type'] and model.stage == opt['stage']
    for label in [k[len('network_'):] for k in opt if k.startswith('network_')]:
        assert type(model.get_bare_model(getattr(model, f'net_{label}'))).__name__ == opt[f'network_{label}']['type']
    for optimizer, key in ((model.optimizer_g, 'optim_g'), (model.optimizer_d, 'optim_d')):
        assert type(optimizer).__name__ == train[key]['type']
        group = optimizer.param_groups[0]
        assert (group['lr'], list(group['betas'])) == (train[key]['lr'], train[key]['betas'])
    losses = {'cri_gan': 'gan_opt', 'cri_cycle': 'cycle_opt', 'cri_wave': 'wave_opt', 'cri_gan_sharp': 'gan_sharp_opt',
              'cri_cycle_sharp': 'cycle_sharp_opt', 'cri_identity': 'identity_opt'}
    for attr, key in losses.items():
        loss = getattr(model, attr)
        if key in train and not (key == 'wave_opt' and train[key]['loss_weight'] == 0):
            assert (type(loss).__name__, loss.loss_weight) == (train[key]['type'], train[key]['loss_weight']), key
        else:
            assert loss is None, key
    assert model.sharp_cycle_trains_rb == train.get('sharp_cycle_trains_rb', True)
    r1 = train.get('r1_weight', 0)  # one gamma for every D, or {label: gamma}
    per_d = r1 if isinstance(r1, dict) else dict.fromkeys(model.discriminator_labels, r1)
    assert model.r1_weights == {label: gamma for label, gamma in per_d.items() if gamma}
    assert model.ema_decay == train.get('ema_decay', 0)
    for scheduler in model.schedulers:
        kind = train['scheduler']['type']
        assert type(scheduler).__name__ == {'MultiStepLR': 'MultiStepRestartLR'}.get(kind, kind)  # basicsr's class
        if kind == 'MultiStepLR':
            assert sorted(scheduler.milestones.elements()) == train['scheduler']['milestones']
            assert scheduler.gamma == train['scheduler']['gamma']
        else:  # CosineAnnealingRestartLR
            assert (scheduler.periods, scheduler.restart_weights, scheduler.eta_min) == \
                (train['scheduler']['periods'], train['scheduler']['restart_weights'], train['scheduler']['eta_min'])


@pytest.mark.parametrize('path', BASICSR_FILES, ids=name)
def test_parses_and_builds(path):
    opt = load(path)
    for key in ('name', 'model_type', 'num_gpu', 'datasets', 'path', 'scale'):
        assert key in opt, key
    MODEL_REGISTRY.get(opt['model_type'])
    if opt['model_type'] == 'TPDiffModel':
        assert opt['stage'] in (1, 2)
    for key, block in opt.items():
        if key.startswith('network_'):
            net = build_network(dict(block))
            assert sum(p.numel() for p in net.parameters()) > 0
    for key, block in (opt.get('train') or {}).items():
        if key.endswith('_opt'):
            build_loss(dict(block))
    is_test = 'train' not in opt
    for phase, dataset in opt['datasets'].items():
        if phase == 'train':
            assert dataset['type'] == 'UnpairedImageDataset'
            assert {'dataroot_blur', 'dataroot_sharp', 'gt_size', 'batch_size_per_gpu'} <= set(dataset)
        else:
            assert dataset['type'] == 'PairedImageDataset'
            assert dataset['dataroot_gt'].endswith('sharp.lmdb') and dataset['dataroot_lq'].endswith('blur.lmdb')
    if is_test:
        assert opt['val']['save_img'] is True and 'suffix' in opt['val']
        assert opt['path']['pretrain_network_g'].startswith('experiments/')


def _class_defaults(cls):
    return {k: (list(p.default) if isinstance(p.default, tuple) else p.default)
            for k, p in inspect.signature(cls.__init__).parameters.items() if k != 'self'}


def test_paper_config_spells_out_the_class_defaults_and_sizes():
    s1 = load(OPTIONS / 'tpdiff_stage1.yml')
    for key, cls_name in (('network_g', 'TPDiffNet'), ('network_tpe', 'TexturePriorEncoder')):
        block = dict(s1[key])
        assert block.pop('type') == cls_name
        if cls_name == 'TPDiffNet':  # a training-memory switch, not architecture: on for the paper batch
            assert block.pop('grad_checkpoint') is True
            block['grad_checkpoint'] = False
        assert block == _class_defaults(ARCH_REGISTRY.get(cls_name)), key
    n_params = sum(p.numel() for key in ('network_g', 'network_tpe')
                   for p in build_network(dict(s1[key])).parameters())
    assert abs(n_params - 11.89e6) <= 0.03 * 11.89e6


# Frames per scene of GoPro's train split (2,103 in 22 scenes), as listed by the RSBlur repository's
# datalist/GoPro/GoPro_INTER_ABME_train.txt (one line per GOPRO_Large train frame).
GOPRO_TRAIN_FRAMES = {
    'GOPR0372_07_00': 100, 'GOPR0372_07_01': 75, 'GOPR0374_11_00': 150, 'GOPR0374_11_01': 80,
    'GOPR0374_11_02': 100, 'GOPR0374_11_03': 48, 'GOPR0378_13_00': 110, 'GOPR0379_11_00': 100,
    'GOPR0380_11_00': 60, 'GOPR0384_11_01': 100, 'GOPR0384_11_02': 100, 'GOPR0384_11_03': 100,
    'GOPR0384_11_04': 100, 'GOPR0385_11_00': 100, 'GOPR0386_11_00': 100, 'GOPR0477_11_00': 80,
    'GOPR0857_11_00': 100, 'GOPR0868_11_01': 100, 'GOPR0868_11_02': 100, 'GOPR0871_11_01': 100,
    'GOPR0881_11_00': 100, 'GOPR0884_11_00': 100}


def epochs_in_iterations(epochs, protocol, data, seed=0, gpus=1):
    """basicsr's count: an epoch is ceil(N * dataset_enlarge_ratio / (batch_size_per_gpu * GPUs)) iterations, N the
    blurry images of GoPro's train split under ``protocol`` (make-lmdb's own split rule, at its default seed)."""
    pairs = [Pair(scene, f'{scene}-{i:06d}', 'b', 's') for scene, n in GOPRO_TRAIN_FRAMES.items() for i in range(n)]
    n_blur = len(unpaired_sets(pairs, protocol, seed)[0])
    per_epoch = math.ceil(n_blur * data['dataset_enlarge_ratio'] / (data['batch_size_per_gpu'] * gpus))
    return epochs * per_epoch


def test_epoch_arithmetic_of_both_protocols():
    assert sum(GOPRO_TRAIN_FRAMES.values()) == 2103
    data = {'dataset_enlarge_ratio': 1, 'batch_size_per_gpu': 8}
    assert epochs_in_iterations(200, 'whole_set', data) == 200 * 263 == 52600
    assert epochs_in_iterations(200, 'scene_split', data) == 200 * math.ceil(1088 / 8) == 27200
    # a total batch of 8 over 2 GPUs, or a doubled enlarge ratio at batch 16, counts the same
    assert epochs_in_iterations(200, 'whole_set', dict(data, batch_size_per_gpu=4), gpus=2) == 52600
    assert epochs_in_iterations(200, 'whole_set', {'dataset_enlarge_ratio': 2, 'batch_size_per_gpu': 16}) == 52600
    for stage in (1, 2):
        opt = load(OPTIONS / 'whole_set' / f'tpdiff_stage{stage}.yml')
        assert opt['train']['total_iter'] == epochs_in_iterations(200, 'whole_set', opt['datasets']['train'])


@pytest.mark.parametrize('stage', [1, 2])
def test_whole_set_files_differ_from_the_paper_files_only_in_the_protocol(stage):
    base = flatten(load(OPTIONS / f'tpdiff_stage{stage}.yml'))
    whole = flatten(load(OPTIONS / 'whole_set' / f'tpdiff_stage{stage}.yml'))
    assert whole.keys() == base.keys()
    diff = {k: whole[k] for k in base if whole[k] != base[k]}
    expected = {'name': f'TPDiff_Stage{stage}_GoPro_WholeSet', 'datasets.train.name': 'GoPro_unpaired_whole_set',
                'datasets.train.dataroot_blur': 'datasets_lmdb/gopro/gopro_train_all_blur.lmdb',
                'datasets.train.dataroot_sharp': 'datasets_lmdb/gopro/gopro_train_all_sharp.lmdb',
                'train.total_iter': 52600}
    if stage == 1:
        expected['logger.save_checkpoint_freq'] = 5260
    else:
        expected.update({k: v.replace('TPDiff_Stage1_GoPro/', 'TPDiff_Stage1_GoPro_WholeSet/') for k, v in base.items()
                         if k.startswith('path.') and isinstance(v, str) and 'TPDiff_Stage1_GoPro/' in v})
    assert diff == expected


@pytest.mark.parametrize('stage', [1, 2])
@pytest.mark.parametrize('mode', ['clustered', 'single'])
def test_sharp_sampling_files_differ_from_the_paper_files_only_in_the_sampling(stage, mode):
    base = flatten(load(OPTIONS / f'tpdiff_stage{stage}.yml'))
    variant = flatten(load(OPTIONS / 'analysis' / f'tpdiff_stage{stage}_sharp_{mode}.yml'))
    assert variant.pop('datasets.train.sharp_sampling') == mode
    assert variant.keys() == base.keys()
    diff = {k: variant[k] for k in base if variant[k] != base[k]}
    expected = {'name': f'TPDiff_Stage{stage}_GoPro_sharp_{mode}'}
    if stage == 2:  # stage 2 continues the stage-1 run with the same sampling
        expected.update({k: v.replace('TPDiff_Stage1_GoPro/', f'TPDiff_Stage1_GoPro_sharp_{mode}/')
                         for k, v in base.items() if isinstance(v, str) and 'TPDiff_Stage1_GoPro/' in v})
    assert diff == expected


@pytest.mark.parametrize('steps', [2, 4, 16])
def test_diffusion_step_files_differ_from_stage2_only_in_t(steps):
    base = flatten(load(OPTIONS / 'tpdiff_stage2.yml'))
    variant = flatten(load(OPTIONS / 'analysis' / f'tpdiff_stage2_T{steps}.yml'))
    assert variant.keys() == base.keys()
    assert {k: variant[k] for k in base if variant[k] != base[k]} == {
        'name': f'TPDiff_Stage2_GoPro_T{steps}', 'network_g.dm_timesteps': steps}


@pytest.mark.parametrize('generator', ['memory_bank', 'sparse_coding', 'vq'])
def test_prior_generator_files_differ_from_stage2_only_in_the_generator(generator):
    base = flatten(load(OPTIONS / 'tpdiff_stage2.yml'))
    variant = flatten(load(OPTIONS / 'analysis' / f'tpdiff_stage2_prior_{generator}.yml'))
    assert variant.keys() == base.keys()
    assert {k: variant[k] for k in base if variant[k] != base[k]} == {
        'name': f'TPDiff_Stage2_GoPro_prior_{generator}', 'network_g.prior_generator': generator,
        'path.strict_load_g': False}


def test_paper_schedule():
    for stage in (1, 2):
        opt = load(OPTIONS / f'tpdiff_stage{stage}.yml')
        assert opt['name'] == f'TPDiff_Stage{stage}_GoPro' and opt['stage'] == stage and opt['num_gpu'] == 'auto'
        train, data = opt['train'], opt['datasets']['train']
        assert data['batch_size_per_gpu'] == 8 and data['gt_size'] == 256
        assert data['dataroot_blur'].startswith('datasets_lmdb/gopro/')
        for key in ('optim_g', 'optim_d'):
            assert train[key]['type'] == 'Adam' and train[key]['lr'] == pytest.approx(1e-4)
        # 200 epochs of the scene split's blurry frames at a total batch of 8 (see epochs_in_iterations)
        assert train['total_iter'] == epochs_in_iterations(200, 'scene_split', data) == 27200
        assert (train['gan_opt']['loss_weight'], train['cycle_opt']['loss_weight'],
                train['wave_opt']['loss_weight']) == (1.0, 0.1, 0.2)
        assert train['wave_opt']['type'] == 'WaveletGANLoss' and train['wave_opt']['wavelet'] == 'haar'
        # the paper's log form: L = E[log D(s)] + E[log(1 - D(DN(b)))]
        assert train['gan_opt']['gan_type'] == train['wave_opt']['gan_type'] == 'vanilla'
        assert opt['network_g']['dm_timesteps'] == 8
    s2 = load(OPTIONS / 'tpdiff_stage2.yml')
    assert s2['train']['diff_opt'] == {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'}
    assert s2['train']['joint_train'] is True and s2['train']['use_tpe'] is True
    for label in ('g', 'tpe', 'rb'):
        expected = f'experiments/TPDiff_Stage1_GoPro/models/net_{label}_latest.pth'
        assert s2['path'][f'pretrain_network_{label}'] == expected


@pytest.mark.parametrize('first,second', [
    ('tpdiff_stage1.yml', 'tpdiff_stage2.yml'), ('demo/stage1.yml', 'demo/stage2.yml'),
    ('whole_set/tpdiff_stage1.yml', 'whole_set/tpdiff_stage2.yml')])
def test_stage2_networks_match_stage1(first, second):
    a, b = load(OPTIONS / first), load(OPTIONS / second)
    nets = [k for k in a if k.startswith('network_')]
    assert nets == [k for k in b if k.startswith('network_')]
    for key in nets:
        assert a[key] == b[key], key
    stage1_name = a['name']
    # stage 2 starts from every stage-1 network, the discriminators too, and from their optimizer state
    for label in ('g', 'tpe', 'rb', 'd_sharp', 'd_blur', 'd_wave'):
        assert b['path'][f'pretrain_network_{label}'] == f'experiments/{stage1_name}/models/net_{label}_latest.pth'
    assert b['path']['resume_optim_d'] == f'experiments/{stage1_name}/training_states'
    # the newest .state is the last iteration's, so the moments belong to the weights loaded
    assert a['train']['total_iter'] % a['logger']['save_checkpoint_freq'] == 0


@pytest.mark.parametrize('test_file', ['test/gopro.yml', 'test/hide.yml', 'test/realblur_j.yml',
                                       'test/realblur_r.yml', 'test/rsblur.yml', 'test/rb2v_street.yml',
                                       'test/demo.yml'])
def test_test_options_load_what_stage2_trains(test_file):
    test = load(OPTIONS / test_file)
    train = load(OPTIONS / ('demo/stage2.yml' if 'demo' in test_file else 'tpdiff_stage2.yml'))
    assert test['network_g'] == train['network_g']
    assert test['stage'] == 2 and test['model_type'] == 'TPDiffModel'
    assert test['path']['pretrain_network_g'] == f'experiments/{train["name"]}/models/net_g_latest.pth'
    # a run that keeps an EMA of G is tested with it (the copy its validation scored)
    expected_key = 'params_ema' if train['train'].get('ema_decay', 0) > 0 else 'params'
    assert test['path'].get('param_key_g', 'params') == expected_key


def test_demo_recipe_warms_the_dm_up_and_decays_over_each_stage():
    """The demo recipe of bench/README.md rounds 9-10: a cosine over each stage's whole budget, an EMA of G,
    and stage 2 opening with DM-only iterations that leave the whole game most of the budget."""
    for f in ('demo/stage1.yml', 'demo/stage2.yml'):
        train = load(OPTIONS / f)['train']
        assert train['scheduler']['type'] == 'CosineAnnealingRestartLR', f
        assert sum(train['scheduler']['periods']) == train['total_iter'], f
        assert 0 < train['ema_decay'] < 1, f
    s2 = load(OPTIONS / 'demo/stage2.yml')
    assert 0 < s2['train']['dm_warmup_iter'] < s2['train']['total_iter'] / 2 + 1
    assert s2['train']['dm_lr'] > s2['train']['optim_g']['lr']
    # the last checkpoint is the last iteration's, and validation happens after the warm-up
    assert s2['train']['total_iter'] % s2['logger']['save_checkpoint_freq'] == 0
    assert s2['train']['total_iter'] % s2['val']['val_freq'] == 0
    assert s2['val']['val_freq'] > s2['train']['dm_warmup_iter']


@pytest.mark.parametrize('part', sorted(ABLATIONS))
def test_ablation_differs_from_stage2_only_in_its_switch(part):
    base = flatten(load(OPTIONS / 'tpdiff_stage2.yml'))
    abl = flatten(load(OPTIONS / 'ablations' / f'tpdiff_stage2_{part}.yml'))
    assert abl.keys() == base.keys()
    diff = {k: abl[k] for k in base if abl[k] != base[k]}
    assert diff.pop('name') == f'TPDiff_Stage2_GoPro_{part}'
    assert diff == ABLATIONS[part]


def test_self_enhancement_file_adds_only_the_teacher_block():
    """TP-Diff-se: tpdiff_stage2.yml plus train.self_enhance, whose teacher is the published NAFNet-GoPro."""
    base, se = load(OPTIONS / 'tpdiff_stage2.yml'), load(OPTIONS / 'ablations' / 'tpdiff_stage2_se.yml')
    block = se['train'].pop('self_enhance')
    assert se.pop('name') == 'TPDiff_Stage2_GoPro_se' and base.pop('name') == 'TPDiff_Stage2_GoPro'
    assert flatten(se) == flatten(base)
    assert {**block['teacher'], 'img_channel': 3} == {**PUBLISHED_CONFIGS['NAFNet-GoPro'], 'img_channel': 3}
    assert block['teacher_weights'].endswith('NAFNet-GoPro-width64.pth') and block['pairs'] == 'reblurred'


def test_demo_options_are_tiny_and_cpu():
    for f in ('demo/stage1.yml', 'demo/stage2.yml', 'test/demo.yml'):
        opt = load(OPTIONS / f)
        assert opt['num_gpu'] == 0
        for phase, dataset in opt['datasets'].items():
            for key in ('dataroot_blur', 'dataroot_sharp', 'dataroot_gt', 'dataroot_lq'):
                if key in dataset:
                    assert dataset[key].startswith('datasets_lmdb/demo/'), (f, key)
    names = [load(OPTIONS / f)['name'] for f in ('demo/stage1.yml', 'demo/stage2.yml')]
    assert names == ['TPDiff_Demo_Stage1', 'TPDiff_Demo_Stage2']
    s1 = load(OPTIONS / 'demo/stage1.yml')
    assert s1['datasets']['train']['gt_size'] == 64
    n_params = sum(p.numel() for p in build_network(dict(s1['network_g'])).parameters())
    assert n_params < 1e6  # (the paper net: 11.76M)
    # the demo networks run on a 64 px patch (the wavelet discriminator sees 32 px bands)
    with torch.no_grad():
        x = torch.rand(1, 3, 64, 64)
        tpe = build_network(dict(s1['network_tpe']))
        out = build_network(dict(s1['network_g']))(x, prior=tpe(x, x))
        assert out.shape == x.shape
        assert build_network(dict(s1['network_d_wave']))(torch.rand(1, 9, 32, 32)).numel() > 0


def test_readme_explains_our_keys():
    text = (OPTIONS / 'README.md').read_text(encoding='utf-8')
    for key in OURS:
        assert f'`{key.split(".")[-1]}' in text, key
    for part in ABLATIONS:
        assert f'tpdiff_stage2_{part}.yml' in text
