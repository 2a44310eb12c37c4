"""Self-enhancement (SEMGUD, CVPR 2024) for TPDiffModel: pseudo pairs from a frozen pretrained teacher.

The paper's TP-Diff-se row (GoPro 30.16 dB) trains TP-Diff "with the same self-enhancement strategy as
SEMGUD", which brings in a pretrained supervised network (NAFNet, 33.69 dB). SEMGUD's abstract says the
framework generates improved pseudo-sharp / pseudo-blurry pairs without real pairs and trains the
reconstructor on them, at no inference cost. Our reading (option ``train.self_enhance``):

- the teacher T (any registered network, ``teacher``, loaded from ``teacher_weights``) deblurs the real blurry
  batch b under ``no_grad`` in eval mode: T(b), clamped to [0, 1], is the pseudo-sharp target. T is frozen, in
  no optimizer, never saved;
- ``pairs`` picks DN's supervised pairs: ``pseudo_sharp`` = (b, T(b)), ``reblurred`` (default, SEMGUD's
  generated blurry images) = (RN(T(b)).detach(), T(b)), i.e. a blur like the real one on a better-than-blurry
  target, or ``both`` (the sum of the two terms);
- the loss ``loss_opt`` (default L1, weight 1) is logged as ``l_self_enhance`` and joins ``l_g_total`` from
  iteration ``start_iter`` on (default 0).

DN's prior for the pseudo pairs is made as for b (TPDiffModel: the same TPE memory, or the same DM path); for
``pseudo_sharp`` DN's input is b itself, so DN(b) of the cycle serves. SEMGUD's progressive part (the improved
reconstructor becoming the next teacher) is not done here: the teacher stays fixed.
"""
import os

import torch
from basicsr.losses import build_loss
from basicsr.utils.registry import ARCH_REGISTRY, LOSS_REGISTRY

from tpdiff_plugin.utils.checkpoint import load_network_file
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.networks import build_network_block
from tpdiff_plugin.utils.option_files import check_int, closest_option

OPTION = 'train.self_enhance'
KEYS = ('teacher', 'teacher_weights', 'param_key', 'pairs', 'loss_opt', 'start_iter')
PAIRS = ('pseudo_sharp', 'reblurred', 'both')
DEFAULT_LOSS = {'type': 'L1Loss', 'loss_weight': 1.0}


def parse_self_enhance(value):
    """``train.self_enhance`` checked and completed with its defaults; a bad value, or a ``teacher_weights`` that
    is not a file, is one UserError naming ``train.self_enhance.<key>``. Nothing is built or read here."""
    if not isinstance(value, dict):
        raise UserError(f'{OPTION}: must be a mapping with teacher and teacher_weights, got {type(value).__name__}')
    unknown = [str(k) for k in value if k not in KEYS]
    if unknown:
        close = closest_option(unknown[0], KEYS)
        hint = f'did you mean "{close}"?' if close else f'known: {", ".join(KEYS)}'
        raise UserError(f'{OPTION}.{unknown[0]}: unknown option; {hint}')
    opt = {'param_key': 'params', 'pairs': 'reblurred', 'loss_opt': dict(DEFAULT_LOSS), 'start_iter': 0, **value}
    for key, registry, what in (('teacher', ARCH_REGISTRY, 'network'), ('loss_opt', LOSS_REGISTRY, 'loss')):
        block = opt.get(key)
        if not isinstance(block, dict) or not isinstance(block.get('type'), str):
            raise UserError(f'{OPTION}.{key}: must be a mapping with a "type" (a registered {what}), got {block!r}')
        if block['type'] not in registry:
            raise UserError(f'{OPTION}.{key}.type: no {what} named "{block["type"]}" is registered')
    weights = opt.get('teacher_weights')
    if not isinstance(weights, str) or not weights:
        raise UserError(f'{OPTION}.teacher_weights: the path of the teacher\'s checkpoint is required, got {weights!r}')
    if not os.path.isfile(weights):
        raise UserError(f'{OPTION}.teacher_weights: no such checkpoint: {weights}')
    if not isinstance(opt['param_key'], str):
        raise UserError(f'{OPTION}.param_key: must be a name such as params or params_ema, got {opt["param_key"]!r}')
    if opt['pairs'] not in PAIRS:
        raise UserError(f'{OPTION}.pairs: {opt["pairs"]!r} is not one of {", ".join(PAIRS)}')
    check_int(opt['start_iter'], f'{OPTION}.start_iter', 0, source='')
    opt['start_iter'] = int(opt['start_iter'])
    return opt


class SelfEnhancement:
    """The frozen teacher and the pseudo-pair loss of ``train.self_enhance`` (see the module docstring)."""

    def __init__(self, value, device, source='options'):
        opt = parse_self_enhance(value)
        self.pairs, self.start_iter = opt['pairs'], opt['start_iter']
        teacher = build_network_block(source, f'{OPTION}.teacher', opt['teacher'])
        try:
            load_network_file(teacher, opt['teacher_weights'], f'{OPTION}.teacher_weights',
                              param_key=opt['param_key'], hint=f'check {OPTION}.teacher and param_key')
        except UserError as e:
            text = str(e)
            raise UserError(text if text.startswith(OPTION) else f'{OPTION}.teacher_weights: {text}') from None
        teacher.requires_grad_(False)
        self.teacher = teacher.eval().to(device)  # a plain attribute: not in net_labels, so never saved or trained
        self.criterion = build_loss(dict(opt['loss_opt'])).to(device)

    @property
    def uses_pseudo_blurry(self):
        """Whether DN runs on an extra chunk RN(T(b))."""
        return self.pairs in ('reblurred', 'both')

    def active(self, current_iter):
        return current_iter >= self.start_iter

    @torch.no_grad()
    def targets(self, blur, reblur):
        """``(pseudo-sharp T(b), pseudo-blurry RN(T(b)) or None)`` for the real blurry batch ``blur``; ``reblur``
        is RN (run without gradients: its output is a detached input)."""
        self.teacher.eval()
        target = self.teacher(blur).clamp(0, 1)
        return target, (reblur(target).detach() if self.uses_pseudo_blurry else None)

    def loss(self, dn_blur, dn_pseudo, target):
        """The weighted loss on DN(b) (``pseudo_sharp``) and / or DN(RN(T(b))) (``reblurred``) against T(b)."""
        terms = []
        if self.pairs in ('pseudo_sharp', 'both'):
            terms.append(self.criterion(dn_blur, target))
        if self.uses_pseudo_blurry:
            terms.append(self.criterion(dn_pseudo, target))
        return sum(terms)
