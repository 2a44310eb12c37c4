"""tpdiff_plugin.inference: the Deblurrer API and the tiling engine (blend, consistent DM noise, memory bound)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_net, tiny_net_opts
from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
from tpdiff_plugin.inference import (Deblurrer, axis_windows, build_restorer, check_tiling, load_weights, run_tiled,
                                     tile_starts)
from tpdiff_plugin.utils.checkpoint import save_networks
from tpdiff_plugin.utils.errors import UserError


def _tiny(seed=0, **kw):
    return tiny_net(seed, **kw).eval()


def _psnr(a, b):
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


# ---------------------------------------------------------------------------------------------- tiling maths
@pytest.mark.parametrize('size,tile,stride', [(100, 40, 32), (96, 40, 32), (40, 40, 32), (30, 40, 32), (520, 512, 480)])
def test_tile_starts_cover_the_side_and_end_flush(size, tile, stride):
    starts = tile_starts(size, tile, stride)
    assert starts[0] == 0
    if tile >= size:
        assert starts == [0]
        return
    assert starts[-1] == size - tile
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))  # no gaps
    assert all(b > a for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize('size,tile,overlap', [(512, 256, 32), (520, 512, 32), (1000, 512, 32), (200, 64, 16),
                                               (136, 64, 0), (100, 48, 8), (80, 48, 20)])
def test_blend_windows_are_a_partition_of_unity(size, tile, overlap):
    align = 8 if size % 8 == 0 else 4
    stride = max(align, (tile - overlap) // align * align)
    starts = tile_starts(size, tile, stride)
    windows = axis_windows(starts, tile, overlap)
    total = torch.zeros(size, dtype=torch.float64)
    for s0, win in zip(starts, windows):
        assert win.shape == (tile,) and float(win.min()) >= 0 and float(win.max()) <= 1
        total[s0:s0 + tile] += win.double()
    torch.testing.assert_close(total, torch.ones(size, dtype=torch.float64), atol=1e-6, rtol=0)
    assert float(windows[0][0]) == 1 and float(windows[-1][-1]) == 1  # image borders are not faded
    if len(starts) > 2 and overlap and starts[2] - starts[0] >= 2 * overlap:
        # a regular neighbour pair crossfades over exactly `overlap` pixels (unless crossfades would meet:
        # (80, 48, 20) has them narrowed, and the sum above still holds)
        a, b = windows[0], windows[1]
        ramp = ((a > 0) & (a < 1)).sum()
        assert int(ramp) == overlap
        assert float(b[0]) < 0.05 and float(a[starts[1] - starts[0] - 1]) == 1


def test_check_tiling_rule_and_rounding():
    assert check_tiling(None, 32) == (None, 32)
    assert check_tiling(512, 32, 8) == (512, 32)
    assert check_tiling(100, 8, 8) == (96, 8)  # rounded down to the size multiple
    assert check_tiling(65, 32, 1) == (65, 32)
    for tile, overlap in ((64, 32), (60, 32), (16, 32)):
        with pytest.raises(UserError, match='--tile: .* larger than 2 x --tile-overlap'):
            check_tiling(tile, overlap, 8)
    with pytest.raises(UserError, match='larger than 2 x'):
        check_tiling(71, 32, 8)  # 71 -> 64 = 2 x 32 after rounding
    with pytest.raises(UserError, match='--tile-overlap'):
        check_tiling(64, -1)
    with pytest.raises(UserError, match='--tile'):
        check_tiling(0, 0)
    with pytest.raises(UserError, match='smaller than the network'):
        check_tiling(4, 0, 8)


def test_run_tiled_crops_one_noise_draw_per_tile_and_never_runs_more_than_a_tile():
    """A local function of (pixels, noise): consistent noise makes the tiled result equal the untiled one;
    independent noise per tile would not. Every call sees at most one tile."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 96, 136, generator=g)
    noise = torch.randn(2, 5, 24, 34, generator=g)  # prior_scale 4
    seen = []

    def fn(xt, zt):
        seen.append((tuple(xt.shape), zt))
        return xt * 2 + F.interpolate(zt[:, :3], scale_factor=4, mode='nearest')

    full = fn(x, noise)
    seen.clear()
    tiled = run_tiled(fn, x, 48, 16, align=8, noise=noise, prior_scale=4)
    assert tiled.dtype == torch.float32 and tiled.shape == x.shape
    torch.testing.assert_close(tiled, full, atol=1e-5, rtol=1e-5)
    assert len(seen) > 4 and all(s[-2] <= 48 and s[-1] <= 48 for s, _ in seen)
    # each tile got the crop of the one draw at its own place
    stride = 32
    ys, xs = tile_starts(96, 48, stride), tile_starts(136, 48, stride)
    for (shape, zt), (y0, x0) in zip(seen, [(y, x_) for y in ys for x_ in xs]):
        torch.testing.assert_close(zt, noise[..., y0 // 4:(y0 + 48) // 4, x0 // 4:(x0 + 48) // 4], rtol=0, atol=0)
    # what consistency buys: a fresh draw per tile leaves seams the blend cannot hide
    fresh = run_tiled(lambda xt, zt: fn(xt, torch.randn_like(zt)), x, 48, 16, align=8, noise=noise, prior_scale=4)
    assert (fresh - full).abs().max() > 0.5
    with pytest.raises(ValueError, match='multiples of align'):
        run_tiled(fn, x[..., :95, :], 48, 16, align=8, noise=noise, prior_scale=4)


# ---------------------------------------------------------------------------------------------- Deblurrer
def test_untiled_deblurrer_is_the_seeded_inference_path_of_the_network():
    """Whole image, any size: exactly ``net(lq, generator=Generator().manual_seed(seed))``, as basicsr test runs it."""
    net = _tiny()
    x = torch.rand(2, 3, 37, 53)
    d = Deblurrer(net, seed=3, channels_last=False)  # the default on CPU differs by float rounding: next test
    out = d(x)
    with torch.no_grad():
        ref = net(x, generator=torch.Generator().manual_seed(3)).clamp(0, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(d(x), out, rtol=0, atol=0)  # every call re-draws from the seed
    assert not torch.allclose(Deblurrer(net, seed=4, channels_last=False)(x), out)
    # one tile covering the image: the same result, bit for bit
    torch.testing.assert_close(Deblurrer(net, seed=3, tile=64, tile_overlap=8, channels_last=False)(x), out, rtol=0,
                               atol=0)
    assert out.requires_grad is False and out.dtype == x.dtype


@pytest.mark.parametrize('kw', [dict(), dict(filter_type='predicted'),
                                dict(dim=30, num_blocks=[1, 1, 1, 1], heads=[1, 2, 4, 8], prior_ch=64,
                                     prior_hidden=16, ffn_expansion_factor=2.66, dm_feats=64)])
def test_cpu_deblurrer_runs_tpdiff_channels_last_within_1e_5_of_nchw(kw):
    """Issue 10: on CPU a TPDiffNet runs in channels_last (weights and inputs; measured faster), outputs within
    1e-5 of the NCHW forward, tiled and whole, returned contiguous."""
    net = _tiny(**kw)
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        ref = net(x, generator=torch.Generator().manual_seed(0)).clamp(0, 1)
    seen = []
    net.encoder_level1.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    d = Deblurrer(net, seed=0)
    assert d.channels_last and net.patch_embed.weight.is_contiguous(memory_format=torch.channels_last)
    out = d(x)
    assert seen == [True] and out.is_contiguous()
    assert float((ref - x).abs().max()) > 1e-2  # the network does change the image
    assert float((out - ref).abs().max()) <= 1e-5
    tiled = Deblurrer(net, seed=0, tile=32, tile_overlap=8)(x)
    tiled_nchw = Deblurrer(_tiny(**kw), seed=0, tile=32, tile_overlap=8, channels_last=False)(x)
    assert float((tiled - tiled_nchw).abs().max()) <= 1e-5
    assert not Deblurrer(nn.Conv2d(3, 3, 1)).channels_last  # other restorers: as given


def test_tiled_deblur_of_512_image_is_within_0_05_db_of_untiled():
    """The issue's criterion: tile 256 + overlap 32 on a 512x512 image with a known sharp version."""
    from skimage import data
    sharp = torch.from_numpy(data.astronaut().astype(np.float32) / 255).permute(2, 0, 1)[None]
    kernel = torch.zeros(3, 1, 9, 9)
    kernel[:, 0, 4, :] = 1 / 9  # horizontal motion blur
    blurry = F.conv2d(F.pad(sharp, (4, 4, 4, 4), mode='reflect'), kernel, groups=3)
    net = _tiny(seed=1)
    with torch.no_grad():
        net.output.weight.mul_(0.3)  # a residual of realistic size (random init is far from identity)
    untiled = Deblurrer(net, seed=0)(blurry)
    sizes = []
    net.register_forward_pre_hook(lambda m, args: sizes.append(tuple(args[0].shape[-2:])))
    tiled = Deblurrer(net, seed=0, tile=256, tile_overlap=32)(blurry)
    assert len(sizes) == 9 and set(sizes) == {(256, 256)}  # 3 x 3 tiles; never the whole image
    change = _psnr(untiled, blurry)
    assert change < 35, f'the network barely changes the image ({change:.1f} dB): the test would prove nothing'
    assert _psnr(tiled, untiled) > 45  # blend + consistent noise: only the attention statistics differ
    p_tiled, p_untiled = _psnr(tiled, sharp), _psnr(untiled, sharp)
    assert abs(p_tiled - p_untiled) <= 0.05, (p_tiled, p_untiled)


def test_call_accepts_arrays_and_pil_images_and_gives_back_the_same_kind():
    from PIL import Image
    net = _tiny()
    d = Deblurrer(net, seed=0)
    rng = np.random.default_rng(0)
    rgb8 = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    out8 = d(rgb8)
    assert out8.dtype == np.uint8 and out8.shape == rgb8.shape
    expected = d(torch.from_numpy(rgb8.astype(np.float32) / 255).permute(2, 0, 1)[None])
    np.testing.assert_array_equal(out8, np.rint(expected[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    rgb16 = (rgb8.astype(np.uint16) * 257)
    out16 = d(rgb16)
    assert out16.dtype == np.uint16 and out16.shape == rgb16.shape
    assert np.abs(out16.astype(np.float64) / 65535 - out8.astype(np.float64) / 255).max() <= 1 / 255
    assert np.unique(out16 % 257).size > 1  # really 16-bit, not 8-bit values scaled up
    gray = rgb8[..., 0]
    assert d(gray).shape == gray.shape and d(gray).dtype == np.uint8
    rgba = np.dstack([rgb8, rng.integers(0, 256, (20, 28), dtype=np.uint8)])
    out_rgba = d(rgba)
    np.testing.assert_array_equal(out_rgba[..., 3], rgba[..., 3])  # alpha passed through
    np.testing.assert_array_equal(out_rgba[..., :3], out8)
    pil = d(Image.fromarray(rgb8))
    assert isinstance(pil, Image.Image) and pil.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(pil), out8)
    assert d(Image.fromarray(gray)).mode == 'L'
    with pytest.raises(ValueError, match='pixel type'):
        d(rgb8.astype(np.float32))
    with pytest.raises(ValueError, match='expected a float tensor'):
        d(torch.rand(3, 20, 28))


def test_half_runs_bf16_autocast_on_cpu_and_stays_close_to_fp32():
    net = _tiny()
    x = torch.rand(1, 3, 32, 40)
    full = Deblurrer(net, seed=0)(x)
    half = Deblurrer(net, seed=0, half=True)(x)
    assert half.dtype == torch.float32
    assert (half - full).abs().mean() < 0.02
    assert not torch.equal(half, full)  # it really ran in reduced precision
    fp16 = Deblurrer(net, seed=0, half='fp16')(x)  # fp16 on request: 10 mantissa bits, closer than bf16's 7
    assert fp16.dtype == torch.float32 and not torch.equal(fp16, half)
    assert 0 < (fp16 - full).abs().mean() < (half - full).abs().mean()


def test_from_checkpoint_prefers_params_ema_and_strips_ddp_prefixes(tmp_path):
    a, b = _tiny(seed=0), _tiny(seed=1)
    x = torch.rand(1, 3, 24, 24)
    ckpt = tmp_path / 'net_g_10.pth'
    torch.save({'params': a.state_dict(), 'params_ema': {f'module.{k}': v for k, v in b.state_dict().items()}}, ckpt)
    opt = {'network_g': tiny_net_opts()}
    d = Deblurrer.from_checkpoint(ckpt, opt=opt, seed=0)
    torch.testing.assert_close(d(x), Deblurrer(b, seed=0)(x), rtol=0, atol=0)
    d = Deblurrer.from_checkpoint(ckpt, opt=opt, seed=0, param_key='params')
    torch.testing.assert_close(d(x), Deblurrer(a, seed=0)(x), rtol=0, atol=0)
    # an options file works the same
    import yaml
    path = tmp_path / 'opt.yml'
    path.write_text(yaml.safe_dump(opt))
    assert isinstance(build_restorer(str(path)), TPDiffNet)


def test_from_checkpoint_builds_the_network_the_checkpoint_carries(tmp_path, monkeypatch):
    """Issue 15 item 2: no opt needed for a checkpoint we saved; an explicit opt still wins."""
    a, b = _tiny(seed=0), _tiny(seed=1)
    x = torch.rand(1, 3, 24, 24)
    ckpt = tmp_path / 'net_g_10.pth'
    save_networks([a, b], ['params', 'params_ema'], ckpt, network_opt=tiny_net_opts())
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, 'load', lambda *args, **kw: reads.append(args[0]) or load(*args, **kw))
    d = Deblurrer.from_checkpoint(ckpt, seed=0)
    assert reads == [str(ckpt)]  # the options and the weights come from one read
    torch.testing.assert_close(d(x), Deblurrer(b, seed=0)(x), rtol=0, atol=0)
    # an explicit opt wins over the stored options: a mismatching one does not fit
    with pytest.raises(UserError, match=r'does not fit TPDiffNet as configured .*; pass the --opt \(network_g\)'):
        Deblurrer.from_checkpoint(ckpt, opt={'network_g': tiny_net_opts(dim=6, prior_ch=6)})
    # stored options that do not match the weights (a file edited or written by hand) are named as such
    save_networks([a], ['params'], ckpt, network_opt=tiny_net_opts(dim=6, prior_ch=6))
    with pytest.raises(UserError, match=r'the network options stored in the checkpoint \(network_opt\) do not match'):
        Deblurrer.from_checkpoint(ckpt)
    # stored options that do not build are named as such
    save_networks([a], ['params'], ckpt, network_opt={'type': 'NoSuchNet'})
    with pytest.raises(UserError, match=r'net_g_10.pth: network_opt.type: no network named "NoSuchNet"'):
        Deblurrer.from_checkpoint(ckpt)


def test_old_checkpoints_without_stored_options_still_work_with_opt(tmp_path):
    a = _tiny(seed=0)
    x = torch.rand(1, 3, 24, 24)
    old = tmp_path / 'old.pth'
    torch.save({'params': a.state_dict()}, old)  # as saved before checkpoints carried their options
    d = Deblurrer.from_checkpoint(old, opt={'network_g': tiny_net_opts()}, seed=0)
    torch.testing.assert_close(d(x), Deblurrer(a, seed=0)(x), rtol=0, atol=0)
    with pytest.raises(UserError) as e:  # without opt: the paper-size default, which it does not fit
        Deblurrer.from_checkpoint(old)
    msg = str(e.value)
    assert 'does not fit TPDiffNet' in msg and 'carries no network options' in msg and 'predates' in msg
    assert '--opt' in msg and '\n' not in msg


def test_bad_checkpoints_and_options_raise_one_line_user_errors(tmp_path):
    net = _tiny()
    with pytest.raises(UserError, match='no such checkpoint'):
        load_weights(net, tmp_path / 'missing.pth')
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a checkpoint')
    with pytest.raises(UserError, match='cannot read checkpoint'):
        load_weights(net, junk)
    other = tmp_path / 'other.pth'
    torch.save({'params': _tiny(dim=6, prior_ch=6).state_dict()}, other)
    with pytest.raises(UserError) as e:
        load_weights(net, other)
    msg = str(e.value)
    assert '\n' not in msg and 'shape mismatch' in msg and '--opt' in msg
    nodm = tmp_path / 'nodm.pth'
    torch.save({'params': _tiny(use_dm=False).state_dict()}, nodm)
    with pytest.raises(UserError, match=r'missing keys: dm\.'):
        load_weights(net, nodm)
    torch.save({'params': {**net.state_dict(), 'extra.weight': torch.zeros(1)}}, other)
    with pytest.raises(UserError, match='unexpected keys: extra.weight'):
        load_weights(net, other)
    with pytest.raises(UserError, match='no "params_ema" or "params"'):
        torch.save({'optimizers': [1]}, other)
        load_weights(net, other)
    with pytest.raises(UserError, match='no network_g'):
        build_restorer({'name': 'x'})
    with pytest.raises(UserError, match='no such options file'):
        build_restorer(str(tmp_path / 'nope.yml'))
    with pytest.raises(UserError, match='no network named'):
        build_restorer({'network_g': {'type': 'NoSuchNet'}})


def test_deblurrer_is_exported_lazily():
    code = ('import sys, tpdiff_plugin; assert "tpdiff_plugin.inference" not in sys.modules; '
            'from tpdiff_plugin import Deblurrer; assert "tpdiff_plugin.inference" in sys.modules; '
            'import torch; print(issubclass(Deblurrer, torch.nn.Module))')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == 'True', res.stderr


def test_build_restorer_takes_a_packaged_options_name(tmp_path, monkeypatch):
    """`--opt demo/stage2` (or options/demo/stage2.yml outside a clone) builds the packaged file's network_g."""
    from tpdiff_plugin.inference import build_restorer
    from tpdiff_plugin.utils.option_files import load_options_file, packaged_options
    monkeypatch.chdir(tmp_path)
    block = load_options_file(packaged_options()['demo/stage2'])['network_g']
    for name in ('demo/stage2', 'options/demo/stage2.yml'):
        net = build_restorer(name)
        assert type(net).__name__ == block['type'] and net.patch_embed.out_channels == block['dim']
    with pytest.raises(UserError, match=r'^--opt: no such options file: demo/stage3'):
        build_restorer('demo/stage3')
