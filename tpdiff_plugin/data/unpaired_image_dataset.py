"""UnpairedImageDataset: independent blurry and sharp patches for unpaired training (TP-Diff, Sec. 3).

TP-Diff learns from blurry images b and sharp images s that show different scenes. Each item is a
random crop of blurry image ``index`` and a crop of a sharp image drawn independently at random, each
with its own flips and rotations, so no pairing is ever implied. Validation and testing use basicsr's
``PairedImageDataset`` instead.

Options (basicsr style):
    dataroot_blur, dataroot_sharp (str): an LMDB folder in basicsr layout (``io_backend.type: lmdb``)
        or a folder of images, searched recursively (``io_backend.type: disk``).
    io_backend (dict): ``{type: lmdb}`` or ``{type: disk}``; applies to both roots.
    gt_size (int): patch size P (``patch_size`` is accepted as an alias). Required when phase is train.
    use_hflip, use_rot (bool): random horizontal flip; random vertical flip and transpose (rotations).
    phase (str): ``train`` crops and augments and draws the sharp image at random. Any other phase
        returns whole images, no augmentation, and sharp image ``index % len(sharp)``.
    mean, std (list, optional): normalisation, as basicsr's datasets.
    sharp_sampling (str): how the train phase draws each item's sharp image (the paper's robustness study of
        the TPE's memory to sharp sampling). ``random`` (default): uniformly from all sharp images.
        ``clustered``: every item of a batch draws from one cluster of similar sharp images, the scene: an LMDB
        key's part before its first ``-`` (``make-lmdb`` keys are ``<scene>-<frame>``, the demo's
        ``<photo>-y..x..``), for a folder the first sub-folder under ``dataroot_sharp`` (or the file name's
        part before ``-``). The batch's cluster is the cluster of one sharp image drawn uniformly, so each
        item's sharp image is still uniform over the set; only the batch loses its variety. A batch is what
        the DataLoader fetches together (``__getitems__``); an item fetched alone is a batch of one.
        ``single``: always the image ``sharp_image``.
    sharp_image (str, optional): the sharp image of ``sharp_sampling: single``: its LMDB key, or for a folder
        its path relative to ``dataroot_sharp`` (with or without extension). Default: the first in sorted order.
        Crops, flips and rotations still vary.

Item: ``{'lq': 3xPxP float32 RGB in [0, 1], 'ref': 3xPxP, 'lq_path': key or path, 'ref_path': ...}``;
``len`` is the number of blurry images. Randomness comes from Python's ``random``: the main process's
stream with ``num_worker_per_gpu: 0``; with workers, the train sampler passes ``(index, seed)`` keys
(``SAMPLE_SEEDS``, see ``utils/resume.py``) and each item draws from ``random`` seeded with its own seed, so
that a sample's crops do not depend on the worker that loads it and resumed runs stay exact. Grayscale,
16-bit and alpha images follow the rule in ``image_checks`` (also documented in ``datasets_lmdb/README.md``);
problems found at construction raise ``UserError`` naming the option.
"""
import os
import random

from torch.utils import data as data
from torchvision.transforms.functional import normalize

from basicsr.data.transforms import augment
from basicsr.utils import FileClient, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY

from tpdiff_plugin.data import image_checks
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.option_files import check_int
from tpdiff_plugin.utils.resume import python_random_seeded


class _Source:
    """One image collection (LMDB or folder): its keys/paths and their (h, w)."""

    def __init__(self, root, backend, what):
        self.what = what
        if not isinstance(root, str) or not root:
            raise UserError(f'{what}: missing; set it to an LMDB folder or an image folder')
        self.root = root
        if backend == 'lmdb':
            entries = image_checks.check_lmdb(root, what)
            self.names = [k for k, _ in entries]
            self.sizes = [(h, w) for _, (h, w, _) in entries]
            self._check_lmdb_channels(entries)
        else:
            self.names = image_checks.list_images(root, what)
            self.sizes = [image_checks.image_size(p) for p in self.names]

    def _check_lmdb_channels(self, entries):
        bad = [(k, c) for k, (_, _, c) in entries if c not in (1, 2, 3, 4)]
        if bad:
            raise UserError(f'{self.what}: {self.root}: key {bad[0][0]!r} has {bad[0][1]} channels; only gray, '
                            'gray+alpha, colour and colour+alpha images are accepted')
        for key, (_, _, c) in entries:
            if c in (2, 4):  # alpha: decode now so that transparent pixels fail here, not mid-training
                image_checks.decode_bgr8(image_checks.read_lmdb_value(self.root, key), f'{self.root}[{key}]')

    def check_min_size(self, size, option):
        small = [(n, hw) for n, hw in zip(self.names, self.sizes) if hw[0] < size or hw[1] < size]
        if small:
            name, (h, w) = small[0]
            more = f' ({len(small)} images in all)' if len(small) > 1 else ''
            raise UserError(f'{self.what}: image {name!r} is {h}x{w} (h x w), smaller than {option} {size}'
                            f'{more}; remove such images from {self.root} or lower {option}')


