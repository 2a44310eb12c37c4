"""``tpdiff deblur``: files, folders and globs; names and bit depth kept; one-line errors; failures summarised."""
import cv2
import numpy as np
import pytest
import torch
import yaml
from basicsr.models import build_model

from conftest import tiny_net, tiny_net_opts
from tpdiff_plugin.cli import tpdiff_main
from tpdiff_plugin.inference import Deblurrer

TINY_G = tiny_net_opts()  # random output conv, so that the network changes images


@pytest.fixture
def setup(tmp_path):
    """A tiny trained-looking checkpoint (params + params_ema), its options file and a folder of inputs."""
    net, ema = tiny_net(seed=0), tiny_net(seed=1)
    weights = tmp_path / 'net_g_100.pth'
    torch.save({'params': net.state_dict(), 'params_ema': ema.state_dict()}, weights)
    opt = tmp_path / 'opt.yml'
    opt.write_text(yaml.safe_dump({'name': 'x', 'model_type': 'TPDiffModel', 'network_g': TINY_G}))
    src = tmp_path / 'in'
    src.mkdir()
    rng = np.random.default_rng(0)
    images = {
        'a.png': rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        'b16.png': rng.integers(0, 65536, (36, 44, 3)).astype(np.uint16),
        'gray.png': rng.integers(0, 256, (30, 34), dtype=np.uint8),
        'photo.jpg': rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
    }
    for name, img in images.items():
        cv2.imwrite(str(src / name), img)
    (src / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    (src / 'notes.txt').write_text('not an image')
    return {'weights': str(weights), 'opt': str(opt), 'src': src, 'tmp': tmp_path, 'ema': ema.eval(),
            'images': images}


def _deblur(*args):
    return tpdiff_main(['deblur', *map(str, args), '--quiet'])


def test_folder_keeps_names_and_bit_depth_and_reports_the_corrupt_file(setup, capsys):
    out = setup['tmp'] / 'out'
    code = _deblur('-i', setup['src'], '-o', out, '--weights', setup['weights'], '--opt', setup['opt'],
                   '--tile', 32, '--tile-overlap', 8)
    text = capsys.readouterr().out
    assert code == 1  # one file failed, the others were processed
    assert 'deblurred 4 of 5' in text and 'broken.png: cannot decode' in text
    assert sorted(p.name for p in out.iterdir()) == ['a.png', 'b16.png', 'gray.png', 'photo.jpg']
    for name, img in setup['images'].items():
        res = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert res.dtype == img.dtype and res.shape == img.shape, name
    # the values are the API's (params_ema, tiled the same way, same seed, on the device the CLI picks by default:
    # CUDA where there is one, whose kernels round a few pixels a grey level away from the CPU's), 16-bit at 16 bits
    d = Deblurrer(setup['ema'], device='auto', tile=32, tile_overlap=8, seed=0)
    b16 = cv2.cvtColor(setup['images']['b16.png'], cv2.COLOR_BGR2RGB)
    expected = cv2.cvtColor(d(b16), cv2.COLOR_RGB2BGR)
    np.testing.assert_array_equal(cv2.imread(str(out / 'b16.png'), cv2.IMREAD_UNCHANGED), expected)
    assert np.unique(expected % 257).size > 1
    a = cv2.cvtColor(setup['images']['a.png'], cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(cv2.imread(str(out / 'a.png')), cv2.cvtColor(d(a), cv2.COLOR_RGB2BGR))
    assert not np.array_equal(cv2.imread(str(out / 'a.png')), setup['images']['a.png'])  # it did change


def test_single_file_to_a_file_name_and_a_glob_to_a_folder(setup, capsys):
    target = setup['tmp'] / 'res' / 'sharp.png'
    assert _deblur('-i', setup['src'] / 'a.png', '-o', target, '--weights', setup['weights'], '--opt',
                   setup['opt'], '--tile', 0) == 0
    assert cv2.imread(str(target)).shape == (40, 56, 3)
    # --tile 0: whole image, exactly the API's untiled result
    a = cv2.cvtColor(setup['images']['a.png'], cv2.COLOR_BGR2RGB)
    expected = Deblurrer(setup['ema'], device='auto', seed=0)(a)
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(target)), cv2.COLOR_BGR2RGB), expected)
    out = setup['tmp'] / 'globbed'
    assert _deblur('-i', str(setup['src'] / '*.png'), '-o', out, '--weights', setup['weights'], '--opt',
                   setup['opt'], '--seed', 3) == 1  # broken.png matches the glob too
    assert sorted(p.name for p in out.iterdir()) == ['a.png', 'b16.png', 'gray.png']
    capsys.readouterr()


