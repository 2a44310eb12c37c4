"""``tpdiff export --format onnx|torchscript --weights W [--opt O] -o FILE``: a trained TPDiffNet as a graph.

The graph is ``out = f(lq, noise)``, deterministic (the DM's Gaussian start draw is an input, not drawn inside):

- ``lq``: ``[B, in_ch, H, W]`` float32 in [0, 1]; B, H and W are dynamic, H and W at least the pad multiple
  ``m = lcm(8, prior_scale)`` (8 for the shipped options). The graph pads the bottom/right by reflection to a
  multiple of m, as ``TPDiffNet`` does, and crops the output back.
- ``noise``: the DM's z_T, ``[B, prior_ch, ceil(H/m)·m/s, ceil(W/m)·m/s]`` (s = prior_scale), drawn from N(0, I).
  ``tpdiff deblur --seed N`` draws ``torch.randn(shape, generator=torch.Generator().manual_seed(N))`` with that
  shape. Left out for a network built with ``use_dm: false`` (its prior is zero).
- ``out``: ``[B, in_ch, H, W]``, ``lq`` + the residual, not clamped (``tpdiff deblur`` clamps to [0, 1]).

FM-MSA's deformable filter is exported in its ``grid_sample`` form (``deform_impl='grid_sample'``: ONNX
GridSample, opset >= 16); the weights are unchanged. ONNX uses torch's TorchScript-based exporter
(``dynamo=False``), which needs the ``onnx`` package only (the default dynamo exporter also needs
``onnxscript``); TorchScript uses ``torch.jit.trace``. Both are traced once at ``--size`` and checked after
writing against PyTorch at that size and at one that is not a multiple of m (``--no-check`` skips it; the
ONNX check runs only where ``onnxruntime`` is installed). Each file carries the shapes above as metadata
(ONNX ``metadata_props``, TorchScript extra file ``tpdiff.json``).
"""
import json
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
from tpdiff_plugin.inference import add_checkpoint_arguments, restorer_from_checkpoint
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.measure import parse_size
from tpdiff_plugin.version import __version__

COMMAND = 'export'
HELP = 'Export a trained TPDiffNet to ONNX or TorchScript (deterministic: the DM start noise is an input).'
FORMATS = {'onnx': ('.onnx',), 'torchscript': ('.pt', '.ts', '.torchscript')}
DEFAULT_OPSET = 17
MIN_OPSET = 16  # GridSample
MAX_OPSET = 20  # the newest opset of torch's TorchScript-based exporter
TOLERANCE = 1e-4  # the check's bound on the largest absolute difference to PyTorch


