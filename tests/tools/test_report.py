"""tpdiff report: metrics table against independent formulas, the grid layout, and one-line errors."""
import math
import os

import cv2
import numpy as np
import pytest

from conftest import tiny_net, tiny_net_opts
from tpdiff_plugin.cli import tpdiff_main
from tpdiff_plugin.inference import Deblurrer
from tpdiff_plugin.utils.artifacts import periodic_artifact_db
from tpdiff_plugin.utils.checkpoint import save_networks


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255.0 ** 2 / mse)


@pytest.fixture
def demo_dirs(tmp_path):
    """Blurry / sharp folders and a basicsr-test-like results folder for 3 images of 40x48."""
    rng = np.random.default_rng(0)
    blur_dir, sharp_dir = tmp_path / 'blur', tmp_path / 'sharp'
    vis = tmp_path / 'results' / 'TPDiff_Demo_Test' / 'visualization' / 'DemoVal'
    for d in (blur_dir, sharp_dir, vis):
        d.mkdir(parents=True)
    images = {}
    for i, key in enumerate(['cat', 'cat_2', 'mug-y0010x0020']):  # 'cat_*' also matches 'cat_2_*'
        sharp = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        blur = cv2.GaussianBlur(sharp, (7, 7), 2.0)
        out = np.clip(sharp.astype(np.int16) + rng.integers(-3, 4, sharp.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(blur_dir / f'{key}.png'), blur)
        cv2.imwrite(str(sharp_dir / f'{key}.png'), sharp)
        cv2.imwrite(str(vis / f'{key}_TPDiff_Demo_Test.png'), out)
        images[key] = (blur, out, sharp)
    return tmp_path, images


def test_table_and_grid(demo_dirs, capsys):
    root, images = demo_dirs
    results = root / 'results' / 'TPDiff_Demo_Test'
    code = tpdiff_main(['report', '--results', str(results), '--blur', str(root / 'blur'),
                        '--sharp', str(root / 'sharp')])
    assert code == 0
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line and line[0].isalnum()}
    for key, (blur, out, sharp) in images.items():
        in_psnr, in_ssim, out_psnr, out_ssim, artifact = map(float, lines[key])
        assert artifact == pytest.approx(periodic_artifact_db(out, blur), abs=0.01)
        assert in_psnr == pytest.approx(_psnr(blur, sharp), abs=0.01)
        assert out_psnr == pytest.approx(_psnr(out, sharp), abs=0.01)
        assert 0 < in_ssim < out_ssim <= 1  # the near-copy beats the blurred image
    mean_in = np.mean([_psnr(b, s) for b, _, s in images.values()])
    assert float(lines['mean'][0]) == pytest.approx(mean_in, abs=0.01)

    grid_path = root / 'results' / 'TPDiff_Demo_Test_grid.png'
    assert f'grid (blurry | deblurred | sharp): {grid_path}' in printed
    grid = cv2.imread(str(grid_path), cv2.IMREAD_COLOR)
    gap, header, h, w = 4, 22, 40, 48
    assert grid.shape == (header + 3 * (h + gap), 3 * w + 2 * gap, 3)
    for row, key in enumerate(sorted(images)):
        y = header + row * (h + gap)
        for col, img in enumerate(images[key]):
            x = col * (w + gap)
            assert np.array_equal(grid[y:y + h, x:x + w], img), (key, col)


