"""``tpdiff export``: ONNX (onnxruntime) and TorchScript graphs match PyTorch at sizes other than the traced one."""
import json

import numpy as np
import pytest
import torch

# dev requirements (requirements.txt); an environment without them (e.g. the GPU image, unless
# bench/fetch_gpu_wheels.sh carried them) skips these tests instead of failing to collect the suite
onnx = pytest.importorskip('onnx')
onnxruntime = pytest.importorskip('onnxruntime')

from conftest import tiny_net, tiny_net_opts
from tpdiff_plugin.archs.arch_util import pad_to_multiple
from tpdiff_plugin.cli import tpdiff_main
from tpdiff_plugin.inference import Deblurrer
from tpdiff_plugin.tools.export import ExportableTPDiff, check_export, export_onnx
from tpdiff_plugin.utils.checkpoint import save_networks

# traced at 32x40 (--size); checked at a multiple of 8 and at a size that is not one (padded inside the graph)
SIZES = [(40, 48), (37, 53)]


def _checkpoint(tmp_path, **overrides):
    opts = tiny_net_opts(**overrides)
    net = tiny_net(seed=3, **overrides).eval()
    path = tmp_path / 'net_g.pth'
    save_networks([net], ['params'], str(path), network_opt=opts)  # carries network_opt: no --opt needed
    return path, net


def _export(weights, out, *extra):
    return tpdiff_main(['export', '--weights', str(weights), '-o', str(out), '--size', '32x40', *extra])


def _noise(net, batch, h, w, seed):
    """The start noise as ``tpdiff deblur --seed`` draws it for an image of h x w."""
    m, s = net.pad_multiple, net.prior_scale
    shape = (batch, net.prior_ch, -(-h // m) * m // s, -(-w // m) * m // s)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference(net, lq, noise):
    """PyTorch: the network on the padded image with that noise, cropped (what Deblurrer computes, unclamped)."""
    h, w = lq.shape[-2:]
    with torch.no_grad():
        return net(pad_to_multiple(lq, net.pad_multiple), noise=noise)[..., :h, :w]


def test_onnx_matches_pytorch_and_deblur_at_two_sizes_with_dynamic_batch(tmp_path, capsys):
    weights, net = _checkpoint(tmp_path)
    out = tmp_path / 'tpdiff.onnx'
    assert _export(weights, out) == 0
    text = capsys.readouterr().out
    assert 'opset 17' in text and 'max abs difference to PyTorch' in text
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    assert [i.name for i in session.get_inputs()] == ['lq', 'noise']
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props['pad_multiple'] == '8' and props['prior_ch'] == '8' and 'N(0, I)' in props['noise']
    worst = 0.0
    for batch, (h, w) in [(1, SIZES[0]), (2, SIZES[1])]:
        lq = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(h))
        noise = _noise(net, batch, h, w, seed=5)
        got = torch.from_numpy(session.run(None, {'lq': lq.numpy(), 'noise': noise.numpy()})[0])
        want = _reference(net, lq, noise)
        assert got.shape == lq.shape
        assert (want - lq).abs().max() > 0.01  # the network changes the image, so the comparison means something
        worst = max(worst, (got - want).abs().max().item())
        if batch == 1:  # with tpdiff deblur's noise for --seed 5, the clamped output is Deblurrer's
            deblurred = Deblurrer(net, seed=5)(lq)
            assert (got.clamp(0, 1) - deblurred).abs().max() <= 1e-4
    print(f'onnxruntime vs PyTorch, max abs difference: {worst:.2e}')
    assert worst <= 1e-4


@pytest.mark.filterwarnings('ignore:.*torch.jit.load. is deprecated:FutureWarning')
def test_torchscript_matches_pytorch_at_two_sizes(tmp_path):
    weights, net = _checkpoint(tmp_path)
    out = tmp_path / 'tpdiff.pt'
    assert _export(weights, out, '--no-check') == 0
    files = {'tpdiff.json': ''}
    module = torch.jit.load(str(out), _extra_files=files)
    assert json.loads(files['tpdiff.json'])['prior_scale'] == '4'
    for h, w in SIZES:
        lq = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(w))
        noise = _noise(net, 1, h, w, seed=1)
        with torch.no_grad():
            got = module(lq, noise)
        assert (got - _reference(net, lq, noise)).abs().max() <= 1e-4


def test_a_network_without_dm_takes_the_image_only(tmp_path):
    weights, net = _checkpoint(tmp_path, use_dm=False)
    out = tmp_path / 'no_dm.onnx'
    assert _export(weights, out, '--opset', '18', '--no-check') == 0
    session = onnxruntime.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    assert [i.name for i in session.get_inputs()] == ['lq']
    lq = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    got = torch.from_numpy(session.run(None, {'lq': lq.numpy()})[0])
    with torch.no_grad():
        want = net(lq)
    assert (got - want).abs().max() <= 1e-4


def test_the_export_wrapper_is_the_network_on_the_padded_image():
    net = tiny_net(seed=2).eval()
    model = ExportableTPDiff(net)
    lq, noise = model.example_inputs(1, 37, 53, seed=4)
    assert noise.shape == (1, 8, 10, 14)
    with torch.no_grad():
        assert torch.equal(model(lq, noise), _reference(net, lq, noise))


@pytest.mark.parametrize('args, message', [
    (['-o', 'x.bin'], 'cannot tell the format'),
    (['-o', 'x.onnx', '--opset', '13'], '--opset: 13'),
    (['-o', 'x.onnx', '--size', '4x64'], 'smaller than the network\'s pad multiple 8'),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    weights, _ = _checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert tpdiff_main(['export', '--weights', str(weights), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error:') and message in err and '\n' not in err
    assert not list(tmp_path.glob('x.*'))


def test_a_checkpoint_of_another_network_is_refused(tmp_path, capsys):
    path = tmp_path / 'd.pth'
    save_networks([torch.nn.Conv2d(3, 3, 3)], ['params'], str(path))
    assert tpdiff_main(['export', '--weights', str(path), '-o', str(tmp_path / 'x.onnx')]) == 2
    assert 'error:' in capsys.readouterr().err
    assert np.all([not p.name.startswith('x.') for p in tmp_path.iterdir()])


@pytest.mark.parametrize('filter_type', ['predicted', 'feature_deform', 'separable', 'none'])
def test_every_fm_msa_filter_exports(tmp_path, filter_type):
    """The paper's filter comparison (issue 13) exports too; 'predicted' needs its kernel's shape to be a constant."""
    model = ExportableTPDiff(tiny_net(seed=1, filter_type=filter_type).eval())
    export_onnx(model, str(tmp_path / 'f.onnx'), size=(32, 40))
    diffs = check_export(model, str(tmp_path / 'f.onnx'), 'onnx', SIZES)
    assert max(diffs.values()) <= 1e-4