@pytest.mark.parametrize('case,match', [
    ('missing_weights', '--weights: no such checkpoint file'),
    ('other_arch', 'does not fit TPDiffNet as configured'),
    ('other_arch', 'carries no network options (it predates stored options'),  # an old checkpoint, no --opt
    ('tile', '--tile: 64 must be larger than 2 x --tile-overlap'),
    ('overwrite', 'would overwrite the input'),
    ('no_input', '-i: no such file or folder'),
    ('empty_glob', 'matches no image files'),
])
def test_bad_input_is_one_line_and_exit_code_2(setup, capsys, case, match):
    src, tmp = setup['src'], setup['tmp']
    args = ['-i', src / 'a.png', '-o', tmp / 'o', '--weights', setup['weights'], '--opt', setup['opt']]
    if case == 'missing_weights':
        args[5] = tmp / 'nope.pth'
    elif case == 'other_arch':
        args = args[:6]  # no --opt: the paper-size TPDiffNet, which the tiny checkpoint does not fit
    elif case == 'tile':
        args += ['--tile', 64, '--tile-overlap', 32]
    elif case == 'overwrite':
        args[1], args[3] = src, src
    elif case == 'no_input':
        args[1] = tmp / 'nothing_here'
    elif case == 'empty_glob':
        args[1] = str(tmp / '*.tif')
    assert _deblur(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: ') and match in err and '\n' not in err, err
    assert not (tmp / 'o').exists()


def test_console_script_runs_with_a_progress_bar(setup, cli_runner):
    out = setup['tmp'] / 'cli'
    res = cli_runner(['tpdiff', 'deblur', '-i', str(setup['src'] / 'a.png'), str(setup['src'] / 'gray.png'),
                      '-o', str(out), '--weights', setup['weights'], '--opt', setup['opt'], '--device', 'cpu'],
                     cwd=setup['tmp'])
    assert res.returncode == 0, res.stderr
    assert 'deblurred 2 of 2 image(s)' in res.stdout and 'device cpu' in res.stdout
    assert '2/2' in res.stderr  # tqdm over the files
    assert sorted(p.name for p in out.iterdir()) == ['a.png', 'gray.png']


def _png_declaring(path, width, height):
    """A valid 8x8 PNG whose IHDR is patched to declare ``width`` x ``height`` (CRC fixed): a decompression bomb's
    shape without its bytes."""
    import struct
    import zlib
    ok, buf = cv2.imencode('.png', np.zeros((8, 8, 3), np.uint8))
    data = bytearray(buf.tobytes())
    data[16:24] = struct.pack('>II', width, height)
    data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])) & 0xffffffff)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('width, height, limit, match', [
    (100000, 100000, None, 'its header declares more than 179 MP'),  # over Pillow's bomb limit
    (16000, 10000, None, 'its header declares 16000x10000 (160 MP), over the limit of 150 MP'),
    (4000, 3000, 10, 'its header declares 4000x3000 (12 MP), over the limit of 10 MP'),
])
def test_an_enormous_declared_size_is_refused_before_decoding(setup, capsys, width, height, limit, match):
    src = setup['tmp'] / 'bombs'
    src.mkdir()
    _png_declaring(src / 'bomb.png', width, height)
    cv2.imwrite(str(src / 'ok.png'), setup['images']['a.png'])
    out = setup['tmp'] / 'out'
    extra = ['--max-megapixels', limit] if limit else []
    code = _deblur('-i', src, '-o', out, '--weights', setup['weights'], '--opt', setup['opt'], *extra)
    text = capsys.readouterr().out
    assert code == 1 and 'deblurred 1 of 2' in text
    assert f'bomb.png: {match}' in text
    assert sorted(p.name for p in out.iterdir()) == ['ok.png']  # nothing written for the refused file


