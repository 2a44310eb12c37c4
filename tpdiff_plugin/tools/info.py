"""``tpdiff info -opt X.yml [--size HxW]``: parameters per component and MACs of every network in an options file.

Each ``network_*`` block is built exactly as training builds it, through ``basicsr.archs.build_network``.
Rows are the network's top-level sub-modules (for TPDiffNet: the DM, the patch embedding, each encoder
level, the down/up-samplers, the latent level, each decoder level, the refinement stage, the output
conv) plus its own direct parameters (e.g. the TPE's memory), so the rows add up to the total.

MACs are counted with mmengine's ``FlopAnalyzer`` (one fused multiply-add = 1; mmengine's convention,
which skips element-wise ops such as additions, activations and the deformable filter's mask product)
for one image of ``--size``:
- TPDiffNet: the inference path, lq -> DM sampling (all T denoiser calls) -> U-Net.
- TexturePriorEncoder: ``forward(blur, sharp)`` (write + read, its training-time use), both at ``--size``.
- PriorDiffusion: ``forward(lq)`` (sampling); the size is rounded up to a multiple of ``prior_scale``.
- any other network: one image whose channel count comes from the block's ``*in*ch*`` option or the
  first conv layer.
mmengine has no handle for ``torchvision::deform_conv2d``; we add one that counts what the op computes,
``B·H·W·k²·C_in·4`` for the bilinear samples plus ``B·H·W·k²·(C_in/groups)·C_out`` for the weighted sum,
which is also what mmengine counts for the ``grid_sample`` implementation (4 per sample, plus its 1x1
conv), so both FM-MSA implementations report the same MACs.
The row ``(own ops)`` holds the MACs of the network's own forward outside its sub-modules (the TPE's
attention products, TPDiffNet's prior resizing), so the MAC column adds up to the total too.
"""
import copy
import re

from tpdiff_plugin.utils.errors import UserError

COMMAND = 'info'
HELP = 'Parameters per component and MACs of the networks in an options file.'

IN_CHANNEL_KEYS = ('inp_channels', 'in_ch', 'in_channels', 'num_in_ch', 'in_nc', 'input_nc')


def add_arguments(parser):
    parser.add_argument('-opt', required=True, metavar='OPTIONS.yml', help='BasicSR options file')
    parser.add_argument('--size', default='256x256', metavar='HxW', help='input size for MACs (default 256x256)')
    parser.add_argument('--no-macs', action='store_true', help='only count parameters')


def parse_size(text):
    m = re.fullmatch(r'\s*(\d+)\s*[xX]\s*(\d+)\s*', text or '')
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UserError(f'--size: expected HxW with positive integers, e.g. 256x256, got {text!r}')
    return int(m.group(1)), int(m.group(2))


def deform_conv2d_flop_jit(inputs, outputs):
    """mmengine handle for ``torchvision::deform_conv2d(input, weight, offset, mask, bias, ...)``."""
    from mmengine.analysis.jit_handles import get_shape
    b, c_in = get_shape(inputs[0])[:2]
    c_out, c_per_group, kh, kw = get_shape(inputs[1])
    h_out, w_out = get_shape(outputs[0])[-2:]
    pixels = b * h_out * w_out
    return pixels * kh * kw * c_in * 4 + pixels * kh * kw * c_per_group * c_out


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def components(net):
    """``[(name, params)]``: top-level children with parameters, then the module's own parameters."""
    rows = [(name, count_params(child)) for name, child in net.named_children() if child is not None]
    rows += [(name, p.numel()) for name, p in net.named_parameters(recurse=False)]
    return rows