def test_missing_results_are_reported_not_raised(demo_dirs, tmp_path, cli_runner):
    root, _ = demo_dirs
    empty = tmp_path / 'empty_results'
    (empty / 'visualization' / 'X').mkdir(parents=True)
    proc = cli_runner(['tpdiff', 'report', '--results', str(empty), '--blur', str(root / 'blur'),
                       '--sharp', str(root / 'sharp')], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith('error: ') and 'no result images' in proc.stderr
    assert 'Traceback' not in proc.stderr
    code = tpdiff_main(['report', '--results', str(tmp_path / 'nope'), '--blur', str(root / 'blur'),
                        '--sharp', str(root / 'sharp')])
    assert code == 2
    code = tpdiff_main(['report', '--results', str(empty), '--blur', str(tmp_path / 'no_lmdb'),
                        '--sharp', str(root / 'sharp')])
    assert code == 2


def test_size_mismatch_is_an_error(demo_dirs, capsys):
    root, images = demo_dirs
    key = sorted(images)[0]
    vis = root / 'results' / 'TPDiff_Demo_Test' / 'visualization' / 'DemoVal'
    cv2.imwrite(str(vis / f'{key}_TPDiff_Demo_Test.png'), np.zeros((10, 10, 3), np.uint8))
    code = tpdiff_main(['report', '--results', str(root / 'results' / 'TPDiff_Demo_Test'),
                        '--blur', str(root / 'blur'), '--sharp', str(root / 'sharp')])
    assert code == 2 and 'sizes differ' in capsys.readouterr().err
    assert os.path.isdir(vis)


def test_real_blur_rows_are_deblurred_and_shown_below(demo_dirs, tmp_path, capsys):
    """--real: images without ground truth, deblurred by the given checkpoint, appended as blurry | deblurred."""
    import torch
    import yaml
    from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
    root, images = demo_dirs
    net_opt = {'type': 'TPDiffNet', 'dim': 4, 'num_blocks': [1, 1, 1, 1], 'num_refinement_blocks': 1,
               'heads': [1, 1, 1, 1], 'prior_ch': 4, 'prior_hidden': 4, 'dm_feats': 4, 'dm_blocks': 1,
               'dm_cond_blocks': 1, 'dm_timesteps': 2}
    (tmp_path / 'opt.yml').write_text(yaml.safe_dump({'network_g': net_opt}))
    torch.save({'params': TPDiffNet(**{k: v for k, v in net_opt.items() if k != 'type'}).state_dict()},
               tmp_path / 'net.pth')
    real = tmp_path / 'real'
    real.mkdir()
    clock = np.random.default_rng(1).integers(0, 256, (30, 70, 3), dtype=np.uint8)
    cv2.imwrite(str(real / 'clock.png'), clock)
    out = tmp_path / 'grid.png'
    args = ['report', '--results', str(root / 'results' / 'TPDiff_Demo_Test'), '--blur', str(root / 'blur'),
            '--sharp', str(root / 'sharp'), '--out', str(out), '--real', str(real)]
    assert tpdiff_main(args) == 2 and '--real needs --weights' in capsys.readouterr().err
    assert tpdiff_main(args + ['--weights', str(tmp_path / 'net.pth'), '--opt', str(tmp_path / 'opt.yml')]) == 0
    assert 'clock (real blur, no ground truth): artifact +0.00 dB' in capsys.readouterr().out  # identity init
    grid = cv2.imread(str(out))
    gap, header, h, w = 4, 22, 40, 48
    y = header + 3 * (h + gap) + header
    assert grid.shape == (y + 30 + gap, max(3 * w + 2 * gap, 2 * 70 + gap), 3)
    assert np.array_equal(grid[y:y + 30, :70], clock)
    assert np.array_equal(grid[y:y + 30, 70 + gap:140 + gap], clock)  # an untrained TPDiffNet is the identity


def test_real_rows_need_only_weights_that_carry_their_network(demo_dirs, tmp_path):
    """Issue 15 item 2: --weights saved by the plugin build their own network, no --opt."""
    root, _ = demo_dirs
    net = tiny_net(seed=3).eval()  # a random output conv: the network changes images
    save_networks([net], ['params'], tmp_path / 'net.pth', network_opt=tiny_net_opts())
    real = tmp_path / 'real'
    real.mkdir()
    clock = np.random.default_rng(1).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    cv2.imwrite(str(real / 'clock.png'), clock)
    out = tmp_path / 'grid.png'
    assert tpdiff_main(['report', '--results', str(root / 'results' / 'TPDiff_Demo_Test'), '--blur', str(root / 'blur'),
                        '--sharp', str(root / 'sharp'), '--out', str(out), '--real', str(real),
                        '--weights', str(tmp_path / 'net.pth')]) == 0
    expected = Deblurrer(net, seed=0)(np.ascontiguousarray(clock[:, :, ::-1]))[:, :, ::-1]
    assert not np.array_equal(expected, clock)
    gap, header, h = 4, 22, 40
    y = header + 3 * (h + gap) + header
    assert np.array_equal(cv2.imread(str(out))[y:y + 32, 40 + gap:80 + gap], expected)
