"""Reduced-precision inference: what ``Deblurrer(half=...)`` and ``tpdiff deblur --half`` autocast to."""
import logging

import torch

from tpdiff_plugin.utils.errors import UserError

HALF_CHOICES = ('bf16', 'fp16')
logger = logging.getLogger('basicsr')  # basicsr's root logger name, as utils/checkpoint.py


def half_dtype(half, device):
    """``half`` (False/None, True, 'bf16' or 'fp16') as the autocast dtype for ``device`` (None: run fp32).

    True means 'bf16': it keeps fp32's exponent range, so attention logits and the DM's noise estimates cannot
    overflow as they can in fp16. A CUDA device without bf16 (before Ampere) gets float16, with one log line.
    """
    if half is False or half is None:
        return None
    if half is True:
        half = 'bf16'
    if half not in HALF_CHOICES:
        raise UserError(f'half: expected true, false, {" or ".join(HALF_CHOICES)}, got {half!r}')
    if half == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        logger.info('half: this GPU has no bf16; autocast runs fp16 instead')
        half = 'fp16'
    return torch.bfloat16 if half == 'bf16' else torch.float16