def example_inputs(net, block, size):
    """The inputs MACs are counted for (see the module docstring)."""
    import inspect

    import torch
    from torch import nn
    h, w = size
    name = type(net).__name__
    if name == 'TexturePriorEncoder':
        return (torch.randn(1, net.enc_blur.body[0].in_channels, h, w),) * 2
    if name == 'PriorDiffusion':
        s = net.prior_scale
        c = net.condition.head[1].in_channels // (s * s)
        return (torch.randn(1, c, -(-h // s) * s, -(-w // s) * s),)
    if name == 'TPDiffNet':
        return (torch.randn(1, net.patch_embed.in_channels, h, w),)
    channels = next((block[k] for k in IN_CHANNEL_KEYS if isinstance(block.get(k), int)), None)
    if channels is None:  # the constructor's default for an input-channel argument
        params = inspect.signature(type(net).__init__).parameters
        channels = next((params[k].default for k in IN_CHANNEL_KEYS
                         if k in params and isinstance(params[k].default, int)), None)
    if channels is None:
        conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ValueError('cannot tell the input channels (no *in*ch* option, no conv layer)')
        channels = conv.in_channels
    return (torch.randn(1, channels, h, w),)


def count_macs(net, inputs):
    """``(total, {component: MACs}, unsupported op names)`` for ``net(*inputs)`` with mmengine's FlopAnalyzer."""
    import warnings

    import torch
    from mmengine.analysis import FlopAnalyzer
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # jit tracer warnings about Python values in shapes
        analyzer = FlopAnalyzer(net.eval(), inputs)
        analyzer.set_op_handle('torchvision::deform_conv2d', deform_conv2d_flop_jit)
        analyzer.unsupported_ops_warnings(False)
        analyzer.uncalled_modules_warnings(False)
        analyzer.tracer_warnings('none')
        with torch.no_grad():
            total = analyzer.total()
            by_module = analyzer.by_module()
            unsupported = sorted(analyzer.unsupported_ops())
    return int(total), {k: int(v) for k, v in by_module.items()}, unsupported


def build(opt_path, key, block):
    if not isinstance(block, dict) or 'type' not in block:
        raise UserError(f'{opt_path}: option "{key}" must be a mapping with a "type" (a registered network)')
    from basicsr.archs import build_network
    from basicsr.utils.registry import ARCH_REGISTRY
    if block['type'] not in ARCH_REGISTRY:
        raise UserError(f'{opt_path}: {key}.type: no network named "{block["type"]}" is registered '
                        '(check the spelling; plugin networks register on `import tpdiff_plugin`)')
    try:
        return build_network(copy.deepcopy(block))
    except (TypeError, ValueError) as e:
        raise UserError(f'{opt_path}: {key}: cannot build {block["type"]}: {e}') from None


def run(args):
    size = parse_size(args.size)
    from tpdiff_plugin.utils.option_files import load_options_file
    opt = load_options_file(args.opt)
    keys = [k for k in opt if k.startswith('network_')]
    if not keys:
        raise UserError(f'{args.opt}: no network_* blocks (e.g. network_g: {{type: TPDiffNet, ...}}) to describe')

    import logging

    import tpdiff_plugin  # noqa: F401  (registers the plugin's networks)
    logging.getLogger('basicsr').setLevel(logging.WARNING)  # build_network logs "Network [..] is created."
    grand_total = 0
    print(f'{args.opt}: MACs for one {size[0]}x{size[1]} image; 1 MAC = one multiply-add (mmengine FlopAnalyzer)')
    for key in keys:
        block = opt[key]
        net = build(args.opt, key, block)
        rows = components(net)
        total = count_params(net)
        grand_total += total
        macs, note = None, ''
        if not args.no_macs:
            try:
                inputs = example_inputs(net, block, size)
                macs = count_macs(net, inputs)
                note = f'input {"+".join("x".join(map(str, t.shape)) for t in inputs)}'
                if macs[2]:
                    note += '; ops without a MAC count (left out): ' + ', '.join(macs[2])
            except Exception as e:  # a network that cannot be traced still gets its parameter table
                note = f'MACs not available: {type(e).__name__}: {e}'
        print(f'\n{key}: {block["type"]}  ({note})' if note else f'\n{key}: {block["type"]}')
        print(f'  {"component":<28} {"params":>12} {"":>9} {"MACs":>16} {"":>10}')
        if macs is not None:  # ops of the network's own forward (attention products, resizes, ...)
            rest = macs[0] - sum(macs[1].get(name, 0) for name, _ in rows)
            if rest:
                rows.append(('(own ops)', 0))
                macs[1]['(own ops)'] = rest
        for name, n in rows:
            mac = '' if macs is None else macs[1].get(name, 0)
            mac_g = '' if macs is None else f'{mac / 1e9:.3f}G'
            print(f'  {name:<28} {n:>12d} {n / 1e6:>8.3f}M {mac:>16} {mac_g:>10}')
        mac = '' if macs is None else macs[0]
        mac_g = '' if macs is None else f'{macs[0] / 1e9:.3f}G'
        print(f'  {"total":<28} {total:>12d} {total / 1e6:>8.3f}M {mac:>16} {mac_g:>10}')
    print(f'\nall networks: {grand_total} params ({grand_total / 1e6:.3f}M)')
    return 0
