"""``tpdiff_plugin.explain``: the prior, its fixed colours, the memory index and the FM-MSA offsets of one image,
tiled like ``tpdiff deblur``, and the figure made of them."""
import numpy as np
import pytest
import torch

from conftest import tiny_net
from tpdiff_plugin.archs.tpe_arch import TexturePriorEncoder
from tpdiff_plugin.explain import (OffsetRecorder, PriorColours, explain_figure, explain_image, figure_layout,
                                   nearest_entries)
from tpdiff_plugin.inference import Deblurrer
from tpdiff_plugin.utils.errors import UserError


def _tpe(seed=1):
    torch.manual_seed(seed)
    return TexturePriorEncoder(prior_ch=8, mem_slots=16, prior_scale=4, enc_ch=4)


def _image(seed, h=40, w=52):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _offset_convs(net):
    return [OffsetRecorder.convs(m)[-1] for m in OffsetRecorder(net).filters]


def test_stage1_shows_the_tpe_read_and_dn_with_that_prior():
    net, tpe, x = tiny_net(0), _tpe(), _image(0)
    r = explain_image(net, x, tpe=tpe, stage=1)
    with torch.no_grad():
        z, index = tpe.eval().read(x, memory=tpe.memory, return_index=True)  # no training write: learned memory
        out = net.eval()(x, prior=z).clamp(0, 1)
    assert r['prior'].shape == (8, 10, 13) and r['memory_index'].shape == (10, 13)
    np.testing.assert_array_equal(r['memory_index'], index[0].numpy())
    np.testing.assert_allclose(r['prior'], z[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(r['output'], out[0].permute(1, 2, 0).numpy(), atol=1e-6)
    assert r['memory_index'].min() >= 0 and r['memory_index'].max() < 16 and r['mem_slots'] == 16
    assert 'learned memory' in r['prior_source']


def test_stage2_output_is_deblurs_and_the_index_is_the_nearest_entry_of_the_memory_ema():
    net, tpe, x = tiny_net(0), _tpe(), _image(1)
    with torch.no_grad():  # a trained TPE: its memory EMA differs from the learned memory
        tpe.memory_ema.add_(torch.randn(16, 8, generator=torch.Generator().manual_seed(5)))
        tpe.memory_ema_updates.fill_(3)
    r = explain_image(net, x, tpe=tpe, stage=2, seed=3)
    expected = Deblurrer(net, seed=3)(x)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(r['output'], expected, atol=1e-6)  # the DM prior of `tpdiff deblur --seed 3`
    z = torch.from_numpy(r['prior'])
    brute = ((z[:, :, :, None] - tpe.memory_ema.t()[:, None, None]) ** 2).sum(0).argmin(-1)
    np.testing.assert_array_equal(r['memory_index'], brute.numpy())
    assert 0 <= r['memory_index'].min() and r['memory_index'].max() < 16
    assert 'memory EMA of 3' in r['index_source']
    assert not np.array_equal(r['memory_index'], nearest_entries(z[None], tpe.memory)[0].numpy())


def test_prior_colours_are_fixed_across_images():
    """The same prior vector has the same colour in two images: stage 1 priors are memory entries, so a
    region of each image that selected the same entry must be coloured alike."""
    net, tpe = tiny_net(0), _tpe()
    a = explain_image(net, _image(2), tpe=tpe, stage=1)
    b = explain_image(net, _image(3, 64, 36), tpe=tpe, stage=1)
    common = np.intersect1d(a['memory_index'], b['memory_index'])
    assert common.size and np.unique(a['memory_index']).size > 1
    colours = PriorColours.from_memory(tpe.memory)
    for entry in common:
        ca = a['prior_rgb'][a['memory_index'] == entry]
        cb = b['prior_rgb'][b['memory_index'] == entry]
        np.testing.assert_allclose(ca, np.broadcast_to(cb[0], ca.shape), atol=1e-6)
        np.testing.assert_allclose(cb[0], colours(tpe.memory[entry].detach()[:, None, None])[0, 0], atol=1e-6)
    assert a['prior_rgb'].min() >= 0 and a['prior_rgb'].max() <= 1


def test_prior_colours_are_the_first_principal_components_of_the_memory():
    entries = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * torch.arange(8, 0, -1)
    colours = PriorColours.from_memory(entries)
    proj = (entries.double() - entries.double().mean(0)) @ colours.basis.t()
    assert torch.allclose(colours.basis @ colours.basis.t(), torch.eye(3, dtype=torch.float64), atol=1e-9)
    var = proj.var(0)
    assert var[0] > var[1] > var[2]  # sorted components
    top = torch.linalg.eigvalsh(torch.cov(entries.double().t()))[-3:].flip(0)
    assert torch.allclose(var, top, rtol=1e-6)  # they are the top three, not any three directions
    again = PriorColours.from_memory(entries.clone())
    assert torch.equal(again.basis, colours.basis)  # signs fixed: the same map every time
    rgb = colours(entries.t()[:, :, None])  # [64, 1, 3]
    assert rgb.shape == (64, 1, 3) and 0 <= rgb.min() and rgb.max() <= 1


def test_untrained_offsets_are_small_but_not_zero_and_follow_the_offset_convs():
    """FM-MSA's offset convs start small (``small_init_``: weights x0.1, bias 0), not zero: an untrained net
    shifts its taps by a fraction of a pixel. With the last conv zeroed the maps are exactly 0; with its
    offset biases set to (dy, dx) = (3, 4) every tap moves 5 pixels."""
    net, x = tiny_net(0), _image(4)
    r = explain_image(net, x, stage=2)
    assert sorted(r['offsets']) == [1, 2, 3, 4]
    for level, m in r['offsets'].items():
        f = 2 ** (level - 1)
        assert m.shape == (-(-40 // f), -(-52 // f))
        assert 0 < m.max() < 0.5
    convs = _offset_convs(net)
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
            conv.bias.zero_()
    r = explain_image(net, x, stage=2)
    assert all(np.array_equal(m, np.zeros_like(m)) for m in r['offsets'].values())
    with torch.no_grad():
        for conv in convs:
            n = 2 * 9  # k = 3, one offset group: [tap][dy, dx]
            conv.bias[0:n:2] = 3.0
            conv.bias[1:n:2] = 4.0
    r = explain_image(net, x, stage=2)
    for m in r['offsets'].values():
        np.testing.assert_allclose(m, 5.0, rtol=1e-6)


def test_only_levels_with_a_prior_filter_have_offsets():
    r = explain_image(tiny_net(0, multi_scale_prior=False), _image(5), stage=2)
    assert sorted(r['offsets']) == [1]
    assert explain_image(tiny_net(0, fm_msa=False), _image(5), stage=2)['offsets'] == {}


@pytest.mark.parametrize('stage', [1, 2])
def test_tiled_is_the_untiled_result_within_tolerance(stage):
    net, tpe, x = tiny_net(0), _tpe(), _image(6, 70, 90)
    whole = explain_image(net, x, tpe=tpe, stage=stage, seed=3)
    tiled = explain_image(net, x, tpe=tpe, stage=stage, seed=3, tile=32, tile_overlap=8)
    change = np.abs(whole['output'] - whole['input']).mean()
    assert np.abs(tiled['output'] - whole['output']).mean() < 0.05 * change
    for level, m in whole['offsets'].items():
        assert tiled['offsets'][level].shape == m.shape
        assert np.abs(tiled['offsets'][level] - m).mean() < 0.1 * m.mean()
    if stage == 1:  # the TPE reads the whole image: the same prior, the same entries
        np.testing.assert_array_equal(tiled['prior'], whole['prior'])
        np.testing.assert_array_equal(tiled['memory_index'], whole['memory_index'])
    else:  # each tile's DM sample, blended at the prior's resolution
        assert np.abs(tiled['prior'] - whole['prior']).mean() < 0.1 * whole['prior'].std()
        assert (tiled['memory_index'] == whole['memory_index']).mean() > 0.9
        expected = Deblurrer(net, tile=32, tile_overlap=8, seed=3)(x)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(tiled['output'], expected, atol=1e-6)  # `tpdiff deblur`'s tiles and blend


def test_stage1_needs_the_tpe_and_train_modes_are_restored():
    net = tiny_net(0).train()
    with pytest.raises(UserError, match='--tpe'):
        explain_image(net, _image(7), stage=1)
    tpe = _tpe().train()
    explain_image(net, _image(7), tpe=tpe, stage=2)
    assert net.training and tpe.training


def test_figure_layout_and_panels():
    net, tpe = tiny_net(0), _tpe()
    img = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    r = explain_image(net, img, tpe=tpe, stage=1)
    fig = explain_figure(r)
    fig_h, fig_w, (ph, pw), origins = figure_layout(40, 52)
    assert fig.shape == (fig_h, fig_w, 3) and fig.dtype == np.uint8
    assert (ph, pw) == (148, 192) and len(origins) == 8  # long side enlarged to 192 px
    assert fig_w == 4 + 4 * (192 + 4) and fig_h == 4 + 2 * (18 + 148 + 4)
    y, x = origins[0]
    panel = fig[y:y + ph, x:x + pw]
    rows, cols = ((np.arange(ph) + 0.5) * 40 / ph).astype(int), ((np.arange(pw) + 0.5) * 52 / pw).astype(int)
    assert np.abs(panel.astype(int) - img[rows][:, cols].astype(int)).max() <= 1  # nearest pixel centre
    y, x = origins[2]  # the prior panel: the colour of each token over its 4x4 pixels
    prior = (r['prior_rgb'] * 255).round()
    assert np.abs(fig[y, x].astype(float) - prior[0, 0]).max() <= 1
    assert np.abs(fig[y + ph - 1, x + pw - 1].astype(float) - prior[-1, -1]).max() <= 1
    r['memory_index'] = None
    r['offsets'].pop(4)
    fig = explain_figure(r)
    for k in (3, 7):  # no TPE, no level-4 filter: grey panels
        y, x = origins[k]
        assert (fig[y:y + ph, x:x + pw] == 200).all()