def test_checkpoint_with_nan_weights_is_refused_naming_the_tensor(setup, capsys):
    net = tiny_net(seed=0)
    state = net.state_dict()
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name].view(-1)[0] = float('nan')
    bad = setup['tmp'] / 'nan.pth'
    torch.save({'params': state}, bad)
    out = setup['tmp'] / 'out'
    code = _deblur('-i', setup['src'] / 'a.png', '-o', out / 'a.png', '--weights', bad, '--opt', setup['opt'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f'nan.pth: tensor {name} holds 1 NaN/Inf value(s)' in err[0]
    assert not out.exists()


def test_non_finite_output_is_not_written(setup, capsys, monkeypatch):
    """Finite weights can still produce NaN (e.g. an overflow in half precision): nothing is written for it."""
    monkeypatch.setattr(Deblurrer, 'forward', lambda self, x, progress=None: torch.full_like(x, float('nan')))
    out = setup['tmp'] / 'out'
    code = _deblur('-i', setup['src'] / 'a.png', '-o', out / 'a.png', '--weights', setup['weights'],
                   '--opt', setup['opt'])
    text = capsys.readouterr().out
    assert code == 1 and 'a.png: the network produced NaN/Inf values; nothing written' in text
    assert not (out / 'a.png').exists()


# ------------------------------------------------------------------ checkpoints that carry their network (issue 15)
def _saved_by_a_model(tmp_path, ema):
    """``net_g_100.pth`` as training writes it: basicsr's (mended) save_network of a model whose network_g is
    TINY_G, with ``ema`` as params_ema."""
    opt = {'name': 'x', 'model_type': 'SRModel', 'num_gpu': 0, 'dist': False, 'rank': 0, 'world_size': 1,
           'is_train': False, 'scale': 1, 'network_g': dict(TINY_G),
           'path': {'models': str(tmp_path), 'pretrain_network_g': None}}
    tmp_path.mkdir()
    torch.manual_seed(0)
    model = build_model(opt)
    model.save_network([model.net_g, ema], 'net_g', 100, param_key=['params', 'params_ema'])
    return tmp_path / 'net_g_100.pth'


def test_weights_alone_build_the_network_the_checkpoint_carries(setup, capsys):
    weights = _saved_by_a_model(setup['tmp'] / 'models', setup['ema'])
    one, two = setup['tmp'] / 'without_opt.png', setup['tmp'] / 'with_opt.png'
    assert _deblur('-i', setup['src'] / 'a.png', '-o', one, '--weights', weights, '--tile', 32,
                   '--tile-overlap', 8) == 0
    assert _deblur('-i', setup['src'] / 'a.png', '-o', two, '--weights', weights, '--opt', setup['opt'],
                   '--tile', 32, '--tile-overlap', 8) == 0
    np.testing.assert_array_equal(cv2.imread(str(one)), cv2.imread(str(two)))
    a = cv2.cvtColor(setup['images']['a.png'], cv2.COLOR_BGR2RGB)  # the values are params_ema's
    expected = Deblurrer(setup['ema'], device='auto', tile=32, tile_overlap=8, seed=0)(a)
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(one)), cv2.COLOR_BGR2RGB), expected)
    assert not np.array_equal(cv2.imread(str(one)), setup['images']['a.png'])
    # --opt wins over the stored options: a network the checkpoint does not fit is refused
    other = setup['tmp'] / 'other.yml'
    other.write_text(yaml.safe_dump({'network_g': tiny_net_opts(dim=6, prior_ch=6)}))
    capsys.readouterr()
    assert _deblur('-i', setup['src'] / 'a.png', '-o', setup['tmp'] / 'o', '--weights', weights,
                   '--opt', other) == 2
    err = capsys.readouterr().err.strip()
    assert 'does not fit TPDiffNet as configured' in err and 'pass the --opt' in err and '\n' not in err


def test_help_says_the_network_comes_from_the_checkpoint(capsys):
    with pytest.raises(SystemExit):
        tpdiff_main(['deblur', '--help'])
    assert 'stored in the checkpoint' in ' '.join(capsys.readouterr().out.split())


@pytest.mark.parametrize('flags, dtype', [(['--half'], 'bf16'), (['--half-dtype', 'fp16'], 'fp16'),
                                          (['--half', '--half-dtype', 'fp16'], 'fp16')])
def test_half_flags_write_what_the_api_computes_in_that_precision(setup, capsys, flags, dtype):
    """--half is bf16 autocast; --half-dtype fp16 picks float16 (and implies --half): the files are the API's."""
    out = setup['tmp'] / 'half.png'
    assert _deblur('-i', setup['src'] / 'a.png', '-o', out, '--weights', setup['weights'], '--opt', setup['opt'],
                   '--tile', 0, *flags) == 0
    a = cv2.cvtColor(setup['images']['a.png'], cv2.COLOR_BGR2RGB)
    for half in ('bf16', 'fp16'):
        expected = cv2.cvtColor(Deblurrer(setup['ema'], device='auto', seed=0, half=half)(a), cv2.COLOR_RGB2BGR)
        assert np.array_equal(cv2.imread(str(out)), expected) == (half == dtype), half


def test_default_tile_is_384_on_the_cpu(setup, capsys, monkeypatch):
    """Without --tile the CPU tiles at 384 px (the 4K memory target, bench/README.md); a GPU's default is 512."""
    from tpdiff_plugin.tools import deblur
    assert deblur.DEFAULT_TILE == {'cpu': 384, 'cuda': 512}
    seen = {}
    real = Deblurrer.from_checkpoint.__func__

    def spy(cls, *args, **kwargs):
        seen['tile'] = kwargs['tile']
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(Deblurrer, 'from_checkpoint', classmethod(spy))
    assert _deblur('-i', setup['src'] / 'a.png', '-o', setup['tmp'] / 'd.png', '--weights', setup['weights'],
                   '--opt', setup['opt'], '--device', 'cpu') == 0
    assert seen['tile'] == 384 and 'tile 384' in capsys.readouterr().out
    assert _deblur('-i', setup['src'] / 'a.png', '-o', setup['tmp'] / 'e.png', '--weights', setup['weights'],
                   '--opt', setup['opt'], '--tile', 0) == 0
    assert seen['tile'] is None and 'tile off' in capsys.readouterr().out
