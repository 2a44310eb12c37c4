"""The public deblurring datasets' folder layouts, and the two unpaired training protocols (``tpdiff make-lmdb``).

Layouts (``root`` is the dataset's root folder; each gives blurry/sharp :class:`Pair` s with a scene and a key):

- ``gopro``: ``<split>/<scene>/blur/*.png`` and ``<split>/<scene>/sharp/*.png`` (GOPRO_Large).
- ``hide``: blurry ``train/*.png`` or ``test/test-close-ups/*.png`` + ``test/test-long-shot/*.png``;
  sharp ``GT/<same name>``. The scene is the source video named after ``from`` in the file name
  (``1fromGOPR0950.MP4.png`` -> ``GOPR0950``); other names are their own scene.
- ``realblur_j`` / ``realblur_r``: the list ``RealBlur_J_<split>_list.txt`` (or ``_R_``) of
  ``<gt_path> <blur_path>`` lines relative to the root; the scene is the ``sceneNNN`` folder.
- ``rsblur`` (Rim et al., ECCV 2022): the list ``RSBlur_real_<split>.txt`` of the RSBlur repository
  (``datalist/RSBlur/``), in the root or in ``<root>/datalist/RSBlur/``, with ``<gt_path> <blur_path>`` lines
  relative to the root, such as ``RSBlur/0001/000022/gt/gt_sharp.png RSBlur/0001/000022/real_blur/real_blur.png``;
  the scene is the session folder (``0001``), the frame the folder above ``gt/`` (``000022``).
- ``rb2v`` (RB2V, the HyperCUT dataset; one category such as Street per root): ``metadata.json`` in the root,
  ``{"frame_per_seq": 7, "data": [{"id": "00000/0000", "partition": "train", "blur_path": "00000/blur/0000.png",
  "frame001_path": "00000/sharp/0000_1.png", ...}]}`` with paths relative to the root. The sharp image of a
  blurry one is its middle frame (``frame004`` of 7), the frame at the middle of the exposure; the scene is the
  sequence folder (``00000``).

Protocols (``unpaired_sets``), for a train split used without pairs:

- ``scene_split``: the sorted scene names are shuffled by ``random.Random(seed)``; the blurry frames of the first
  ``ceil(n / 2)`` scenes and the sharp frames of the others. No scene is on both sides.
- ``whole_set``: every blurry frame and every sharp frame. The pairs are broken by the dataset, which draws
  each item's sharp image independently of its blurry one (``UnpairedImageDataset``).
"""
import collections
import json
import os
import random
import re

from tpdiff_plugin.data.image_checks import IMAGE_EXTENSIONS, list_images, numbered_lines, sanitize_key
from tpdiff_plugin.utils.errors import UserError

PAIR_LAYOUTS = ('gopro', 'hide', 'realblur_j', 'realblur_r', 'rsblur', 'rb2v')
PROTOCOLS = ('scene_split', 'whole_set')

Pair = collections.namedtuple('Pair', ['scene', 'key', 'blur', 'sharp'])
"""A blurry/sharp pair of a dataset: its scene, LMDB key, and the two source file paths."""


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


def _list_pairs(root, list_path, name_pair):
    """Pairs from a ``<gt_path> <blur_path>`` list (paths relative to ``root``); ``name_pair(parts of the blur
    path, parts of the gt path)`` gives ``(scene, frame)``."""
    pairs = []
    for lineno, line in numbered_lines(list_path):
        fields = line.split()
        if len(fields) != 2:
            raise UserError(f'{list_path} line {lineno}: expected "<gt_path> <blur_path>", got {line!r}')
        gt, blur = (os.path.join(root, p) for p in fields)
        for p in (gt, blur):
            if not os.path.isfile(p):
                raise UserError(f'{list_path} line {lineno}: file not found: {p}')
        scene, frame = name_pair(os.path.normpath(fields[1]).split(os.sep), os.path.normpath(fields[0]).split(os.sep))
        pairs.append(Pair(scene, _key(scene, frame), blur, gt))
    if not pairs:
        raise UserError(f'{list_path}: lists no images')
    return pairs


def _realblur_names(parts, _gt_parts):
    scenes = [p for p in parts if re.fullmatch(r'scene\d+', p)]
    scene = scenes[-1] if scenes else (parts[-3] if len(parts) >= 3 else 'scene')
    return scene, re.sub(r'^blur_', '', _stem(parts[-1]))


