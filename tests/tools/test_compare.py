"""``tpdiff compare``: restorers side by side on one paired set; metrics, CSV, crops PNG, memory, errors."""
import copy
import csv

import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.metrics import calculate_psnr, calculate_ssim

from conftest import tiny_net, tiny_net_opts
from tpdiff_plugin.cli import tpdiff_main
from tpdiff_plugin.utils.checkpoint import save_networks
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.tools.compare import crop_box
from tpdiff_plugin.utils.image_metrics import realblur_metrics
from tpdiff_plugin.utils.measure import PeakMemory
from tpdiff_plugin.utils.option_files import packaged_options

TINY_G = tiny_net_opts()  # random output conv, so that the network changes images
TINY_NAF = dict(type='PeerNAFNet', width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1])


def _pairs(root, n=3, size=(44, 60)):
    """A tiny paired folder set: smooth random 'sharp' images and their horizontally blurred versions."""
    rng = np.random.default_rng(0)
    (root / 'gt').mkdir(parents=True)
    (root / 'lq').mkdir()
    for i in range(n):
        gt = cv2.resize(rng.integers(0, 256, (size[0] // 4, size[1] // 4, 3), dtype=np.uint8), size[::-1],
                        interpolation=cv2.INTER_CUBIC)
        lq = cv2.blur(gt, (7, 1))
        cv2.imwrite(str(root / 'gt' / f'{i:03d}.png'), gt)
        cv2.imwrite(str(root / 'lq' / f'{i:03d}.png'), lq)
    return root


@pytest.fixture
def workspace(tmp_path):
    data = _pairs(tmp_path / 'pairs')
    identity = tiny_net()
    with torch.no_grad():
        identity.output.weight.zero_()  # residual 0: output = input, a restorer with known metrics
    weights = tmp_path / 'identity.pth'
    torch.save({'params': identity.state_dict()}, weights)
    opt = {
        'name': 'cmp_test', 'device': 'cpu', 'seed': 0, 'output_dir': str(tmp_path / 'res'),
        'dataset': {'name': 'pairs', 'type': 'PairedImageDataset', 'dataroot_gt': str(data / 'gt'),
                    'dataroot_lq': str(data / 'lq'), 'io_backend': {'type': 'disk'}},
        'metrics': {'protocol': 'gopro', 'crop_border': 0},
        'macs_size': '32x32',
        'crops': {'size': 24, 'max_images': 2},
        'restorers': {
            'tpdiff-identity': {'network': TINY_G, 'weights': str(weights)},
            'tpdiff-random': {'network': TINY_G, 'tile': 32, 'tile_overlap': 8},
            'nafnet-tiny': {'network': TINY_NAF},
        },
    }
    return tmp_path, data, copy.deepcopy(opt)  # tests edit it: never the module-level blocks


def _write(tmp_path, opt):
    path = tmp_path / 'compare.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return str(path)


def _read_csv(path):
    with open(path, newline='') as f:
        return {r['restorer']: r for r in csv.DictReader(f)}


def test_compare_table_csv_and_crops(workspace, capsys):
    tmp_path, data, opt = workspace
    assert tpdiff_main(['compare', '-opt', _write(tmp_path, opt)]) == 0
    out = capsys.readouterr().out
    for label in ('input (blurry)', 'tpdiff-identity', 'tpdiff-random', 'nafnet-tiny'):
        assert label in out
    rows = _read_csv(tmp_path / 'res' / 'compare.csv')
    assert list(rows) == ['input (blurry)', 'tpdiff-identity', 'tpdiff-random', 'nafnet-tiny']
    # the input row is basicsr's GoPro protocol on the pairs (RGB, crop_border 0)
    psnrs, ssims = [], []
    for i in range(3):
        lq, gt = (cv2.imread(str(data / d / f'{i:03d}.png')) for d in ('lq', 'gt'))
        psnrs.append(calculate_psnr(lq, gt, 0))
        ssims.append(calculate_ssim(lq, gt, 0))
    assert float(rows['input (blurry)']['psnr']) == pytest.approx(np.mean(psnrs), abs=1e-6)
    assert float(rows['input (blurry)']['ssim']) == pytest.approx(np.mean(ssims), abs=1e-6)
    # a restorer whose output is its input scores exactly the input's metrics; random ones do not
    assert float(rows['tpdiff-identity']['psnr']) == pytest.approx(np.mean(psnrs), abs=1e-6)
    assert float(rows['tpdiff-random']['psnr']) != pytest.approx(np.mean(psnrs), abs=1e-3)
    assert rows['tpdiff-identity']['weights'].endswith('identity.pth')
    assert rows['nafnet-tiny']['weights'] == 'random init'
    # params, MACs, speed and memory columns
    n_params = sum(p.numel() for p in tiny_net().parameters())
    assert int(rows['tpdiff-identity']['params']) == n_params
    for label in ('tpdiff-identity', 'tpdiff-random', 'nafnet-tiny'):
        r = rows[label]
        assert int(r['images']) == 3 and r['macs_size'] == '32x32'
        for key in ('gmacs', 'sec_per_mp'):
            assert np.isfinite(float(r[key])) and float(r[key]) > 0, (label, key)
        assert float(r['peak_mib']) >= 0
    assert float(rows['tpdiff-identity']['gmacs']) == pytest.approx(float(rows['tpdiff-random']['gmacs']))
    # side-by-side crops: 2 images x (input + 3 restorers + GT) crops of 24 px with label strips
    grid = cv2.imread(str(tmp_path / 'res' / 'compare.png'))
    assert grid.shape[1] == 5 * 24 + 4 * 4
    assert grid.shape[0] == 2 * (24 + 2 * 14 + 4 + 4)


def test_realblur_protocol_aligns_before_measuring(workspace, capsys):
    tmp_path, _, opt = workspace
    opt['metrics'] = {'protocol': 'realblur', 'align_motion': 'translation'}
    opt['restorers'] = {'tpdiff-identity': opt['restorers']['tpdiff-identity']}
    opt['macs_size'] = None
    assert tpdiff_main(['compare', '-opt', _write(tmp_path, opt)]) == 0
    rows = _read_csv(tmp_path / 'res' / 'compare.csv')
    assert float(rows['tpdiff-identity']['psnr']) == pytest.approx(float(rows['input (blurry)']['psnr']), abs=1e-4)
    assert rows['tpdiff-identity']['gmacs'] == ''
    assert 'protocol realblur (aligned: translation)' in capsys.readouterr().out


def test_realblur_metrics_undo_a_shift_and_an_exposure_change():
    from skimage import data
    gt = data.astronaut()[100:300, 100:300].astype(np.float32) / 255
    shifted = cv2.warpAffine(gt, np.float32([[1, 0, 2.5], [0, 1, -1.5]]), (200, 200), borderMode=cv2.BORDER_REFLECT)
    plain = 10 * np.log10(1 / ((shifted - gt) ** 2).mean())
    for motion in ('translation', 'homography'):
        psnr, ssim = realblur_metrics(shifted * 0.8, gt, motion)
        assert psnr > plain + 10 and ssim > 0.9, (motion, psnr, plain)
    psnr, ssim = realblur_metrics(gt, gt)
    assert psnr > 60 and ssim > 0.999


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device('cpu')) as small:
        np.ones(1000)
    with PeakMemory(torch.device('cpu')) as big:
        a = np.ones(200 * 2 ** 20 // 8)  # 200 MiB, touched
        del a
    assert big.mib >= 150 and small.mib < 50


def test_crop_box_finds_the_textured_region():
    gt = torch.zeros(1, 3, 64, 96)
    gt[..., 40:60, 70:90] = torch.rand(3, 20, 20, generator=torch.Generator().manual_seed(0))
    top, left, size = crop_box(gt, 16)
    assert size == 16 and 30 <= top <= 48 and 60 <= left <= 80


@pytest.mark.parametrize('edit,match', [
    (lambda o: o['dataset'].update(dataroot_gt='/nonexistent/gt'), 'dataset.dataroot_gt: no such file or folder'),
    (lambda o: o['restorers']['nafnet-tiny']['network'].update(type='NoSuchNet'), 'no network named "NoSuchNet"'),
    (lambda o: o['metrics'].update(protocol='psnr-y'), 'metrics.protocol must be one of gopro, realblur'),
    (lambda o: o['restorers'].update(bad={'tile': 32}), 'restorers.bad needs a "network" block'),
    (lambda o: o['restorers'].update(bad={'weights': 'x.pth'}), 'restorers.bad.weights: no such checkpoint file'),
    (lambda o: o['restorers'].update(bad={'weights': o['restorers']['tpdiff-identity']['weights']}),
     'identity.pth carries no network options (it predates stored options'),  # saved without them: needs network
    (lambda o: o['restorers']['nafnet-tiny'].update(weights='/nonexistent.pth'), 'no such checkpoint file'),
    (lambda o: o['restorers']['tpdiff-random'].update(half='fp8'),
     'restorers.tpdiff-random: half: expected true, false, bf16 or fp16'),
])
def test_bad_options_are_one_line_errors(workspace, capsys, edit, match):
    tmp_path, _, opt = workspace
    edit(opt)
    assert tpdiff_main(['compare', '-opt', _write(tmp_path, opt)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and match in err and '\n' not in err, err


def test_network_can_name_a_training_options_file(tmp_path):
    from tpdiff_plugin.tools.compare import load_compare_options
    train_opt = tmp_path / 'train.yml'
    block = tiny_net_opts()
    train_opt.write_text(yaml.safe_dump({'name': 'x', 'model_type': 'TPDiffModel', 'network_g': block}))
    (tmp_path / 'gt').mkdir()
    (tmp_path / 'lq').mkdir()
    cfg = tmp_path / 'c.yml'
    cfg.write_text(yaml.safe_dump({
        'dataset': {'dataroot_gt': str(tmp_path / 'gt'), 'dataroot_lq': str(tmp_path / 'lq'),
                    'io_backend': {'type': 'disk'}},
        'restorers': {'ours': {'network': str(train_opt)}}}))
    opt = load_compare_options(str(cfg))
    assert opt['restorers']['ours']['network'] == block
    cfg.write_text(cfg.read_text().replace(str(train_opt), str(tmp_path / 'missing.yml')))
    with pytest.raises(UserError, match='restorers.ours.network: no such options file'):
        load_compare_options(str(cfg))
    cfg.write_text(cfg.read_text().replace(str(tmp_path / 'missing.yml'), 'demo/stage2'))  # a packaged name
    assert load_compare_options(str(cfg))['restorers']['ours']['network'] == \
        yaml.safe_load(open(packaged_options()['demo/stage2']))['network_g']


def test_weights_that_carry_their_network_need_no_network_block(workspace, capsys):
    """Issue 15 item 2: a checkpoint saved by the plugin says which network it holds; a given network wins."""
    tmp_path, _, opt = workspace
    net = tiny_net(seed=5)  # random output conv: it changes the images
    weights = str(tmp_path / 'net_g_5.pth')
    save_networks([net], ['params'], weights, network_opt=TINY_G)
    opt['macs_size'] = None
    opt['restorers'] = {'stored': {'weights': weights}, 'given': {'network': TINY_G, 'weights': weights},
                        'random': {'network': TINY_G}}
    assert tpdiff_main(['compare', '-opt', _write(tmp_path, opt)]) == 0
    rows = _read_csv(tmp_path / 'res' / 'compare.csv')
    assert rows['stored']['network'] == 'TPDiffNet' and rows['stored']['psnr'] == rows['given']['psnr']
    assert rows['stored']['psnr'] != rows['random']['psnr'] and rows['stored']['psnr'] != rows['input (blurry)']['psnr']
    # the network given wins over the stored one: a mismatching one does not fit the weights
    opt['restorers'] = {'given': {'network': tiny_net_opts(dim=6, prior_ch=6), 'weights': weights}}
    capsys.readouterr()
    assert tpdiff_main(['compare', '-opt', _write(tmp_path, opt)]) == 2
    assert 'does not fit TPDiffNet as configured' in capsys.readouterr().err
