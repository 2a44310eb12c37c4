"""``tpdiff info -opt X.yml [--size HxW]``: parameters per component and MACs of every network in an options file.

Each ``network_*`` block is built exactly as training builds it, through ``basicsr.archs.build_network``.
Rows are the network's top-level sub-modules (for TPDiffNet: the DM, the patch embedding, each encoder
level, the down/up-samplers, the latent level, each decoder level, the refinement stage, the output
conv) plus its own direct parameters (e.g. the TPE's memory), so the rows add up to the total.

MACs are counted with mmengine's ``FlopAnalyzer`` for one image of ``--size`` (1 MAC = one multiply-add;
which input each network gets, and the handle for torchvision's deform_conv2d: ``utils/measure.py``).
The row ``(own ops)`` holds the MACs of the network's own forward outside its sub-modules (the TPE's
attention products, TPDiffNet's prior resizing), so the MAC column adds up to the total too.
"""
import logging

from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.measure import components, count_macs, count_params, example_inputs, parse_size
from tpdiff_plugin.utils.networks import build_network_block
from tpdiff_plugin.utils.option_files import find_options_file, load_options_file

COMMAND = 'info'
HELP = 'Parameters per component and MACs of the networks in an options file.'


def add_arguments(parser):
    parser.add_argument('-opt', required=True, metavar='OPTIONS.yml', help='BasicSR options file')
    parser.add_argument('--size', default='256x256', metavar='HxW', help='input size for MACs (default 256x256)')
    parser.add_argument('--no-macs', action='store_true', help='only count parameters')


def run(args):
    size = parse_size(args.size)
    args.opt = find_options_file(args.opt)  # a file, or a packaged options name
    opt = load_options_file(args.opt)
    keys = [k for k in opt if k.startswith('network_')]
    if not keys:
        raise UserError(f'{args.opt}: no network_* blocks (e.g. network_g: {{type: TPDiffNet, ...}}) to describe')
    logging.getLogger('basicsr').setLevel(logging.WARNING)  # build_network logs "Network [..] is created."
    grand_total = 0
    print(f'{args.opt}: MACs for one {size[0]}x{size[1]} image; 1 MAC = one multiply-add (mmengine FlopAnalyzer)')
    for key in keys:
        block = opt[key]
        net = build_network_block(args.opt, key, block)
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