SHARP_SAMPLING = ('random', 'clustered', 'single')


def _cluster_of(name, source, backend):
    """The cluster (scene) of a sharp image: see ``sharp_sampling`` in the module docstring."""
    if backend != 'lmdb':
        rel = os.path.relpath(name, source.root).replace(os.sep, '/')
        if '/' in rel:
            return rel.split('/', 1)[0]
        name = os.path.splitext(rel)[0]
    return name.split('-', 1)[0]


class _SharpChoice:
    """The train phase's draw of a sharp image index (``sharp_sampling``); every draw goes through ``random``."""

    def __init__(self, mode, image, source, backend):
        if mode not in SHARP_SAMPLING:
            raise UserError(f'sharp_sampling: {mode!r} is not one of {", ".join(SHARP_SAMPLING)}')
        if image is not None and mode != 'single':
            raise UserError(f'sharp_image: only read with sharp_sampling: single (here {mode}); remove it')
        self.mode, self.n = mode, len(source.names)
        if mode == 'single':
            self.index = self._single_index(image, source, backend)
        elif mode == 'clustered':
            members = {}
            for i, name in enumerate(source.names):
                members.setdefault(_cluster_of(name, source, backend), []).append(i)
            where = f"in {source.root} (the key part before '-', or the first sub-folder)"
            if len(members) < 2:
                raise UserError(f'sharp_sampling: clustered found 1 cluster {where}; it needs at least 2, else it '
                                'is random')
            if max(map(len, members.values())) < 2:
                raise UserError(f'sharp_sampling: clustered found no two images in one cluster {where}; name them '
                                '<scene>-<frame>, as make-lmdb does, or use single')
            self.cluster = [None] * self.n  # index -> the list of indices of its cluster
            for indices in members.values():
                for i in indices:
                    self.cluster[i] = indices
            self.n_clusters = len(members)

    @staticmethod
    def _single_index(image, source, backend):
        if image is None:
            return min(range(len(source.names)), key=lambda i: source.names[i])
        if not isinstance(image, str):
            raise UserError(f'sharp_image: must be a key or a path (text), got {image!r}')
        for i, name in enumerate(source.names):
            rel = name if backend == 'lmdb' else os.path.relpath(name, source.root).replace(os.sep, '/')
            if image.replace(os.sep, '/') in (rel, os.path.splitext(rel)[0]):
                return i
        raise UserError(f'sharp_image: {image!r} is not an image of dataroot_sharp ({source.root}); give an LMDB key '
                        'or a path relative to it')

    def draw(self, batch):
        """A sharp index; ``batch`` is the one-item list that holds the batch's cluster (clustered mode)."""
        if self.mode == 'random':
            return random.randrange(self.n)
        if self.mode == 'single':
            return self.index
        if batch[0] is None:
            batch[0] = self.cluster[random.randrange(self.n)]  # a cluster with probability its share of images
        return batch[0][random.randrange(len(batch[0]))]


