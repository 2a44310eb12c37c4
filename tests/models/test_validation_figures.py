"""TPDiffModel with a tensorboard logger: validation writes the explain figure of its first images and the memory
usage of its priors; training's TPE usage reaches tensorboard through basicsr's MessageLogger."""
import types

import numpy as np
import torch
from basicsr.utils import MessageLogger

from model_helpers import batch, build
from test_tpdiff_model import make_opt, stage1_ckpt, stage2_opt  # noqa: F401  (stage1_ckpt: a fixture)
from tpdiff_plugin.explain import explain_figure, explain_image, figure_layout, nearest_entries


class FakeTB:
    """Records ``add_image`` / ``add_scalar`` calls as tensorboard's SummaryWriter would receive them."""

    def __init__(self):
        self.images, self.scalars = [], []

    def add_image(self, tag, img, step, dataformats='CHW'):
        self.images.append((tag, img, step, dataformats))

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


class Loader:
    def __init__(self, n=3, size=(28, 36)):
        g = torch.Generator().manual_seed(7)
        self.items = [{'lq': torch.rand(1, 3, *size, generator=g), 'gt': torch.rand(1, 3, *size, generator=g),
                       'lq_path': [f'/data/val/img{i}.png']} for i in range(n)]
        self.dataset = types.SimpleNamespace(opt={'name': 'demo_val'})

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


def _check(model, tb, loader, expected_index):
    tags = [t for t, *_ in tb.images]
    assert tags == ['explain/demo_val/img0', 'explain/demo_val/img1']  # the first TB_FIGURES images only
    fig_h, fig_w, _, _ = figure_layout(28, 36)
    memory = model._val_memory()
    for (tag, img, step, fmt), data in zip(tb.images, loader.items):
        assert step == 7 and fmt == 'HWC' and img.dtype == np.uint8 and img.shape == (fig_h, fig_w, 3)
        assert img.min() == 0 and img.max() == 255  # black titles on white: the full uint8 range
        expected = explain_figure(explain_image(model.bare('g'), data['lq'], tpe=model.bare('tpe'), stage=model.stage,
                                                memory=memory, seed=0))
        np.testing.assert_array_equal(img, expected)
    entries, perplexity = model.bare('tpe').usage(torch.cat([i.flatten() for i in expected_index]))
    assert tb.scalars == [('metrics/demo_val/tpe_entries', entries, 7),
                          ('metrics/demo_val/tpe_perplexity', perplexity, 7)]
    assert 1 <= entries <= 16 and model.val_indices is None


def test_stage1_validation_writes_figures_and_memory_usage(tmp_path):
    model = build(make_opt(str(tmp_path), stage=1))
    model.feed_data(batch(1))
    model.optimize_parameters(1)
    loader, tb = Loader(), FakeTB()
    model.validation(loader, 7, tb, save_img=False)
    tpe = model.bare('tpe')
    with torch.no_grad():
        index = [tpe.read(d['lq'], memory=tpe.memory_ema, return_index=True)[1] for d in loader.items]
    _check(model, tb, loader, index)
    # without a tensorboard logger: no figures, and validation still works
    model.validation(loader, 8, None, save_img=False)
    assert model.val_indices is None


def test_stage2_validation_figures_show_the_dm_prior(stage1_ckpt):  # noqa: F811
    model = build(stage2_opt(stage1_ckpt))
    loader, tb = Loader(), FakeTB()
    model.validation(loader, 7, tb, save_img=False)
    g, memory = model.bare('g').eval(), model._val_memory()
    with torch.no_grad():
        priors = [g(d['lq'], generator=torch.Generator().manual_seed(0), return_prior=True)[1] for d in loader.items]
    _check(model, tb, loader, [nearest_entries(z, memory) for z in priors])


def test_training_tpe_usage_reaches_tensorboard_at_print_freq(tmp_path):
    opt = make_opt(str(tmp_path), stage=1)
    model = build(opt)
    model.feed_data(batch(2))
    model.optimize_parameters(1)
    tb = FakeTB()
    logger = MessageLogger({'name': 'tpdiff', 'logger': {'print_freq': 1, 'use_tb_logger': True},
                            'train': {'total_iter': 10}}, tb_logger=tb)
    logger({'epoch': 0, 'iter': 1, 'lrs': [1e-3], **model.get_current_log()})
    scalars = {tag: value for tag, value, _ in tb.scalars}
    assert scalars['tpe_entries'] == model.get_current_log()['tpe_entries'] >= 1
    assert 1 <= scalars['tpe_perplexity'] <= scalars['tpe_entries'] + 1e-6