def _realblur_pairs(root, split, variant):
    list_name = f'RealBlur_{variant}_{split}_list.txt'
    list_path = os.path.join(root, list_name)
    if not os.path.isfile(list_path):
        raise UserError(f'--input {root}: no {list_name}; expected the RealBlur root with its list files '
                        '(lines "<gt_path> <blur_path>" relative to the root)')
    return _list_pairs(root, list_path, _realblur_names)


def _rsblur_names(parts, _gt_parts):
    # RSBlur/<session>/<frame>/real_blur/real_blur.png
    return (parts[-4], parts[-3]) if len(parts) >= 4 else ('rsblur', _stem(parts[-1]))


def _rsblur_pairs(root, split):
    list_name = f'RSBlur_real_{split}.txt'
    candidates = [os.path.join(root, list_name), os.path.join(root, 'datalist', 'RSBlur', list_name)]
    list_path = next((p for p in candidates if os.path.isfile(p)), None)
    if list_path is None:
        raise UserError(f'--input {root}: no {list_name} (looked in {root} and {root}/datalist/RSBlur); expected '
                        'the folder holding RSBlur/ and the list files of the RSBlur repository (datalist/RSBlur), '
                        'lines "RSBlur/<session>/<frame>/gt/gt_sharp.png RSBlur/<session>/<frame>/real_blur/'
                        'real_blur.png" relative to it')
    return _list_pairs(root, list_path, _rsblur_names)


def _rb2v_pairs(root, split):
    meta_path = os.path.join(root, 'metadata.json')
    expected = ('the RB2V layout: metadata.json with "frame_per_seq" and "data" entries ("id", "partition", '
                '"blur_path", "frame001_path", ...), paths relative to the root (one category, e.g. RB2V/Street)')
    if not os.path.isfile(meta_path):
        raise UserError(f'--input {root}: no metadata.json; expected {expected}')
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
        n_frames = int(meta['frame_per_seq'])
        entries = list(meta['data'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'{meta_path}: not readable as {expected} ({type(e).__name__}: {e})') from None
    mid = f'frame{(n_frames + 1) // 2:03d}_path'  # the middle of the exposure: frame004 of 7
    pairs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get('partition') != split:
            continue
        missing = [k for k in ('id', 'blur_path', mid) if not isinstance(entry.get(k), str)]
        if missing:
            raise UserError(f'{meta_path}: data[{i}] has no {missing[0]!r} (text); expected {expected}')
        blur, sharp = os.path.join(root, entry['blur_path']), os.path.join(root, entry[mid])
        for p in (blur, sharp):
            if not os.path.isfile(p):
                raise UserError(f'{meta_path}: data[{i}] ({entry["id"]}): file not found: {p}')
        scene, _, frame = entry['id'].replace('\\', '/').partition('/')
        pairs.append(Pair(scene, _key(scene, frame or _stem(os.path.basename(blur))), blur, sharp))
    if not pairs:
        raise UserError(f'{meta_path}: no entry with "partition": "{split}"')
    return pairs


def collect_pairs(layout, root, split):
    """The blurry/sharp pairs of a dataset layout (one of ``PAIR_LAYOUTS``) and split (``train``/``test``)."""
    if layout == 'gopro':
        pairs = _gopro_pairs(root, split)
    elif layout == 'hide':
        pairs = _hide_pairs(root, split)
    elif layout == 'rsblur':
        pairs = _rsblur_pairs(root, split)
    elif layout == 'rb2v':
        pairs = _rb2v_pairs(root, split)
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
    """The ``scene_split`` protocol: ``(blur_items, sharp_items, scenes_a, scenes_b)``, items ``(key, path)``
    (see the module docstring)."""
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


def unpaired_sets(pairs, protocol, seed):
    """``(blur_items, sharp_items, info)`` of an unpaired training protocol (``PROTOCOLS``); ``info`` records it."""
    if protocol not in PROTOCOLS:
        raise UserError(f'--protocol: unknown protocol {protocol!r}; one of: {", ".join(PROTOCOLS)}')
    if protocol == 'whole_set':
        blur, sharp = [(p.key, p.blur) for p in pairs], [(p.key, p.sharp) for p in pairs]
        info = {'rule': 'every blurry and every sharp frame; the dataset draws each sharp image independently',
                'scenes': sorted({p.scene for p in pairs})}
    else:
        blur, sharp, half_a, half_b = unpaired_split(pairs, seed)
        info = {'seed': seed, 'rule': 'sorted scenes shuffled with random.Random(seed); first ceil(n/2) -> blur, '
                                      'rest -> sharp', 'blur_scenes': half_a, 'sharp_scenes': half_b}
    return blur, sharp, dict(protocol=protocol, **info, n_blur=len(blur), n_sharp=len(sharp))