@DATASET_REGISTRY.register()
class UnpairedImageDataset(data.Dataset):
    """Random blurry patch + independently drawn sharp patch (see module docstring for options)."""

    # The options this dataset and basicsr's loader read (its schema, checked by option_check.py)
    OPTION_KEYS = frozenset({'name', 'type', 'phase', 'dataroot_blur', 'dataroot_sharp', 'io_backend', 'gt_size',
                             'patch_size', 'use_hflip', 'use_rot', 'mean', 'std', 'num_worker_per_gpu',
                             'batch_size_per_gpu', 'dataset_enlarge_ratio', 'prefetch_mode', 'pin_memory',
                             'persistent_workers', 'use_shuffle', 'num_prefetch_queue', 'scale', 'sharp_sampling',
                             'sharp_image'})
    INT_OPTIONS = {'gt_size': 1, 'patch_size': 1, 'batch_size_per_gpu': 1, 'num_worker_per_gpu': 0,
                   'dataset_enlarge_ratio': 1}  # key -> minimum
    CHOICE_OPTIONS = {'sharp_sampling': SHARP_SAMPLING}  # key -> allowed values
    SAMPLE_SEEDS = True  # __getitem__ also takes (index, seed) keys (utils/resume.py)

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        io_opt = dict(opt.get('io_backend') or {'type': 'disk'})
        backend = io_opt.get('type')
        if backend not in ('lmdb', 'disk'):
            raise UserError(f'io_backend.type: {backend!r} is not supported by UnpairedImageDataset; use lmdb '
                            'or disk')
        self.backend = backend
        self.phase = opt.get('phase', 'train')
        self.mean = opt.get('mean')
        self.std = opt.get('std')
        self.use_hflip = bool(opt.get('use_hflip', False))
        self.use_rot = bool(opt.get('use_rot', False))

        size_key = 'gt_size' if opt.get('gt_size') is not None else 'patch_size'
        self.patch_size = opt.get(size_key)
        if self.patch_size is not None:
            check_int(self.patch_size, size_key, self.INT_OPTIONS[size_key], source='')
            self.patch_size = int(self.patch_size)
        elif self.phase == 'train':
            raise UserError('gt_size: required for the train phase (the patch size; `patch_size` also works)')

        for key in ('dataroot_blur', 'dataroot_sharp'):
            if not opt.get(key):
                raise UserError(f'{key}: missing; set it to an LMDB folder or an image folder')
        blur_root, sharp_root = opt['dataroot_blur'], opt['dataroot_sharp']
        if os.path.realpath(blur_root) == os.path.realpath(sharp_root):
            raise UserError(f'dataroot_blur and dataroot_sharp are the same ({blur_root}); unpaired training '
                            'needs a blurry set and a separate sharp set')
        self.blur = _Source(blur_root, backend, 'dataroot_blur')
        self.sharp = _Source(sharp_root, backend, 'dataroot_sharp')
        if self.phase == 'train':
            self.blur.check_min_size(self.patch_size, size_key)
            self.sharp.check_min_size(self.patch_size, size_key)

        self.sharp_sampling = opt.get('sharp_sampling', 'random')
        self._sharp_choice = _SharpChoice(self.sharp_sampling, opt.get('sharp_image'), self.sharp, backend)

        if backend == 'lmdb':
            io_opt['db_paths'] = [blur_root, sharp_root]
            io_opt['client_keys'] = ['blur', 'sharp']
        self.io_backend_opt = io_opt
        self.file_client = None  # opened lazily, once per worker process (as basicsr does)

    def __len__(self):
        return len(self.blur.names)

    def _read(self, source, index, client_key):
        name = source.names[index]
        content = self.file_client.get(name, client_key)
        label = f'{source.root}[{name}]' if self.backend == 'lmdb' else name
        return image_checks.decode_bgr8(content, label), name

    def _crop(self, img, source, name):
        """A random ``P x P`` crop, with random flips/rotations in the train phase."""
        if self.phase != 'train':
            return img
        p = self.patch_size
        h, w = img.shape[:2]
        if h < p or w < p:  # meta_info said it was large enough: it lied
            raise UserError(f'{source.what}: image {name!r} in {source.root} decodes to {h}x{w} (h x w), smaller '
                            f'than gt_size {p}; its meta_info.txt line is wrong: rebuild the LMDB')
        top = random.randint(0, h - p)
        left = random.randint(0, w - p)
        patch = img[top:top + p, left:left + p, :].copy()
        return augment(patch, self.use_hflip, self.use_rot)

    def __getitem__(self, index):
        return self._keyed_item(index, [None])

    def __getitems__(self, keys):
        """A batch, as the DataLoader fetches it: its items share one cluster with ``sharp_sampling: clustered``."""
        batch = [None]  # the batch's cluster, drawn by its first item
        return [self._keyed_item(key, batch) for key in keys]

    def _keyed_item(self, index, batch):
        if isinstance(index, tuple):  # (index, seed): this item's random draws come from its own seed
            index, seed = index
            with python_random_seeded(seed):
                return self._item(index, batch)
        return self._item(index, batch)

    def _item(self, index, batch):
        if self.file_client is None:
            opt = dict(self.io_backend_opt)
            self.file_client = FileClient(opt.pop('type'), **opt)
        if self.phase == 'train':
            sharp_index = self._sharp_choice.draw(batch)  # independent of `index`: unpaired
        else:
            sharp_index = index % len(self.sharp.names)
        img_blur, blur_name = self._read(self.blur, index, 'blur')
        img_sharp, sharp_name = self._read(self.sharp, sharp_index, 'sharp')
        patch_blur = self._crop(img_blur, self.blur, blur_name)
        patch_sharp = self._crop(img_sharp, self.sharp, sharp_name)
        lq, ref = img2tensor([patch_blur.astype('float32') / 255., patch_sharp.astype('float32') / 255.],
                             bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            normalize(lq, self.mean, self.std, inplace=True)
            normalize(ref, self.mean, self.std, inplace=True)
        return {'lq': lq, 'ref': ref, 'lq_path': blur_name, 'ref_path': sharp_name}
