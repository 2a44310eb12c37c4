"""Reading a whole image set by key: an LMDB in basicsr layout or a folder (helpers; not auto-imported).

Used by ``tpdiff report`` and ``bench/quality.py`` for the demo's validation pairs. Images go through
the colour rule of :mod:`tpdiff_plugin.data.image_checks`, as everywhere an image enters the project.
"""
import os

from tpdiff_plugin.data.image_checks import decode_bgr8, list_images, read_bgr8, read_lmdb_value, read_meta_info
from tpdiff_plugin.utils.errors import UserError


def read_images(root):
    """``{key: HxWx3 uint8 BGR image}`` of every image of ``root``.

    ``root``: an LMDB (``data.mdb`` + ``meta_info.txt``; keys as in meta_info) or a folder, searched
    recursively, whose keys are the file names without extension.
    """
    if not os.path.exists(root):
        raise UserError(f'{root}: no such LMDB or folder (build the demo set with `tpdiff make-demo`)')
    if os.path.isfile(os.path.join(root, 'data.mdb')):
        return {key: decode_bgr8(read_lmdb_value(root, key), f'{root}[{key}]')
                for key, _ in read_meta_info(root, root)}
    if not os.path.isdir(root):
        raise UserError(f'{root}: neither an LMDB folder nor an image folder')
    return {os.path.splitext(os.path.basename(path))[0]: read_bgr8(path) for path in list_images(root, root)}
