"""``tpdiff make-lmdb``: basicsr LMDBs from the public deblurring datasets' folder layouts.

Layouts (``--input`` is the dataset's root folder):

- ``gopro``: ``<split>/<scene>/blur/*.png`` and ``<split>/<scene>/sharp/*.png`` (GOPRO_Large).
- ``hide``: blurry ``train/*.png`` or ``test/test-close-ups/*.png`` + ``test/test-long-shot/*.png``;
  sharp ``GT/<same name>``. The scene is the source video named after ``from`` in the file name
  (``1fromGOPR0950.MP4.png`` -> ``GOPR0950``); other names are their own scene.
- ``realblur_j`` / ``realblur_r``: the list ``RealBlur_J_<split>_list.txt`` (or ``_R_``) of
  ``<gt_path> <blur_path>`` lines relative to the root; the scene is the ``sceneNNN`` folder.
- ``folder``: every image under ``--input`` (recursive), one LMDB ``<name>.lmdb``.

Outputs in ``--output`` (``<name>`` is ``--name``, by default the layout):

- test split: ``<name>_test_blur.lmdb`` + ``<name>_test_sharp.lmdb``, paired (the same keys), for
  basicsr's ``PairedImageDataset``.
- train split with ``--unpaired``: ``<name>_train_blur.lmdb`` + ``<name>_train_sharp.lmdb``, built from
  disjoint halves of the scenes (a seeded shuffle: blurry frames from half A only, sharp frames from
  half B only), and ``<name>_train_split.json`` recording the halves.
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
import random
import re
import shutil

from tpdiff_plugin.data.image_checks import IMAGE_EXTENSIONS, list_images, numbered_lines, sanitize_key
from tpdiff_plugin.data.lmdb_writer import write_lmdb
from tpdiff_plugin.utils.errors import UserError

COMMAND = 'make-lmdb'
HELP = 'Build BasicSR LMDBs from GoPro / HIDE / RealBlur layouts or a folder (paired test sets, unpaired train splits).'
LAYOUTS = ('gopro', 'hide', 'realblur_j', 'realblur_r', 'folder')
SPLITS = ('train', 'test')

Pair = collections.namedtuple('Pair', ['scene', 'key', 'blur', 'sharp'])
"""A blurry/sharp pair of a dataset: its scene, LMDB key, and the two source file paths."""


def add_arguments(parser):
    parser.add_argument('--layout', required=True, metavar='LAYOUT', help=f'one of: {", ".join(LAYOUTS)}')
    parser.add_argument('--input', required=True, metavar='ROOT', help='the dataset root folder')
    parser.add_argument('--output', required=True, metavar='OUTDIR', help='folder that receives the LMDBs')
    parser.add_argument('--split', default=None, metavar='SPLIT',
                        help='train or test (required except for --layout folder)')
    parser.add_argument('--unpaired', action='store_true',
                        help='train split only: blurry and sharp LMDBs from disjoint halves of the scenes')
    parser.add_argument('--seed', type=int, default=0, help='seed of the unpaired scene split (default 0)')
    parser.add_argument('--name', default=None, help='output name prefix (default: the layout, or the input '
                        "folder's name for --layout folder)")
    parser.add_argument('--compress-level', type=int, default=1, help='PNG compression level 0-9 (default 1)')
    parser.add_argument('--workers', type=int, default=None, help='threads for reading images (default: CPUs, max 8)')


# --------------------------------------------------------------------------- layouts

def _image_files(folder):
    return sorted(f for f in os.listdir(folder)
                  if not f.startswith('.') and f.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(folder, f)))


def _stem(filename):
    return os.path.splitext(filename)[0]


def _key(scene, frame):
    return f'{sanitize_key(scene).replace("-", "_")}-{sanitize_key(frame)}'


def _gopro_pairs(root, split):
    expected = f'{root}/{split}/<scene>/blur/*.png and {root}/{split}/<scene>/sharp/*.png (GOPRO_Large layout)'
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(f'--input {root}: no {split}/ folder; expected {expected}')
    pairs = []
    for scene in sorted(os.listdir(split_dir)):
        blur_dir, sharp_dir = (os.path.join(split_dir, scene, s) for s in ('blur', 'sharp'))
        if not (os.path.isdir(blur_dir) and os.path.isdir(sharp_dir)):
            continue
        blur, sharp = _image_files(blur_dir), _image_files(sharp_dir)
        if [_stem(f) for f in blur] != [_stem(f) for f in sharp]:
            only = sorted(set(map(_stem, blur)) ^ set(map(_stem, sharp)))
            raise UserError(f'--input: scene {os.path.join(split_dir, scene)}: blur/ and sharp/ hold different '
                            f'frames (e.g. {only[0]!r} is in only one); every blurry frame needs its sharp frame')
        pairs += [Pair(scene, _key(scene, _stem(b)), os.path.join(blur_dir, b), os.path.join(sharp_dir, s))
                  for b, s in zip(blur, sharp)]
    if not pairs:
        raise UserError(f'--input {root}: no scenes with images found; expected {expected}')
    return pairs


_HIDE_SCENE = re.compile(r'from([A-Za-z]+\d+)')


def _hide_pairs(root, split):
    gt_dir = os.path.join(root, 'GT')
    subdirs = ['train'] if split == 'train' else ['test/test-close-ups', 'test/test-long-shot']
    expected = (f'{root}/train/*.png (blurry), {root}/test/test-close-ups/*.png and '
                f'{root}/test/test-long-shot/*.png (blurry) and {root}/GT/*.png (sharp, same names)')
    for d in ['GT'] + subdirs:
        if not os.path.isdir(os.path.join(root, d)):
            raise UserError(f'--input {root}: no {d}/ folder; expected the HIDE layout: {expected}')
    pairs = []
    for sub in subdirs:
        for f in _image_files(os.path.join(root, sub)):
            sharp = os.path.join(gt_dir, f)
            if not os.path.isfile(sharp):
                raise UserError(f'--input: {os.path.join(root, sub, f)} has no sharp counterpart {sharp}')
            m = _HIDE_SCENE.search(f)
            scene = m.group(1) if m else _stem(f)
            pairs.append(Pair(scene, _key(scene, _stem(f)), os.path.join(root, sub, f), sharp))
    if not pairs:
        raise UserError(f'--input {root}: no blurry images for split {split}; expected {expected}')
    return pairs


def _realblur_pairs(root, split, variant):
    list_name = f'RealBlur_{variant}_{split}_list.txt'
    list_path = os.path.join(root, list_name)
    if not os.path.isfile(list_path):
        raise UserError(f'--input {root}: no {list_name}; expected the RealBlur root with its list files '
                        '(lines "<gt_path> <blur_path>" relative to the root)')
    pairs = []
    for lineno, line in numbered_lines(list_path):
        fields = line.split()
        if len(fields) != 2:
            raise UserError(f'{list_path} line {lineno}: expected "<gt_path> <blur_path>", got {line!r}')
        gt, blur = (os.path.join(root, p) for p in fields)
        for p in (gt, blur):
            if not os.path.isfile(p):
                raise UserError(f'{list_path} line {lineno}: file not found: {p}')
        parts = os.path.normpath(fields[1]).split(os.sep)
        scenes = [p for p in parts if re.fullmatch(r'scene\d+', p)]
        scene = scenes[-1] if scenes else (parts[-3] if len(parts) >= 3 else 'scene')
        frame = re.sub(r'^blur_', '', _stem(parts[-1]))
        pairs.append(Pair(scene, _key(scene, frame), blur, gt))
    if not pairs:
        raise UserError(f'{list_path}: lists no images')
    return pairs


def collect_pairs(layout, root, split):
    """The blurry/sharp pairs of a dataset layout (``gopro``, ``hide``, ``realblur_j``, ``realblur_r``)."""
    if layout == 'gopro':
        pairs = _gopro_pairs(root, split)
    elif layout == 'hide':
        pairs = _hide_pairs(root, split)
    else:
        pairs = _realblur_pairs(root, split, layout[-1].upper())
    seen = {}
    for p in pairs:
        if p.key in seen:
            raise UserError(f'--input: {p.blur} and {seen[p.key]} both map to LMDB key {p.key!r}; rename one')
        seen[p.key] = p.blur
    return pairs


def collect_folder(root):
    """``[(key, path)]`` for every image under ``root``; the key is the relative path, made key-safe."""
    items, seen = [], {}
    for path in list_images(root, '--input'):
        key = sanitize_key(os.path.splitext(os.path.relpath(path, root))[0])
        if key in seen:
            raise UserError(f'--input: {path} and {seen[key]} both map to LMDB key {key!r}; rename one')
        seen[key] = path
        items.append((key, path))
    return items


def unpaired_split(pairs, seed):
    """Split the scenes of ``pairs`` in two halves with a seeded shuffle.

    The sorted scene names are shuffled by ``random.Random(seed)``; the first ``ceil(n / 2)`` form half A
    (blurry frames), the rest half B (sharp frames). Returns ``(blur_items, sharp_items, scenes_a,
    scenes_b)`` with items ``(key, path)``.
    """
    scenes = sorted({p.scene for p in pairs})
    if len(scenes) < 2:
        raise UserError(f'--unpaired: the input has {len(scenes)} scene(s); an unpaired split needs at least 2 '
                        '(blurry frames from some scenes, sharp frames from the others)')
    random.Random(seed).shuffle(scenes)
    half_a, half_b = sorted(scenes[:(len(scenes) + 1) // 2]), sorted(scenes[(len(scenes) + 1) // 2:])
    a, b = set(half_a), set(half_b)
    blur = [(p.key, p.blur) for p in pairs if p.scene in a]
    sharp = [(p.key, p.sharp) for p in pairs if p.scene in b]
    return blur, sharp, half_a, half_b


def output_names(layout, split, unpaired, name):
    """Role -> file name of the outputs (see the module docstring)."""
    if layout == 'folder':
        return {'images': f'{name}.lmdb'}
    if split == 'test':
        return {'blur': f'{name}_test_blur.lmdb', 'sharp': f'{name}_test_sharp.lmdb'}
    if unpaired:
        return {'blur': f'{name}_train_blur.lmdb', 'sharp': f'{name}_train_sharp.lmdb',
                'split': f'{name}_train_split.json'}
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
               workers=None, quiet=False):
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
        if unpaired or split:
            raise UserError('--layout folder makes one LMDB of every image; --split and --unpaired do not apply')
        name = name or os.path.basename(os.path.normpath(os.path.abspath(input_root)))
    else:
        if split not in SPLITS:
            raise UserError(f'--split: required for --layout {layout}; one of: {", ".join(SPLITS)}'
                            + (f' (got {split!r})' if split else ''))
        if unpaired and split != 'train':
            raise UserError('--unpaired: only for the train split; test sets are paired')
        name = name or layout
    if sanitize_key(name) != name:
        raise UserError(f'--name: {name!r} may only contain letters, digits, "_" and "-"')

    names = output_names(layout, split, unpaired, name)
    # Look at the input fully before creating anything.
    jobs, split_info = {}, None
    if layout == 'folder':
        jobs['images'] = collect_folder(input_root)
    else:
        pairs = collect_pairs(layout, input_root, split)
        if unpaired:
            blur, sharp, half_a, half_b = unpaired_split(pairs, seed)
            split_info = {'layout': layout, 'input': os.path.abspath(input_root), 'split': split, 'seed': seed,
                          'rule': 'sorted scenes shuffled with random.Random(seed); first ceil(n/2) -> blur, '
                                  'rest -> sharp',
                          'blur_scenes': half_a, 'sharp_scenes': half_b,
                          'n_blur': len(blur), 'n_sharp': len(sharp)}
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
                        seed=args.seed, compress_level=args.compress_level, name=args.name, workers=args.workers)
    for role, n in result['counts'].items():
        print(f'{role}: {result[role]} ({n} images)')
    if 'split' in result:
        print(f'split: {result["split"]}')
    for kind, n in sorted(result['converted'].items()):
        print(f'converted {n} image(s): {kind}')
    return 0
