"""The paper's comparison prior generators (``network_g.prior_generator``: memory_bank, sparse_coding, vq):
shapes, where gradients go, that the choice changes the output, and that each learns the TPE's prior."""
import pytest
import torch
import torch.nn.functional as F

from tpdiff_plugin.archs.prior_generators import build_prior_generator
from tpdiff_plugin.archs.tpe_arch import TexturePriorEncoder
from tpdiff_plugin.archs.ttformer_arch import TPDiffNet

GENERATORS = ('memory_bank', 'sparse_coding', 'vq')
TINY = dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1], ffn_expansion_factor=2.0,
            prior_ch=8, prior_hidden=4, dm_feats=8, dm_blocks=1, dm_cond_blocks=1, mem_slots=16, identity_init=False)


def generator(name, seed=0):
    torch.manual_seed(seed)
    return build_prior_generator(name, in_ch=3, prior_ch=8, prior_scale=4, feat_ch=16, num_blocks=2, mem_slots=16)


@pytest.mark.parametrize('name', GENERATORS)
def test_shapes_in_and_out(name):
    gen = generator(name)
    assert gen(torch.rand(2, 3, 16, 24)).shape == (2, 8, 4, 6)
    with pytest.raises(ValueError, match='multiple of prior_scale'):
        gen(torch.rand(1, 3, 18, 24))
    net = TPDiffNet(prior_generator=name, **TINY).eval()
    assert net.dm is None and net.prior_gen is not None
    x = torch.rand(1, 3, 21, 30)  # not a multiple of the pad: padded and cropped as for the DM
    out, z = net(x, return_prior=True)
    assert out.shape == x.shape and z.shape == net.prior_shape(x)


@pytest.mark.parametrize('name', GENERATORS)
def test_gradients_reach_every_parameter_of_the_generator(name):
    net = TPDiffNet(prior_generator=name, **TINY).train()
    x = torch.rand(2, 3, 32, 32)
    out, z = net(x, return_prior=True)
    loss = out.abs().mean() + z.abs().mean()
    if net.prior_gen.last_aux_loss is not None:  # VQ: the codebook learns from its codebook term only
        loss = loss + net.prior_gen.last_aux_loss
    loss.backward()
    params = dict(net.prior_gen.named_parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values()), \
        [k for k, p in params.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert ('codebook' in params) == (name == 'vq')  # the memory-based two read the TPE memory, a buffer
    assert (net.prior_gen.last_aux_loss is not None) == (name == 'vq')


@pytest.mark.parametrize('name', GENERATORS)
def test_the_generator_changes_the_output_relative_to_the_dm(name):
    torch.manual_seed(0)
    dm_net = TPDiffNet(**TINY).eval()
    net = TPDiffNet(prior_generator=name, **TINY).eval()
    missing, unexpected = net.load_state_dict(dm_net.state_dict(), strict=False)  # the same U-Net
    assert all(k.startswith('prior_gen.') for k in missing) and all(k.startswith('dm.') for k in unexpected)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out, z = net(x, return_prior=True)
        assert not torch.allclose(out, dm_net(x, generator=torch.Generator().manual_seed(0)), atol=1e-4)
        assert torch.equal(out, net(x, prior=z))  # the U-Net runs on the generated prior
        assert torch.equal(out, net(x, generator=torch.Generator().manual_seed(5)))  # deterministic, no noise


def test_the_default_network_is_unchanged():
    net = TPDiffNet(**TINY)
    assert net.prior_gen is None and net.prior_generator == 'dm'
    assert not any(k.startswith('prior_gen.') for k in net.state_dict())
    assert TPDiffNet(use_dm=False, **TINY).prior_generator is None


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match='prior_generator must be one of dm, memory_bank, sparse_coding, vq'):
        TPDiffNet(prior_generator='codebook', **TINY)
    with pytest.raises(ValueError, match='needs use_dm: true'):
        TPDiffNet(prior_generator='vq', use_dm=False, **TINY)
    with pytest.raises(ValueError, match='TPE memory has shape'):
        generator('memory_bank').load_memory(torch.zeros(8, 8))


@pytest.mark.parametrize('name', GENERATORS)
def test_each_generator_learns_the_tpe_prior_better_than_the_memory_mean(name):
    """Stage 2 in miniature: the generator is fitted to a frozen TPE's prior of fixed blurry images (the DM's
    target); after 30 Adam steps its L1 loss is below that of predicting the mean memory entry everywhere."""
    torch.manual_seed(0)
    tpe = TexturePriorEncoder(prior_ch=8, mem_slots=16, prior_scale=4, enc_ch=4).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        target = tpe.read(x)
    trivial = F.l1_loss(tpe.memory.detach().mean(0)[None, :, None, None].expand_as(target), target).item()
    gen = generator(name)
    gen.load_memory(tpe.memory)
    optim = torch.optim.Adam(gen.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        l_diff = F.l1_loss(gen(x), target)
        loss = l_diff + (gen.last_aux_loss if gen.last_aux_loss is not None else 0)
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(l_diff.item())
    assert losses[-1] < losses[0] and losses[-1] < trivial, (losses[0], losses[-1], trivial)


@pytest.mark.parametrize('name', GENERATORS)
def test_inference_entry_points_run_the_generator_or_refuse_it(name):
    """Deblurrer (whole and tiled) runs net_g's generator without a TPE; export and spandrel refuse it with one
    line rather than give another network's result; explain shows the generated prior."""
    from tpdiff_plugin.explain import explain_image
    from tpdiff_plugin.inference import Deblurrer
    from tpdiff_plugin.tools.export import ExportableTPDiff
    from tpdiff_plugin.utils.errors import UserError
    torch.manual_seed(0)
    net = TPDiffNet(prior_generator=name, **TINY).eval()
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        expected = net(x).clamp(0, 1)  # Deblurrer and explain clamp
        assert torch.allclose(Deblurrer(net, channels_last=False)(x), expected, atol=1e-5)
        assert Deblurrer(net, tile=32, tile_overlap=8, channels_last=False)(x).shape == x.shape
    result = explain_image(net, x, stage=2)
    assert result['prior_source'] == f'{name} generator' and result['memory_index'] is None
    assert torch.allclose(torch.from_numpy(result['output']), expected[0].permute(1, 2, 0), atol=1e-5)
    with pytest.raises(UserError, match=f'prior_generator {name} .* not exportable'):
        ExportableTPDiff(net)
    spandrel = pytest.importorskip('tpdiff_plugin.spandrel')
    with pytest.raises(spandrel.UnsupportedModelError, match='prior_generator'):
        spandrel.detect_options(net.state_dict())
