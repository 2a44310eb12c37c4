"""Texture Prior Encoder: memory write from sharp tokens, argmax read by blurry tokens, VQ-style gradients."""
import math

import pytest
import torch

from tpdiff_plugin.archs.tpe_arch import TexturePriorEncoder, pad_to_multiple



def _tiny(prior_scale=4, **kw):
    torch.manual_seed(0)
    return TexturePriorEncoder(in_ch=3, prior_ch=8, mem_slots=16, prior_scale=prior_scale, enc_ch=4, **kw)


def test_default_size_is_about_0_12m():
    n = sum(p.numel() for p in TexturePriorEncoder().parameters())
    assert 80_000 <= n <= 160_000


@pytest.mark.parametrize('scale', [4, 1])
def test_shapes_odd_sizes_batch(scale):
    tpe = _tiny(scale)
    blur, sharp = torch.randn(2, 3, 67, 93), torch.randn(3, 3, 45, 50)
    h, w = math.ceil(67 / scale), math.ceil(93 / scale)
    z, index = tpe.read(blur, return_index=True)
    assert z.shape == (2, 8, h, w)
    assert index.shape == (2, h, w) and index.dtype == torch.long
    assert tpe.write(sharp).shape == (16, 8)
    assert tpe(blur, sharp).shape == (2, 8, h, w)
    assert tpe(blur).shape == (2, 8, h, w)


def test_read_takes_the_highest_scoring_entry():
    tpe = _tiny()
    blur = torch.randn(2, 3, 32, 36)
    memory = torch.randn(16, 8)
    z, index = tpe.read(blur, memory, return_index=True)
    # z is made of memory entries, exactly, placed where their tokens are
    torch.testing.assert_close(z, memory[index].permute(0, 3, 1, 2), atol=0, rtol=0)
    # and the entry is the argmax of the query-memory score
    tokens = tpe.enc_blur(blur).flatten(2)
    mean, std = tokens.mean(-1, keepdim=True), tokens.std(-1, unbiased=False, keepdim=True)
    scores = tpe.read_q(((tokens - mean) / std).transpose(1, 2)) @ memory.t()
    assert torch.equal(index.flatten(1), scores.argmax(-1))
    assert index.unique().numel() > 1  # different tokens pick different textures


def test_forward_is_read_of_written_memory():
    tpe = _tiny()
    blur, sharp = torch.randn(2, 3, 24, 28), torch.randn(2, 3, 24, 28)
    torch.testing.assert_close(tpe(blur, sharp), tpe.read(blur, tpe.write(sharp)))
    torch.testing.assert_close(tpe(blur), tpe.read(blur, tpe.memory))
    assert not torch.allclose(tpe.write(sharp), tpe.memory)


def test_write_attends_over_the_sharp_tokens_of_the_whole_batch():
    """Memory queries attend to all sharp tokens pooled over the batch: the result is invariant to the
    order of the batch and to duplicating it, and depends on every image of it."""
    tpe = _tiny()
    sharp = torch.randn(3, 3, 16, 20)
    m = tpe.write(sharp)
    torch.testing.assert_close(tpe.write(sharp[[2, 0, 1]]), m, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tpe.write(torch.cat([sharp, sharp])), m, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(tpe.write(sharp[:2]), m, atol=1e-4)
    # write = M + out(attn(q(M), k(T), v(T))): a reference with the module's layers
    t = tpe.enc_sharp(sharp).flatten(2).transpose(1, 2).reshape(-1, 8)
    a = torch.softmax(tpe.write_q(tpe.memory) @ tpe.write_k(t).t() / math.sqrt(8), dim=-1)
    torch.testing.assert_close(m, tpe.memory + tpe.write_out(a @ tpe.write_v(t)), atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_gradient_through_write_and_read():
    tpe = _tiny()
    z = tpe(torch.randn(2, 3, 24, 28), torch.randn(2, 3, 24, 28))
    (z * torch.randn_like(z)).sum().backward()
    for name, p in tpe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_argmax_read_sends_gradient_to_selected_entries_only():
    tpe = _tiny()
    blur = torch.randn(1, 3, 8, 12)  # 6 tokens, 16 entries: some entries are not selected
    z, index = tpe.read(blur, return_index=True)
    weights = torch.randn_like(z)
    (z * weights).sum().backward()
    selected = torch.zeros(16, dtype=torch.bool)
    selected[index.flatten()] = True
    assert 0 < selected.sum() < 16
    grad = tpe.memory.grad
    assert torch.all(grad[~selected] == 0)
    assert torch.all(grad[selected].abs().sum(dim=1) > 0)
    # each selected row receives exactly the sum of dL/dz over the tokens that picked it
    expected = torch.zeros(16, 8).index_add_(0, index.flatten(), weights.flatten(2).transpose(1, 2)[0])
    torch.testing.assert_close(grad, expected)
    # the straight-through copy reaches the query path (encoder and read projection)
    assert tpe.read_q.weight.grad.abs().sum() > 0
    assert tpe.enc_blur.body[0].weight.grad.abs().sum() > 0
    assert tpe.write_q.weight.grad is None  # no write happened


def test_pad_to_multiple():
    x = torch.arange(35.).view(1, 1, 5, 7)
    y = pad_to_multiple(x, 4)
    assert y.shape == (1, 1, 8, 8)
    assert torch.equal(y[..., :5, :7], x)
    assert torch.equal(y[..., 5, :7], x[..., 3, :])  # reflection
    assert pad_to_multiple(x, 1) is x
    tiny = pad_to_multiple(torch.ones(1, 1, 2, 2), 8)  # pad larger than the side: replication
    assert torch.equal(tiny, torch.ones(1, 1, 8, 8))


def test_untrained_read_uses_many_memory_entries_on_photos():
    """The read must not collapse onto one entry at initialisation (then only that entry would learn)."""
    import numpy as np
    from skimage import data
    photos = [data.astronaut()[:128, :128], data.chelsea()[:128, :128]]
    x = torch.from_numpy(np.stack(photos).astype(np.float32) / 255).permute(0, 3, 1, 2)
    torch.manual_seed(0)
    tpe = TexturePriorEncoder()
    _, index = tpe.read(x, return_index=True)
    assert index.unique().numel() >= 64  # of 256 entries, for 2 x 32 x 32 tokens
