"""Bad input at every user-facing entry point: one clear line naming the culprit, a non-zero exit, and no
partial output that looks complete.

Entry points: ``basicsr train`` / ``basicsr test`` (options checks in ``option_check.py``, then the
pipeline), ``tpdiff make-lmdb`` / ``make-demo`` / ``deblur`` / ``compare``, and ``UnpairedImageDataset``.
A full disk is simulated with ``RLIMIT_FSIZE`` in a subprocess (SIGXFSZ ignored, so writes fail with
EFBIG) or with an ``OSError(ENOSPC)`` injected into the checkpoint writer.
"""
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import BIN, REPO, tiny_net
from test_determinism import demo_data, tiny_options, write_options  # noqa: F401  (fixture)
from tpdiff_plugin import cli
from tpdiff_plugin.data.unpaired_image_dataset import UnpairedImageDataset
from tpdiff_plugin.utils.errors import UserError


def one_line_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith('error: '), err
    return err[-1]


# ------------------------------------------------------------------------------------------- images
def write_image(path, kind):
    """An image file of the given kind; returns its path."""
    rng = np.random.default_rng(0)
    if kind == 'not_an_image':
        path = path.with_suffix('.png')
        path.write_bytes(b'this is not a PNG at all\n')
        return path
    if kind == 'corrupt_jpeg':
        path = path.with_suffix('.jpg')
        ok, buf = cv2.imencode('.jpg', rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
        path.write_bytes(buf.tobytes()[:300])
        return path
    path = path.with_suffix('.png')
    img = {
        '1x1': np.full((1, 1, 3), 77, np.uint8),
        'gray': rng.integers(0, 255, (48, 48), dtype=np.uint8),
        '16bit': rng.integers(0, 65535, (48, 48, 3), dtype=np.uint16),
        'rgba_transparent': np.dstack([rng.integers(0, 255, (48, 48, 3), dtype=np.uint8),
                                       np.full((48, 48), 100, np.uint8)]),
        'rgb': rng.integers(0, 255, (48, 48, 3), dtype=np.uint8),
    }[kind]
    cv2.imwrite(str(path), img)
    return path


REFUSED = {'not_an_image': 'cannot decode', 'corrupt_jpeg': 'cannot decode', 'rgba_transparent': 'transparent'}
ACCEPTED = ('gray', '16bit')


# ------------------------------------------------------------------------------------- the dataset
def _dataset(blur, sharp, backend='disk', gt_size=32):
    ds = UnpairedImageDataset({'dataroot_blur': str(blur), 'dataroot_sharp': str(sharp), 'gt_size': gt_size,
                               'io_backend': {'type': backend}, 'phase': 'train'})
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize('kind', sorted(REFUSED) + ['1x1'])
def test_dataset_refuses_bad_images_naming_the_file(tmp_path, kind):
    (tmp_path / 'blur').mkdir()
    (tmp_path / 'sharp').mkdir()
    bad = write_image(tmp_path / 'blur' / 'bad', kind)
    write_image(tmp_path / 'sharp' / 'ok', 'rgb')
    with pytest.raises(UserError) as err:
        _dataset(tmp_path / 'blur', tmp_path / 'sharp')
    assert bad.name in str(err.value) and '\n' not in str(err.value)
    assert (REFUSED.get(kind) or 'smaller than gt_size') in str(err.value)


@pytest.mark.parametrize('kind', ACCEPTED)
def test_dataset_accepts_gray_and_16bit_as_8bit_colour(tmp_path, kind):
    (tmp_path / 'blur').mkdir()
    (tmp_path / 'sharp').mkdir()
    write_image(tmp_path / 'blur' / 'x', kind)
    write_image(tmp_path / 'sharp' / 'ok', 'rgb')
    item = _dataset(tmp_path / 'blur', tmp_path / 'sharp')[0]
    assert item['lq'].shape == (3, 32, 32) and 0 <= item['lq'].min() and item['lq'].max() <= 1
    if kind == 'gray':
        assert torch.equal(item['lq'][0], item['lq'][1]) and torch.equal(item['lq'][1], item['lq'][2])


def _copy_lmdb(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_dataset_missing_and_empty_lmdb(tmp_path, demo_data):
    with pytest.raises(UserError, match='dataroot_blur: LMDB not found: .*nope.lmdb'):
        _dataset(tmp_path / 'nope.lmdb', demo_data / 'train_sharp.lmdb', 'lmdb')
    import lmdb
    empty = tmp_path / 'empty.lmdb'
    lmdb.open(str(empty), map_size=1 << 20).close()
    (empty / 'meta_info.txt').write_text('')
    with pytest.raises(UserError, match='empty.lmdb is empty'):
        _dataset(empty, demo_data / 'train_sharp.lmdb', 'lmdb')


@pytest.mark.parametrize('edit, message', [
    (lambda lines: lines[:-1], 'disagrees with the LMDB'),  # a key missing from meta_info
    (lambda lines: [lines[0].replace('(128,128,3)', '(128,128)')] + lines[1:], 'line 1'),  # malformed shape
])
def test_dataset_bad_meta_info(tmp_path, demo_data, edit, message):
    bad = _copy_lmdb(demo_data / 'train_blur.lmdb', tmp_path / 'bad.lmdb')
    lines = (bad / 'meta_info.txt').read_text().splitlines()
    (bad / 'meta_info.txt').write_text('\n'.join(edit(lines)) + '\n')
    with pytest.raises(UserError, match=message) as err:
        _dataset(bad, demo_data / 'train_sharp.lmdb', 'lmdb')
    assert 'bad.lmdb' in str(err.value)


def test_dataset_meta_info_overstating_an_image_size(tmp_path, demo_data):
    import lmdb
    bad = _copy_lmdb(demo_data / 'train_blur.lmdb', tmp_path / 'lie.lmdb')
    key = (bad / 'meta_info.txt').read_text().split('.png')[0]
    env = lmdb.open(str(bad), map_size=1 << 26)
    with env.begin(write=True) as txn:  # the value becomes a 16x16 image; meta_info still says 128x128
        txn.put(key.encode(), cv2.imencode('.png', np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    env.close()
    with pytest.raises(UserError, match=key):
        _dataset(bad, demo_data / 'train_sharp.lmdb', 'lmdb')


def _truncated(tmp_path, demo_data):
    bad = _copy_lmdb(demo_data / 'train_blur.lmdb', tmp_path / 'trunc.lmdb')
    size = (bad / 'data.mdb').stat().st_size
    with open(bad / 'data.mdb', 'r+b') as f:
        f.truncate(size // 3)
    return bad


def test_dataset_truncated_lmdb(tmp_path, demo_data):
    bad = _truncated(tmp_path, demo_data)
    code = textwrap.dedent(f"""
        import tpdiff_plugin
        from tpdiff_plugin.data.unpaired_image_dataset import UnpairedImageDataset
        from tpdiff_plugin.utils.errors import UserError
        try:
            ds = UnpairedImageDataset({{'dataroot_blur': {str(bad)!r}, 'gt_size': 32, 'io_backend': {{'type': 'lmdb'}},
                                       'dataroot_sharp': {str(demo_data / 'train_sharp.lmdb')!r}}})
            [ds[i] for i in range(len(ds))]
        except UserError as e:
            print('USERERROR', e)
    """)
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and 'USERERROR' in res.stdout and 'trunc.lmdb' in res.stdout


# ---------------------------------------------------------------------------------- basicsr train
def _train_opt(tmp_path, demo_data, **changes):
    opt = tiny_options(demo_data, 'bad', total_iter=2, save_freq=2)
    for dotted, value in changes.items():
        *parents, last = dotted.split('.')
        block = opt
        for p in parents:
            block = block[p]
        if value is _DELETE:
            block.pop(last)
        else:
            block[last] = value
    return opt


_DELETE = object()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    return tmp_path


def _rename(opt, old, new):
    opt[new] = opt.pop(old)
    return opt


@pytest.mark.parametrize('mutate, culprit', [
    (lambda o: _rename(o, 'network_g', 'netwrok_g'), 'unknown option "netwrok_g"; did you mean "network_g"?'),
    (lambda o: _rename(o, 'train', 'trian'), 'unknown option "trian"; did you mean "train"?'),
    (lambda o: o['train'].update(totl_iter=5), 'unknown option "train.totl_iter"; did you mean "total_iter"?'),
    (lambda o: o['logger'].update(print_frq=5), 'unknown option "logger.print_frq"; did you mean "print_freq"?'),
    (lambda o: o['datasets']['train'].update(gt_szie=32), 'unknown option "datasets.train.gt_szie"; did you mean '
     '"gt_size"?'),
    (lambda o: o['path'].update(pretrain_netwrk_g='x.pth'), 'unknown option "path.pretrain_netwrk_g"'),
    (lambda o: o['train'].update(total_iter='abc'), "train.total_iter must be a positive integer, got 'abc'"),
    (lambda o: o['datasets']['train'].update(gt_size=-3), 'datasets.train.gt_size must be a positive integer, '
     'got -3'),
    (lambda o: o['datasets']['train'].update(batch_size_per_gpu=0), 'datasets.train.batch_size_per_gpu must be a '
     'positive integer'),
    (lambda o: o['train']['optim_g'].update(lr='2e-4'), "train.optim_g.lr must be a number >= 0, got '2e-4' (YAML"),
    (lambda o: o['network_tpe'].update(prior_scale=2), 'network_g.prior_scale (4) and network_tpe.prior_scale (2) '
     'differ'),
    (lambda o: o['network_g'].update(prior_scale=0) or o['network_tpe'].update(prior_scale=0),
     'network_g.prior_scale must be a positive integer, got 0'),
    (lambda o: o['datasets']['train'].update(dataroot_sharp='missing.lmdb'), 'datasets.train.dataroot_sharp: no '
     'such file or folder: missing.lmdb'),
    (lambda o: o['train'].update(max_bad_iters=0), 'train.max_bad_iters must be a positive integer, got 0'),
    (lambda o: o.update(num_gpu=64), 'num_gpu is 64 but this machine has'),
    (lambda o: o['train'].update(scheduler={'type': 'CosineAnnealingRestartLR', 'periods': [1],
                                            'restart_weights': [1]}),
     'train.scheduler.periods add up to 1, fewer than train.total_iter (2)'),
    (lambda o: o['train'].update(scheduler={'type': 'CosineAnnealingRestartLR', 'periods': 2,
                                            'restart_weights': [1]}),
     'train.scheduler.periods must be a list of positive iteration counts, got 2'),
])
def test_basicsr_train_refuses_bad_options(in_tmp, demo_data, capsys, mutate, culprit):
    opt = _train_opt(in_tmp, demo_data)
    mutate(opt)
    path = write_options(in_tmp, opt)
    assert cli.basicsr_main(['train', '-opt', str(path)]) == 2
    line = one_line_error(capsys)
    assert str(path) in line and culprit in line, line
    assert not (in_tmp / 'experiments').exists()  # refused before anything was created


def test_a_cosine_schedule_that_covers_total_iter_passes(in_tmp, demo_data):
    from tpdiff_plugin.option_check import validate_options
    opt = _train_opt(in_tmp, demo_data)
    for periods in ([2], [1, 1], [5]):
        opt['train']['scheduler'] = {'type': 'CosineAnnealingRestartLR', 'periods': periods,
                                     'restart_weights': [1] * len(periods)}
        validate_options(opt, 'x.yml')  # no error


def test_unknown_keys_of_upstream_models_are_left_to_basicsr(tmp_path):
    from tpdiff_plugin.option_check import validate_schema
    validate_schema({'name': 'x', 'model_type': 'SRModel', 'netwrok_g': {}, 'trian': {}}, 'x.yml')


def test_basicsr_train_truncated_lmdb(in_tmp, demo_data, capsys):
    bad = _truncated(in_tmp, demo_data)
    path = write_options(in_tmp, _train_opt(in_tmp, demo_data, **{'datasets.train.dataroot_blur': str(bad)}))
    assert cli.basicsr_main(['train', '-opt', str(path)]) == 2
    line = one_line_error(capsys)
    assert 'datasets.train.dataroot_blur' in line and 'trunc.lmdb/data.mdb is truncated' in line


def test_basicsr_train_empty_lmdb(in_tmp, demo_data, capsys):
    import lmdb
    empty = in_tmp / 'empty.lmdb'
    lmdb.open(str(empty), map_size=1 << 20).close()
    (empty / 'meta_info.txt').write_text('')
    path = write_options(in_tmp, _train_opt(in_tmp, demo_data, **{'datasets.train.dataroot_sharp': str(empty)}))
    assert cli.basicsr_main(['train', '-opt', str(path)]) == 2
    line = one_line_error(capsys)
    assert 'dataroot_sharp' in line and 'is empty' in line
    assert not list(in_tmp.glob('experiments/*/models/*.pth'))


def test_basicsr_train_stage2_missing_stage1_checkpoint(in_tmp, demo_data, capsys):
    opt = tiny_options(demo_data, 'bad2', stage_file='demo/stage2.yml')
    missing = in_tmp / 'experiments' / 'stage1' / 'models' / 'net_tpe_latest.pth'
    opt['path'].update(pretrain_network_tpe=str(missing))
    path = write_options(in_tmp, opt)
    assert cli.basicsr_main(['train', '-opt', str(path)]) == 2
    line = one_line_error(capsys)
    assert 'path.pretrain_network_' in line and 'no such checkpoint' in line


def test_basicsr_train_stage2_without_stage1_paths(in_tmp, demo_data, capsys):
    opt = tiny_options(demo_data, 'bad3', stage_file='demo/stage2.yml')
    for key in list(opt['path']):
        if key.startswith(('pretrain_network', 'resume_optim')):
            opt['path'][key] = None
    path = write_options(in_tmp, opt)
    assert cli.basicsr_main(['train', '-opt', str(path)]) == 2
    assert 'is required in stage 2' in one_line_error(capsys)


def test_basicsr_train_full_disk_at_a_checkpoint(tmp_path, demo_data):
    """ENOSPC while writing 4.state: exit 2 with one line; the checkpoint of iteration 2 stays complete and
    no temporary or half-written 4.state is left, so --auto_resume would pick 2."""
    path = write_options(tmp_path, tiny_options(demo_data, 'full', total_iter=6, save_freq=2))
    script = textwrap.dedent(f"""
        import errno, os, sys, torch
        save = torch.save
        def full(obj, f, *a, **k):
            if os.path.basename(getattr(f, 'name', '')).startswith('.4.state'):
                f.write(b'partial')
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return save(obj, f, *a, **k)
        torch.save = full
        from tpdiff_plugin.cli import basicsr_main
        sys.exit(basicsr_main(['train', '-opt', {str(path)!r}]))
    """)
    res = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('error: cannot write ') and '4.state: No space left on device' in last, last
    exp = tmp_path / 'experiments' / 'full'
    assert sorted(p.name for p in (exp / 'training_states').iterdir()) == ['2.state']
    assert torch.load(exp / 'training_states' / '2.state', weights_only=True)['iter'] == 2


# ----------------------------------------------------------------------------------- basicsr test
def test_basicsr_test_unknown_key_and_missing_data(in_tmp, capsys):
    opt = yaml.safe_load((REPO / 'options' / 'test' / 'demo.yml').read_text())
    opt['netwrok_tpe'] = opt.pop('network_tpe', {})
    path = in_tmp / 't.yml'
    path.write_text(yaml.safe_dump(opt))
    assert cli.basicsr_main(['test', '-opt', str(path)]) == 2
    assert 'did you mean "network_tpe"?' in one_line_error(capsys)
    opt['network_tpe'] = opt.pop('netwrok_tpe')
    path.write_text(yaml.safe_dump(opt))
    assert cli.basicsr_main(['test', '-opt', str(path)]) == 2  # the demo data is not built in tmp
    line = one_line_error(capsys)
    assert 'no such file or folder' in line or 'no such checkpoint' in line


# ------------------------------------------------------------------------------- tpdiff tools
def _limited_fsize():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def _tpdiff_full_disk(args, cwd):
    return subprocess.run([str(BIN / 'tpdiff')] + args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limited_fsize, env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_make_demo_full_disk_leaves_nothing(tmp_path):
    res = _tpdiff_full_disk(['make-demo', '--output', 'out/demo'], tmp_path)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('error: make-demo: ') and 'out/demo' in last and 'disk space' in last
    assert not (tmp_path / 'out' / 'demo').exists()
    assert not [p for p in tmp_path.rglob('*') if p.is_file()]  # not even a hidden temporary folder


def test_make_demo_refuses_an_existing_output(tmp_path, capsys):
    (tmp_path / 'demo').mkdir()
    (tmp_path / 'demo' / 'mine.txt').write_text('keep me')
    assert cli.tpdiff_main(['make-demo', '--output', str(tmp_path / 'demo')]) == 2
    assert str(tmp_path / 'demo') in one_line_error(capsys)
    assert (tmp_path / 'demo' / 'mine.txt').read_text() == 'keep me'


def _image_folder(root, kinds):
    root.mkdir(parents=True, exist_ok=True)
    return [write_image(root / f'{i}_{k}', k) for i, k in enumerate(kinds)]


def test_make_lmdb_full_disk_leaves_nothing(tmp_path):
    _image_folder(tmp_path / 'imgs', ['rgb'] * 4)
    for p in (tmp_path / 'imgs').iterdir():  # big enough to pass the file size limit once written
        cv2.imwrite(str(p), np.random.default_rng(1).integers(0, 255, (160, 160, 3), dtype=np.uint8))
    res = _tpdiff_full_disk(['make-lmdb', '--layout', 'folder', '--input', 'imgs', '--output', 'lm'], tmp_path)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith('error: make-lmdb: ') and 'lm' in last
    assert not (tmp_path / 'lm').exists() or not list((tmp_path / 'lm').glob('*.lmdb'))


@pytest.mark.parametrize('kind', sorted(REFUSED))
def test_make_lmdb_refuses_a_bad_image_and_writes_nothing(tmp_path, capsys, kind):
    bad = _image_folder(tmp_path / 'imgs', ['rgb', kind])[1]
    code = cli.tpdiff_main(['make-lmdb', '--layout', 'folder', '--input', str(tmp_path / 'imgs'),
                            '--output', str(tmp_path / 'lm')])
    assert code == 2
    line = one_line_error(capsys)
    assert bad.name in line and REFUSED[kind] in line
    assert not (tmp_path / 'lm').exists() or not list((tmp_path / 'lm').glob('*.lmdb'))


def test_make_lmdb_missing_input(tmp_path, capsys):
    code = cli.tpdiff_main(['make-lmdb', '--layout', 'folder', '--input', str(tmp_path / 'nope'),
                            '--output', str(tmp_path / 'lm')])
    assert code == 2 and 'nope' in one_line_error(capsys)


@pytest.fixture(scope='module')
def demo_weights(tmp_path_factory):
    """Weights for options/demo/stage2.yml's network_g (as initialised: the values do not matter here)."""
    from basicsr.archs import build_network
    opt = yaml.safe_load((REPO / 'options' / 'demo' / 'stage2.yml').read_text())
    torch.manual_seed(0)
    net = build_network(opt['network_g'])
    path = tmp_path_factory.mktemp('w') / 'net_g.pth'
    torch.save({'params': net.state_dict()}, path)
    return path


def _deblur(inp, out, weights, *extra):
    return cli.tpdiff_main(['deblur', '-i', str(inp), '-o', str(out), '--weights', str(weights), '--opt',
                            str(REPO / 'options' / 'demo' / 'stage2.yml'), '--quiet', '--device', 'cpu', *extra])


@pytest.mark.parametrize('kind', ['corrupt_jpeg', 'not_an_image'])
def test_deblur_refuses_bad_images(tmp_path, capsys, demo_weights, kind):
    """A file that cannot be used is skipped and listed (the others would still run); exit 1."""
    bad = write_image(tmp_path / 'in', kind)
    assert _deblur(bad, tmp_path / 'out', demo_weights) == 1
    out = capsys.readouterr().out
    assert 'deblurred 0 of 1' in out and '1 image(s) failed' in out
    assert any(bad.name in line and REFUSED[kind] in line for line in out.splitlines())
    assert not (tmp_path / 'out').exists() or not [p for p in (tmp_path / 'out').rglob('*') if p.is_file()]


@pytest.mark.parametrize('kind', ['1x1', 'gray', '16bit', 'rgba_transparent'])
def test_deblur_keeps_the_format_of_tiny_gray_16bit_and_alpha_images(tmp_path, demo_weights, kind):
    """deblur gives back the input's kind (documented): size, gray or colour, bit depth; alpha passed through."""
    src = write_image(tmp_path / 'in', kind)
    assert _deblur(src, tmp_path / 'out', demo_weights) == 0
    outs = [p for p in (tmp_path / 'out').rglob('*') if p.is_file()]
    assert len(outs) == 1
    img, ref = (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in (outs[0], src))
    assert img.shape == ref.shape and img.dtype == ref.dtype
    if kind == 'rgba_transparent':
        assert np.array_equal(img[..., 3], ref[..., 3])


def test_deblur_missing_input_and_weights(tmp_path, capsys, demo_weights):
    assert _deblur(tmp_path / 'nope.png', tmp_path / 'out', demo_weights) == 2
    assert 'nope.png' in one_line_error(capsys)
    src = write_image(tmp_path / 'in', 'rgb')
    assert _deblur(src, tmp_path / 'out', tmp_path / 'none.pth') == 2
    assert 'none.pth' in one_line_error(capsys)


@pytest.mark.parametrize('prior_scale', [3, 5])
def test_prior_scale_always_divides_the_padded_size(prior_scale):
    """TPDiffNet pads to a multiple of lcm(8, prior_scale), so an odd prior_scale and odd sizes still work and
    the output is cropped back to the input size."""
    net = tiny_net(prior_scale=prior_scale).eval()
    x = torch.rand(1, 3, 13, 29)
    with torch.no_grad():
        y = net(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_compare_missing_and_invalid_options(tmp_path, capsys):
    assert cli.tpdiff_main(['compare', '-opt', str(tmp_path / 'nope.yml')]) == 2
    assert 'nope.yml' in one_line_error(capsys)
    bad = tmp_path / 'bad.yml'
    bad.write_text('restorers: [unclosed\n')
    assert cli.tpdiff_main(['compare', '-opt', str(bad)]) == 2
    assert 'bad.yml' in one_line_error(capsys)


def test_basicsr_train_stage2_with_a_missing_resume_optim_d(in_tmp, demo_data, capsys):
    """A wrong path.resume_optim_d is one line naming the key, and nothing is created at that path."""
    opt = tiny_options(demo_data, 'bad4', stage_file='demo/stage2.yml')
    for key in list(opt['path']):
        if key.startswith('pretrain_network'):
            opt['path'][key] = None
    missing = in_tmp / 'no_stage1' / 'training_states'
    opt['path']['resume_optim_d'] = str(missing)
    path = write_options(in_tmp, opt)
    assert cli.basicsr_main(['train', '-opt', str(path)]) == 2
    assert 'path.resume_optim_d: no such training state or folder' in one_line_error(capsys)
    assert not missing.exists()
