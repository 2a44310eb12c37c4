"""``tpdiff explain``: the figure file, the TPE and the stage found next to the checkpoint, one-line errors."""
import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_net, tiny_net_opts
from tpdiff_plugin.archs.tpe_arch import TexturePriorEncoder
from tpdiff_plugin.cli import tpdiff_main
from tpdiff_plugin.explain import explain_figure, explain_image, figure_layout
from tpdiff_plugin.utils.checkpoint import save_networks

TPE_OPT = {'type': 'TexturePriorEncoder', 'prior_ch': 8, 'mem_slots': 16, 'prior_scale': 4, 'enc_ch': 4}


@pytest.fixture
def setup(tmp_path):
    """An experiment folder as basicsr leaves it: ``models/net_g_5.pth`` and ``net_tpe_5.pth`` (with their
    network options) and the options copy ``stage1.yml``; and a 40x52 input image."""
    models = tmp_path / 'exp' / 'models'
    models.mkdir(parents=True)
    net = tiny_net(0)
    torch.manual_seed(1)
    tpe = TexturePriorEncoder(**{k: v for k, v in TPE_OPT.items() if k != 'type'})
    save_networks([net], ['params'], str(models / 'net_g_5.pth'), network_opt=tiny_net_opts())
    save_networks([tpe], ['params'], str(models / 'net_tpe_5.pth'), network_opt=TPE_OPT)
    (tmp_path / 'exp' / 'stage1.yml').write_text('# GENERATE TIME: ...\n' + yaml.safe_dump(
        {'name': 'exp', 'model_type': 'TPDiffModel', 'stage': 1}))
    img = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'in.png'), img)
    return {'tmp': tmp_path, 'weights': models / 'net_g_5.pth', 'tpe_path': models / 'net_tpe_5.pth',
            'net': net, 'tpe': tpe, 'img': img[..., ::-1].copy()}


def _explain(*args):
    return tpdiff_main(['explain', *map(str, args)])


def test_figure_of_a_stage1_checkpoint_finds_its_tpe_and_stage(setup, capsys):
    out = setup['tmp'] / 'fig' / 'explain.png'
    assert _explain('-i', setup['tmp'] / 'in.png', '-o', out, '--weights', setup['weights'], '--device', 'cpu') == 0
    text = capsys.readouterr().out
    assert 'net_tpe_5.pth (next to --weights)' in text and 'stage 1, from' in text and 'stage1.yml' in text
    assert 'TPE read (learned memory)' in text and 'the TPE read selected' in text
    fig = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    fig_h, fig_w, _, _ = figure_layout(40, 52)
    assert fig.shape == (fig_h, fig_w, 3)
    expected = explain_figure(explain_image(setup['net'], setup['img'], tpe=setup['tpe'], stage=1, tile=512))
    np.testing.assert_array_equal(fig, expected)  # the API's figure, written losslessly


def test_stage_option_and_a_figure_without_tpe(setup, capsys):
    alone = setup['tmp'] / 'alone' / 'net_g_5.pth'  # no TPE and no experiment options next to it
    alone.parent.mkdir()
    alone.write_bytes(setup['weights'].read_bytes())
    out = setup['tmp'] / 'no_tpe.png'
    assert _explain('-i', setup['tmp'] / 'in.png', '-o', out, '--weights', alone, '--tile', 0, '--seed', 2) == 0
    text = capsys.readouterr().out
    assert 'stage unknown' in text and 'assumed 2' in text and 'no TPE checkpoint' in text
    assert 'DM sample (seed 2)' in text and 'DM output layer' in text
    fig = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    _, _, (ph, pw), origins = figure_layout(40, 52)
    y, x = origins[3]
    assert (fig[y:y + ph, x:x + pw] == 200).all()  # no memory index without a TPE
    # --stage and --tpe given explicitly
    out2 = setup['tmp'] / 'explicit.png'
    assert _explain('-i', setup['tmp'] / 'in.png', '-o', out2, '--weights', alone, '--tpe', setup['tpe_path'],
                    '--stage', 2, '--tile', 32, '--tile-overlap', 8) == 0
    text = capsys.readouterr().out
    assert 'memory entry nearest the DM prior' in text and 'tile 32' in text


@pytest.mark.parametrize('case, match', [
    ('missing_weights', '--weights: no such checkpoint file'),
    ('missing_input', '-i: no such image file'),
    ('bad_image', 'cannot decode'),
    ('bad_output', '-o: '),
    ('missing_tpe', '--tpe: no such checkpoint file'),
    ('stage1_without_tpe', 'comes from its TPE'),
    ('tile', '--tile: 16 must be larger than 2 x --tile-overlap'),
])
def test_bad_input_is_one_line_and_exit_code_2(setup, capsys, case, match):
    tmp = setup['tmp']
    args = ['-i', tmp / 'in.png', '-o', tmp / 'o.png', '--weights', setup['weights']]
    if case == 'missing_weights':
        args[5] = tmp / 'nope.pth'
    elif case == 'missing_input':
        args[1] = tmp / 'nope.png'
    elif case == 'bad_image':
        (tmp / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
        args[1] = tmp / 'broken.png'
    elif case == 'bad_output':
        args[3] = tmp / 'o.txt'
    elif case == 'missing_tpe':
        args += ['--tpe', tmp / 'nope_tpe.pth']
    elif case == 'stage1_without_tpe':
        setup['tpe_path'].unlink()
    elif case == 'tile':
        args += ['--tile', 16, '--tile-overlap', 8]
    assert _explain(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and match in err and '\n' not in err, err
    assert not (tmp / 'o.png').exists()
