"""``tpdiff make-demo``: build the embedded demo set (``datasets_lmdb/demo``).

What it holds and how it is made: :mod:`tpdiff_plugin.data.demo_set`.
"""
from tpdiff_plugin.data.demo_set import DEFAULT_OUTPUT, DOMAINS, build_demo

COMMAND = 'make-demo'
HELP = 'Build the embedded demo set (datasets_lmdb/demo) from scikit-image photos with synthetic camera shake.'


def add_arguments(parser):
    parser.add_argument('--output', default=DEFAULT_OUTPUT, help=f'output folder (default {DEFAULT_OUTPUT})')
    parser.add_argument('--seed', type=int, default=0, help='seed of kernels and noise (default 0)')
    parser.add_argument('--force', action='store_true', help='replace the output folder if it exists')
    parser.add_argument('--domains', choices=DOMAINS, default='matched',
                        help='matched (default): blurry and sharp training tiles alternate within the same '
                             'photos; split: blurry and sharp tiles come from different photos (the first demo set)')
    parser.add_argument('--photos', default=None, metavar='DIR',
                        help='add the photos of this folder to the (matched) training pool; not used for validation')


def run(args):
    info = build_demo(args.output, seed=args.seed, force=args.force, domains=args.domains, photos_dir=args.photos)
    print(f'demo set written to {args.output}: {info["n_train_blur"]} blurry + {info["n_train_sharp"]} sharp '
          f'training tiles (unpaired), {info["n_val_blur"]} validation pairs')
    return 0
