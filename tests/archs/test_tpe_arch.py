"""Texture Prior Encoder: memory write from sharp tokens, argmax read by blurry tokens, VQ-style gradients."""
import math

import pytest
import torch

from tpdiff_plugin.archs.tpe_arch import TexturePriorEncoder



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


def test_memory_ema_follows_training_writes_only():
    """memory_ema: the first training write is copied, then a running mean, then an EMA with the decay;
    eval-mode writes (validation) leave it alone."""
    tpe = _tiny(mem_ema_decay=0.5)
    assert torch.equal(tpe.memory_ema, tpe.memory) and int(tpe.memory_ema_updates) == 0
    sharp = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    tpe.eval()
    tpe.write(sharp[0])
    assert int(tpe.memory_ema_updates) == 0 and torch.equal(tpe.memory_ema, tpe.memory)
    tpe.train()
    with torch.no_grad():
        m = [tpe.write(s) for s in sharp]
    torch.testing.assert_close(tpe.memory_ema, 0.5 * (0.5 * m[0] + 0.5 * m[1]) + 0.5 * m[2])
    assert int(tpe.memory_ema_updates) == 3
    assert tpe.memory_ema.grad_fn is None and not tpe.memory_ema.requires_grad
    with pytest.raises(ValueError, match='mem_ema_decay'):
        _tiny(mem_ema_decay=1.0)


def test_memory_ema_is_saved_and_old_checkpoints_load():
    tpe = _tiny()
    tpe.write(torch.randn(2, 3, 16, 16))
    state = tpe.state_dict()
    assert {'memory_ema', 'memory_ema_updates'} <= set(state)
    fresh = _tiny()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory_ema, tpe.memory_ema) and int(fresh.memory_ema_updates) == 1
    old = {k: v for k, v in state.items() if not k.startswith('memory_ema')}  # a checkpoint from before it existed
    fresh.load_state_dict(old)
    assert torch.equal(fresh.memory_ema, state['memory']) and int(fresh.memory_ema_updates) == 0


def test_forward_with_one_sharp_batch_per_chunk():
    """forward(blur, [s1, s2]): chunk i of blur reads the memory written from s_i (None: the learned one)."""
    tpe = _tiny()
    blur = torch.randn(4, 3, 16, 20)
    s1, s2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    z, index = tpe(blur, [s1, s2], return_index=True)
    torch.testing.assert_close(z[:2], tpe.read(blur[:2], tpe.write(s1)))
    torch.testing.assert_close(z[2:], tpe.read(blur[2:], tpe.write(s2)))
    assert index.shape == (4, 4, 5)
    torch.testing.assert_close(tpe(blur, [s1, None])[2:], tpe.read(blur[2:]))
    with pytest.raises(ValueError, match='equal chunks'):
        tpe(blur[:3], [s1, s2])


def test_usage_counts_distinct_entries_and_perplexity():
    tpe = _tiny()
    assert tpe.usage(torch.tensor([3, 3, 3, 3])) == (1.0, pytest.approx(1.0))
    entries, perplexity = tpe.usage(torch.tensor([[0, 1], [2, 3]]))
    assert entries == 4 and perplexity == pytest.approx(4.0)
    entries, perplexity = tpe.usage(torch.tensor([0, 0, 0, 1]))
    assert entries == 2 and 1 < perplexity < 2
