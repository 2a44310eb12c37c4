"""``tpdiff explain -i IMG --weights W [--opt O] [--tpe T] -o OUT.png``: one figure of what TP-Diff's prior does
on an image: input, output, the prior as colour (3 principal components, a fixed map), the TPE memory entry
of each region, and the FM-MSA offset length per U-Net level (``tpdiff_plugin.explain``).

The network comes from the checkpoint (or ``--opt``, as for ``tpdiff deblur``). The TPE checkpoint is ``--tpe``,
else ``net_tpe_<iter>.pth`` next to ``net_g_<iter>.pth`` (basicsr's naming). The stage is ``--stage``, else
the ``stage`` of the options file basicsr copied into the experiment folder (``<experiment>/*.yml``), else 2
for a network with a DM. Stage 1 needs the TPE (it gives the prior); stage 2 without one shows no memory index
and colours the prior by the DM's output layer. What is shown is printed. Large images run in tiles
(``--tile``), like ``tpdiff deblur``.
"""
import glob
import os
import re

from tpdiff_plugin.data.image_checks import IMAGE_EXTENSIONS, MAX_PIXELS
from tpdiff_plugin.explain import explain_figure, explain_image, tpe_from_checkpoint
from tpdiff_plugin.inference import (add_checkpoint_arguments, check_tiling, resolve_device,
                                     restorer_from_checkpoint)
from tpdiff_plugin.tools.deblur import read_image, write_image
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.option_files import load_options_file

COMMAND = 'explain'
HELP = ('One figure of an image: input, output, the texture prior as colour, the TPE memory entry per region '
        'and the FM-MSA offsets per U-Net level.')


def add_arguments(parser):
    parser.add_argument('-i', '--input', required=True, metavar='IMG', help='the image to explain')
    parser.add_argument('-o', '--output', required=True, metavar='OUT.png', help='the figure (.png, .jpg, ...)')
    add_checkpoint_arguments(parser, opt_help='options file whose network_g (and network_tpe) build the networks '
                             '(default: the network options stored in the checkpoints)')
    parser.add_argument('--tpe', default=None, metavar='T.pth',
                        help='TPE checkpoint (default: net_tpe_<iter>.pth next to --weights, if there)')
    parser.add_argument('--stage', type=int, choices=(1, 2), default=None,
                        help='1: the TPE gives the prior; 2: the DM samples it (default: the experiment\'s '
                             'options file next to the checkpoint, else 2)')
    parser.add_argument('--tile', type=int, default=512, help='tile size in pixels; 0: the whole image (default 512)')
    parser.add_argument('--tile-overlap', type=int, default=32, help='overlap of neighbouring tiles (default 32)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the DM initial noise (default 0)')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'),
                        help='default: cuda when available, else cpu')


def stage_of_experiment(weights):
    """``(stage, options file)`` from the options file basicsr copied into the experiment folder of
    ``<experiment>/models/net_g_*.pth``, or ``(None, None)``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(weights)))
    for path in sorted(glob.glob(os.path.join(root, '*.yml'))):
        try:
            stage = load_options_file(path).get('stage')
        except UserError:
            continue
        if stage in (1, 2):
            return stage, path
    return None, None


def sibling_tpe(weights):
    """``net_tpe_<iter>.pth`` next to ``net_g_<iter>.pth`` when it exists, else None."""
    match = re.fullmatch(r'net_g_(.+)\.pth', os.path.basename(weights))
    path = match and os.path.join(os.path.dirname(weights), f'net_tpe_{match.group(1)}.pth')
    return path if path and os.path.isfile(path) else None


def load_networks(weights, opt=None, tpe=None, stage=None, param_key=None):
    """``(net, tpe network or None, stage, notes)``; ``notes``: lines saying what was found where."""
    net = restorer_from_checkpoint(weights, opt, param_key)
    notes = []
    if tpe is None:
        tpe = sibling_tpe(weights)
        if tpe is not None:
            notes.append(f'TPE: {tpe} (next to --weights)')
    if stage is None:
        stage, where = stage_of_experiment(weights)
        if stage is not None:
            notes.append(f'stage {stage}, from {where}')
        else:
            stage = 2 if net.dm is not None else 1
            notes.append(f'stage unknown (no experiment options next to the checkpoint): assumed {stage}; '
                         'pass --stage 1 for a stage-1 checkpoint')
    tpe_net = tpe_from_checkpoint(tpe, opt) if tpe is not None else None
    if tpe_net is None:
        notes.append('no TPE checkpoint (--tpe, or net_tpe_<iter>.pth next to --weights): no memory index, and '
                     'the prior colours come from the DM output layer')
    return net, tpe_net, stage, notes


def run(args):
    if not os.path.isfile(args.input):
        raise UserError(f'-i: no such image file: {args.input}')
    if os.path.splitext(args.output)[1].lower() not in IMAGE_EXTENSIONS:
        raise UserError(f'-o: {args.output} has no image extension ({", ".join(IMAGE_EXTENSIONS)})')
    if os.path.realpath(args.output) == os.path.realpath(args.input):
        raise UserError(f'-o: writing {args.output} would overwrite the input image')
    if not os.path.isfile(args.weights):
        raise UserError(f'--weights: no such checkpoint file: {args.weights}')
    if args.tpe is not None and not os.path.isfile(args.tpe):
        raise UserError(f'--tpe: no such checkpoint file: {args.tpe}')
    if args.tile < 0:
        raise UserError(f'--tile: expected a positive number of pixels or 0 (no tiling), got {args.tile}')
    tile = args.tile or None
    check_tiling(tile, args.tile_overlap)
    try:
        img = read_image(args.input, max_pixels=MAX_PIXELS)
    except ValueError as e:
        raise UserError(f'-i: {args.input}: {e}') from None
    device = resolve_device(args.device)
    net, tpe, stage, notes = load_networks(args.weights, args.opt, args.tpe, args.stage, args.param_key)
    result = explain_image(net, img, tpe=tpe, stage=stage, tile=tile, tile_overlap=args.tile_overlap,
                           seed=args.seed, device=device)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    write_image(args.output, explain_figure(result))
    for note in notes:
        print(note)
    offsets = ', '.join(f'L{level} {m.mean():.3f}' for level, m in result['offsets'].items()) or 'no FM-MSA filters'
    print(f'prior: {result["prior_source"]}; colours: {result["colour_source"]}\n'
          f'memory index: {result["index_source"]}\n'
          f'mean FM-MSA offset (feature pixels): {offsets}\n'
          f'wrote {args.output} (stage {stage}, device {device}, tile {tile or "off"}, seed {args.seed})')
    return 0