class ExportableTPDiff(nn.Module):
    """``TPDiffNet`` with an in-graph pad and the DM's start noise as an input: ``forward(lq, noise) -> out``
    (``forward(lq)`` for a network without DM). See the module docstring for the shapes."""

    def __init__(self, net):
        super().__init__()
        if not isinstance(net, TPDiffNet):
            raise UserError(f'export: expected a TPDiffNet, got {type(net).__name__}')
        if net.prior_gen is not None:
            raise UserError(f'export: a TPDiffNet with prior_generator {net.prior_generator} (the paper\'s comparison '
                            'generators) is not exportable; only the DM and use_dm: false are')
        self.net = net.eval()
        self.net.set_deform_impl('grid_sample')
        self.multiple = net.pad_multiple
        self.uses_noise = net.dm is not None

    def forward(self, lq, *noise):
        h, w = lq.shape[-2], lq.shape[-1]
        m = self.multiple
        x = F.pad(lq, (0, (m - w % m) % m, 0, (m - h % m) % m), mode='reflect')  # traced: sizes stay dynamic
        return self.net(x, noise=noise[0] if self.uses_noise else None)[..., :h, :w]

    def noise_shape(self, batch, h, w):
        """The ``noise`` input's shape for ``[batch, in_ch, h, w]`` images."""
        m, s = self.multiple, self.net.prior_scale
        return (batch, self.net.prior_ch, -(-h // m) * m // s, -(-w // m) * m // s)

    def example_inputs(self, batch, h, w, seed=0):
        """``(lq, noise)`` (``(lq,)`` without DM): a random image and the noise ``tpdiff deblur --seed`` draws."""
        g = torch.Generator().manual_seed(seed)
        lq = torch.rand(batch, self.net.patch_embed.in_channels, h, w, generator=g)
        if not self.uses_noise:
            return (lq,)
        return lq, torch.randn(self.noise_shape(batch, h, w), generator=torch.Generator().manual_seed(seed))

    def metadata(self):
        """What a runtime needs to feed the graph, as strings (ONNX ``metadata_props``, ``tpdiff.json``)."""
        net = self.net
        meta = {'tpdiff_version': __version__, 'pad_multiple': str(self.multiple),
                'prior_scale': str(net.prior_scale), 'prior_ch': str(net.prior_ch),
                'lq': 'float32 [B, C, H, W] in [0, 1], H and W >= pad_multiple',
                'out': 'float32 [B, C, H, W], lq + residual, not clamped'}
        if self.uses_noise:
            meta['noise'] = ('float32 [B, prior_ch, ceil(H/pad_multiple)*pad_multiple/prior_scale, '
                             'ceil(W/pad_multiple)*pad_multiple/prior_scale] from N(0, I): the DM start noise')
        return meta

    def input_names(self):
        return ['lq', 'noise'] if self.uses_noise else ['lq']


def export_onnx(model, path, size=(64, 64), opset=DEFAULT_OPSET):
    """Write ``model`` (an :class:`ExportableTPDiff`) to ``path`` as ONNX with dynamic batch, height and width."""
    try:
        import onnx
    except ImportError:
        raise UserError('export --format onnx needs the onnx package (pip install onnx)') from None
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f'--opset: {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} (GridSample needs 16)')
    axes = {'lq': {0: 'batch', 2: 'height', 3: 'width'}, 'out': {0: 'batch', 2: 'height', 3: 'width'},
            'noise': {0: 'batch', 2: 'noise_height', 3: 'noise_width'}}
    names = model.input_names()

    def write(tmp):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')  # the TorchScript-based exporter's deprecation and tracer notes
            torch.onnx.export(model, model.example_inputs(1, *size), tmp, dynamo=False, opset_version=opset,
                              input_names=names, output_names=['out'],
                              dynamic_axes={k: v for k, v in axes.items() if k in names or k == 'out'})
        proto = onnx.load(tmp)
        for key, value in model.metadata().items():
            proto.metadata_props.add(key=key, value=value)
        onnx.save(proto, tmp)

    _write_atomically(path, write)


def export_torchscript(model, path, size=(64, 64)):
    """Write ``model`` to ``path`` as a traced TorchScript module (``torch.jit.load`` reads it back)."""
    def write(tmp):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter('ignore')  # TracerWarnings of the shape checks (they hold for every size), and
            traced = torch.jit.trace(model, model.example_inputs(1, *size), check_trace=False)  # torch.jit's
            torch.jit.save(traced, tmp, _extra_files={'tpdiff.json': json.dumps(model.metadata())})  # deprecation

    _write_atomically(path, write)


def _write_atomically(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_runner(path, fmt):
    """A callable ``run(*inputs) -> out tensor`` for an exported file (ONNX through onnxruntime), or None when
    onnxruntime is not installed."""
    if fmt == 'torchscript':
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)  # torch.jit is deprecated in favour of torch.export
            module = torch.jit.load(path)
        return lambda *inputs: module(*inputs)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    names = [i.name for i in session.get_inputs()]
    return lambda *inputs: torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


def check_export(model, path, fmt, sizes):
    """Largest absolute difference between the exported file and PyTorch at each ``(H, W)`` of ``sizes``
    (``{size: diff}``), or None when the runtime is not installed."""
    run = load_runner(path, fmt)
    if run is None:
        return None
    diffs = {}
    for h, w in sizes:
        inputs = model.example_inputs(1, h, w, seed=h * 1000 + w)
        with torch.no_grad():
            diffs[(h, w)] = (run(*inputs) - model(*inputs)).abs().max().item()
    return diffs


def add_arguments(parser):
    parser.add_argument('--format', choices=sorted(FORMATS), default=None,
                        help='default: from the output name (.onnx; .pt, .ts or .torchscript)')
    add_checkpoint_arguments(parser)
    parser.add_argument('-o', '--output', required=True, metavar='FILE', help='file to write')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})')
    parser.add_argument('--size', default='64x64', metavar='HxW',
                        help='image size the graph is traced at; any size runs later (default 64x64)')
    parser.add_argument('--no-check', action='store_true', help='skip comparing the file with PyTorch')


def _format_of(args):
    if args.format:
        return args.format
    ext = os.path.splitext(args.output)[1].lower()
    for fmt, exts in FORMATS.items():
        if ext in exts:
            return fmt
    raise UserError(f'-o {args.output}: cannot tell the format from the name; pass --format onnx or torchscript')


def run(args):
    fmt = _format_of(args)
    size = parse_size(args.size)
    net = restorer_from_checkpoint(args.weights, args.opt, args.param_key)
    model = ExportableTPDiff(net)
    if min(size) < model.multiple:
        raise UserError(f'--size: {args.size} is smaller than the network\'s pad multiple {model.multiple}')
    try:
        if fmt == 'onnx':
            export_onnx(model, args.output, size, args.opset)
        else:
            export_torchscript(model, args.output, size)
    except (UserError, OSError):
        raise
    except Exception as e:  # noqa: BLE001  an operator the exporter cannot handle: one line, not a trace
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'export {fmt}: {type(e).__name__}: {first}') from None
    m, per = model.multiple, model.multiple // net.prior_scale
    noise = f', noise [B, {net.prior_ch}, ceil(H/{m})*{per}, ceil(W/{m})*{per}]' if model.uses_noise else ''
    opset = f', opset {args.opset}' if fmt == 'onnx' else ''
    print(f'wrote {args.output} ({fmt}{opset}): inputs lq [B, C, H, W] (H, W >= {m}){noise}; output [B, C, H, W]')
    if args.no_check:
        return 0
    h, w = size
    diffs = check_export(model, args.output, fmt, [(h, w), (h + model.multiple // 2 + 1, w + 3)])
    if diffs is None:
        print('check skipped: onnxruntime is not installed (pip install onnxruntime)')
        return 0
    print('check, max abs difference to PyTorch: ' + ', '.join(f'{a}x{b}: {d:.2e}' for (a, b), d in diffs.items()))
    worst = max(diffs.values())
    if not worst <= TOLERANCE:
        os.remove(args.output)
        raise UserError(f'export {fmt}: the exported graph differs from PyTorch by {worst:.3g} (> {TOLERANCE:g}); '
                        f'{args.output} was removed')
    return 0
