"""``tpdiff make-lmdb``: basicsr LMDBs from the public deblurring datasets' folder layouts.

Layouts (``--input`` is the dataset's root folder; ``tpdiff_plugin.data.dataset_layouts`` reads them):
``gopro``, ``hide``, ``realblur_j``, ``realblur_r``, ``rsblur``, ``rb2v``, and ``folder``: every image under
``--input`` (recursive), one LMDB ``<name>.lmdb``.

Outputs in ``--output`` (``<name>`` is ``--name``, by default the layout):

- test split: ``<name>_test_blur.lmdb`` + ``<name>_test_sharp.lmdb``, paired (the same keys), for
  basicsr's ``PairedImageDataset``.
- train split with ``--unpaired`` (``--protocol scene_split``, the default): ``<name>_train_blur.lmdb`` +
  ``<name>_train_sharp.lmdb``, built from disjoint halves of the scenes (a seeded shuffle: blurry frames from
  half A only, sharp frames from half B only), and ``<name>_train_split.json`` recording the halves.
- train split with ``--unpaired --protocol whole_set``: ``<name>_train_all_blur.lmdb`` +
  ``<name>_train_all_sharp.lmdb``, every blurry and every sharp frame (the dataset draws each item's sharp
  image independently), and ``<name>_train_all_split.json``.
- train split without ``--unpaired``: ``<name>_train_paired_blur.lmdb`` + ``..._sharp.lmdb`` (paired,
  for supervised baselines; never for TP-Diff's unpaired training).

Keys are ``<scene>-<frame>`` (e.g. ``GOPR0372_07_00-000047``), so a leak can be checked from the keys.
Images are written under the colour rule of ``tpdiff_plugin.data.image_checks`` (gray -> 3 channels,
16-bit -> 8-bit, opaque alpha dropped, transparent alpha refused), so every LMDB holds 8-bit BGR PNGs.
Everything is built in a hidden temporary folder beside the outputs, verified (key count, every image
decodes, meta_info matches keys and shapes), and only then renamed into place: a failed run leaves no
LMDB that looks complete, and existing outputs are never overwritten.
"""
import collections
import contextlib
import json
import os
import shutil

from tpdiff_plugin.data.dataset_layouts import (PAIR_LAYOUTS, PROTOCOLS, Pair, collect_folder, collect_pairs,
                                                unpaired_sets, unpaired_split)
from tpdiff_plugin.data.image_checks import sanitize_key
from tpdiff_plugin.data.lmdb_writer import write_lmdb
from tpdiff_plugin.utils.errors import UserError

COMMAND = 'make-lmdb'
HELP = ('Build BasicSR LMDBs from GoPro / HIDE / RealBlur / RSBlur / RB2V layouts or a folder (paired test sets, '
        'unpaired train sets).')
LAYOUTS = PAIR_LAYOUTS + ('folder',)
SPLITS = ('train', 'test')
__all__ = ['Pair', 'collect_pairs', 'unpaired_split', 'make_lmdbs', 'output_names', 'staged_output']


def add_arguments(parser):
    parser.add_argument('--layout', required=True, metavar='LAYOUT', help=f'one of: {", ".join(LAYOUTS)}')
    parser.add_argument('--input', required=True, metavar='ROOT', help='the dataset root folder')
    parser.add_argument('--output', required=True, metavar='OUTDIR', help='folder that receives the LMDBs')
    parser.add_argument('--split', default=None, metavar='SPLIT',
                        help='train or test (required except for --layout folder)')
    parser.add_argument('--unpaired', action='store_true',
                        help='train split only: blurry and sharp LMDBs for unpaired training (see --protocol)')
    parser.add_argument('--protocol', default='scene_split', metavar='PROTOCOL',
                        help=f'with --unpaired: {" or ".join(PROTOCOLS)} (default scene_split: blurry and sharp '
                        'frames from disjoint halves of the scenes; whole_set: every frame on both sides)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the unpaired scene split (default 0)')
    parser.add_argument('--name', default=None, help='output name prefix (default: the layout, or the input '
                        "folder's name for --layout folder)")
    parser.add_argument('--compress-level', type=int, default=1, help='PNG compression level 0-9 (default 1)')
    parser.add_argument('--workers', type=int, default=None, help='threads for reading images (default: CPUs, max 8)')


def output_names(layout, split, unpaired, name, protocol='scene_split'):
    """Role -> file name of the outputs (see the module docstring)."""
    if layout == 'folder':
        return {'images': f'{name}.lmdb'}
    if split == 'test':
        return {'blur': f'{name}_test_blur.lmdb', 'sharp': f'{name}_test_sharp.lmdb'}
    if unpaired:
        base = f'{name}_train_all' if protocol == 'whole_set' else f'{name}_train'
        return {'blur': f'{base}_blur.lmdb', 'sharp': f'{base}_sharp.lmdb', 'split': f'{base}_split.json'}
    return {'blur': f'{name}_train_paired_blur.lmdb', 'sharp': f'{name}_train_paired_sharp.lmdb'}


