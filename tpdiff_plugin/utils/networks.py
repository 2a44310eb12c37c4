"""Building a registered network from an option block, with one-line errors for the user.

The same path as training (``basicsr.archs.build_network`` on a copy of the block), used by
``inference.build_restorer``, ``tpdiff info`` and ``tpdiff compare``.
"""
import copy

from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY

from tpdiff_plugin.utils.errors import UserError


def build_network_block(source, key, block):
    """Build the network of option ``key`` (a mapping with a registered ``type``) read from ``source``.

    ``source`` and ``key`` name the file and option in the :class:`UserError` raised for a missing or
    unknown ``type`` or for arguments the network's constructor refuses. ``block`` is not modified.
    """
    if not isinstance(block, dict) or 'type' not in block:
        raise UserError(f'{source}: option "{key}" must be a mapping with a "type" (a registered network)')
    if block['type'] not in ARCH_REGISTRY:
        raise UserError(f'{source}: {key}.type: no network named "{block["type"]}" is registered '
                        '(check the spelling; plugin networks register on `import tpdiff_plugin`)')
    renamed = getattr(ARCH_REGISTRY.get(block['type']), 'RENAMED_OPTIONS', {})
    old = sorted(k for k in block if k in renamed)
    if old:
        raise UserError(f'{source}: {key}.{old[0]} is now called {renamed[old[0]]} (one naming convention across '
                        'the networks); rename it in the options file')
    try:
        return build_network(copy.deepcopy(block))
    except (TypeError, ValueError) as e:
        raise UserError(f'{source}: {key}: cannot build {block["type"]}: {e}') from None
