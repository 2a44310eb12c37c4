"""Where TP-Diff's forward spends its time: ``bench/run.py --profile`` (issue 10 item 1).

Forward pre/post hooks on the modules below time each call with ``time.perf_counter`` (after a device sync on
CUDA). Times are *exclusive*: a module's time less that of the hooked modules it calls (the FM-MSA filter's
Convs(z) is not counted in its sampling, nor the filter in the attention). ``other`` is the forward's wall
time less every hooked module: patch embedding, skip concatenations and 1x1 reductions, prior resizing,
residual adds of the blocks, the output conv and the padding.
"""
import time

import torch

LEVELS = (('encoder_level1', 'enc1'), ('encoder_level2', 'enc2'), ('encoder_level3', 'enc3'), ('latent', 'latent'),
          ('decoder_level3', 'dec3'), ('decoder_level2', 'dec2'), ('decoder_level1', 'dec1'),
          ('refinement', 'refine'))
COMPONENTS = ('DM sampling', 'LayerNorm', 'FM-MSA filter: Convs(z)', 'FM-MSA filter: sampling',
              'FM-MSA attention', 'TM-FFN', 'down/upsamplers', 'other')
ROW_NAMES = tuple(f'profile: {c}' for c in COMPONENTS) + tuple(f'profile: level {lab}' for _, lab in LEVELS)


def labelled_modules(net):
    """``[(module, component, level or None)]`` for a ``TPDiffNet``."""
    out = [(net.dm, 'DM sampling', None)] if net.dm is not None else []
    for name in ('down1_2', 'down2_3', 'down3_4', 'up4_3', 'up3_2', 'up2_1'):
        out.append((getattr(net, name), 'down/upsamplers', None))
    for attr, lab in LEVELS:
        for block in getattr(net, attr).blocks:
            out += [(block.norm1, 'LayerNorm', lab), (block.norm2, 'LayerNorm', lab),
                    (block.attn, 'FM-MSA attention', lab), (block.ffn, 'TM-FFN', lab)]
            filt = block.attn.filter
            if filt is not None:
                out.append((filt, 'FM-MSA filter: sampling', lab))
                for convs in ('prior_convs', 'feature_convs'):
                    if hasattr(filt, convs):
                        out.append((getattr(filt, convs), 'FM-MSA filter: Convs(z)', lab))
    return out


class ComponentTimer:
    """Exclusive seconds per ``(component, level)`` over the forwards run inside ``with`` (hooks removed after)."""

    def __init__(self, net, device):
        self.net, self.device = net, device
        self.totals, self.stack, self.handles = {}, [], []

    def _now(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def __enter__(self):
        for module, comp, level in labelled_modules(self.net):
            key = (comp, level)
            self.handles.append(module.register_forward_pre_hook(lambda m, a: self.stack.append([self._now(), 0.0])))
            self.handles.append(module.register_forward_hook(lambda m, a, o, key=key: self._pop(key)))
        return self

    def _pop(self, key):
        start, children = self.stack.pop()
        elapsed = self._now() - start
        self.totals[key] = self.totals.get(key, 0.0) + elapsed - children
        if self.stack:
            self.stack[-1][1] += elapsed
        return None

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def profile_forward(net, call, device, repeats):
    """Run ``call()`` (one TP-Diff forward) ``repeats`` times under the hooks. Returns ``(seconds per forward,
    {component: seconds}, {component: {level: seconds}}, {level: seconds})``, all per forward."""
    with ComponentTimer(net, device) as timer:
        t0 = timer._now()
        for _ in range(repeats):
            call()
        wall = (timer._now() - t0) / repeats
    per = {k: v / repeats for k, v in timer.totals.items()}
    comps = {c: sum(v for (cc, _), v in per.items() if cc == c) for c in COMPONENTS}
    comps['other'] = wall - sum(comps.values())
    by_level = {c: {lab: per.get((c, lab), 0.0) for _, lab in LEVELS} for c in COMPONENTS}
    levels = {lab: sum(v for (_, lv), v in per.items() if lv == lab) for _, lab in LEVELS}
    return wall, comps, by_level, levels


def add_rows(table, net, call, device, repeats, size):
    """The ``profile: ...`` rows: each component's and each U-Net level's share of the hooked forward."""
    wall, comps, by_level, levels = profile_forward(net, call, device, repeats)
    for comp in COMPONENTS:
        parts = ', '.join(f'{lab} {100 * s / wall:.1f}' for lab, s in by_level[comp].items() if s > 0)
        table.add(f'profile: {comp}', 100 * comps[comp] / wall, '%',
                  f'{1e3 * comps[comp]:.0f} ms' + (f'; by level (%): {parts}' if parts else ''))
    for _, lab in LEVELS:
        table.add(f'profile: level {lab}', 100 * levels[lab] / wall, '%',
                  f'{1e3 * levels[lab]:.0f} ms: LayerNorm + FM-MSA + TM-FFN of its blocks')
    return wall