@contextlib.contextmanager
def staged_output(output_dir, final_names, label='make-lmdb'):
    """Build into a hidden temporary folder in ``output_dir``; on success, rename each output into place.

    Yields the temporary folder. Refuses (before touching anything) when any final output exists.
    On any failure the temporary folder is removed, and ``output_dir`` too if this call created it
    and it is left empty.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f'--output {output_dir}: exists and is not a folder')
    existing = [n for n in final_names if os.path.lexists(os.path.join(output_dir, n))]
    if existing:
        raise UserError(f'--output: {os.path.join(output_dir, existing[0])} already exists; nothing was changed. '
                        'Remove it (and its siblings from the same run) or choose another --output')
    created = not os.path.exists(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, f'.{label}-partial-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        for n in final_names:
            if os.path.lexists(os.path.join(output_dir, n)):
                raise UserError(f'--output: {os.path.join(output_dir, n)} appeared while building; refusing to '
                                'overwrite it (the new build is discarded)')
        for n in final_names:
            os.rename(os.path.join(tmp, n), os.path.join(output_dir, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)


def make_lmdbs(layout, input_root, output_dir, split=None, unpaired=False, seed=0, compress_level=1, name=None,
               workers=None, quiet=False, protocol='scene_split'):
    """Build the LMDBs of one dataset split (the Python form of ``tpdiff make-lmdb``).

    Returns:
        dict: role (``blur``, ``sharp``, ``split`` or ``images``) -> output path, plus ``converted``
        (counts of colour-rule conversions) and ``counts`` (images per LMDB).
    """
    if layout not in LAYOUTS:
        raise UserError(f'--layout: unknown layout {layout!r}; known layouts: {", ".join(LAYOUTS)}')
    if not os.path.isdir(input_root):
        raise UserError(f'--input: folder not found: {input_root}')
    if not 0 <= compress_level <= 9:
        raise UserError(f'--compress-level: must be 0-9, got {compress_level}')
    if layout == 'folder':
        if unpaired or split or protocol != 'scene_split':
            raise UserError('--layout folder makes one LMDB of every image; --split, --unpaired and --protocol do '
                            'not apply')
        name = name or os.path.basename(os.path.normpath(os.path.abspath(input_root)))
    else:
        if split not in SPLITS:
            raise UserError(f'--split: required for --layout {layout}; one of: {", ".join(SPLITS)}'
                            + (f' (got {split!r})' if split else ''))
        if unpaired and split != 'train':
            raise UserError('--unpaired: only for the train split; test sets are paired')
        if protocol not in PROTOCOLS:
            raise UserError(f'--protocol: unknown protocol {protocol!r}; one of: {", ".join(PROTOCOLS)}')
        if protocol != 'scene_split' and not unpaired:
            raise UserError(f'--protocol {protocol}: only with --unpaired (the paired train set holds every pair)')
        name = name or layout
    if sanitize_key(name) != name:
        raise UserError(f'--name: {name!r} may only contain letters, digits, "_" and "-"')

    names = output_names(layout, split, unpaired, name, protocol)
    # Look at the input fully before creating anything.
    jobs, split_info = {}, None
    if layout == 'folder':
        jobs['images'] = collect_folder(input_root)
    else:
        pairs = collect_pairs(layout, input_root, split)
        if unpaired:
            blur, sharp, info = unpaired_sets(pairs, protocol, seed)
            split_info = dict(layout=layout, input=os.path.abspath(input_root), split=split, **info)
        else:
            blur = [(p.key, p.blur) for p in pairs]
            sharp = [(p.key, p.sharp) for p in pairs]
        jobs['blur'], jobs['sharp'] = blur, sharp

    result = {'converted': collections.Counter(), 'counts': {}}
    with staged_output(output_dir, list(names.values())) as tmp:
        for role, items in jobs.items():
            result['converted'].update(write_lmdb(os.path.join(tmp, names[role]), items, compress_level,
                                                  workers, quiet))
            result['counts'][role] = len(items)
        if split_info is not None:
            with open(os.path.join(tmp, names['split']), 'w', encoding='utf-8') as f:
                json.dump(split_info, f, indent=2)
    for role, n in names.items():
        result[role] = os.path.join(output_dir, n)
    result['converted'] = dict(result['converted'])
    return result


def run(args):
    result = make_lmdbs(args.layout, args.input, args.output, split=args.split, unpaired=args.unpaired,
                        seed=args.seed, compress_level=args.compress_level, name=args.name, workers=args.workers,
                        protocol=args.protocol)
    for role, n in result['counts'].items():
        print(f'{role}: {result[role]} ({n} images)')
    if 'split' in result:
        print(f'split: {result["split"]}')
    for kind, n in sorted(result['converted'].items()):
        print(f'converted {n} image(s): {kind}')
    return 0
