"""Peer networks from spandrel, registered as Peer*: same weights and outputs as upstream, any input size."""
import importlib.util
import subprocess
import sys

import pytest
import torch
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY

from tpdiff_plugin.archs import peers_arch
from tpdiff_plugin.archs.arch_util import pad_to_multiple
from tpdiff_plugin.archs.peers_arch import PEERS, PUBLISHED_CONFIGS
from tpdiff_plugin.utils.errors import UserError

needs_spandrel = pytest.mark.skipif(importlib.util.find_spec('spandrel') is None or
                                    importlib.util.find_spec('spandrel_extra_arches') is None,
                                    reason='spandrel / spandrel-extra-arches not installed')

TINY = {
    'PeerRestormer': dict(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1]),
    'PeerNAFNet': dict(width=8, enc_blk_nums=[1, 1], middle_blk_num=1, dec_blk_nums=[1, 1]),
    'PeerMPRNet': dict(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1),
    'PeerFFTformer': dict(dim=8, num_blocks=[1, 1, 1], num_refinement_blocks=1),
    'PeerUformer': dict(embed_dim=8, depths=[1] * 9, num_heads=[1] * 9),
}


def _upstream(name):
    import importlib
    import warnings
    module, cls, _, _ = PEERS[name]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return getattr(importlib.import_module(module), cls)


@needs_spandrel
def test_every_peer_is_registered_under_its_own_name_from_this_module():
    for name in PEERS:
        assert name.startswith('Peer') and name in ARCH_REGISTRY
        cls = ARCH_REGISTRY.get(name)
        assert cls.__module__ == 'tpdiff_plugin.archs.peers_arch'
        assert issubclass(cls, _upstream(name))  # the spandrel class itself: upstream key names


@needs_spandrel
@pytest.mark.parametrize('name', sorted(TINY))
def test_peer_matches_upstream_and_pads_any_size(name):
    torch.manual_seed(0)
    net = build_network({'type': name, **TINY[name]}).eval()
    ref = _upstream(name)(**TINY[name]).eval()
    ref.load_state_dict(net.state_dict(), strict=True)  # same keys and shapes as upstream
    multiple, square = net.required_multiple(), net.pad_square
    x = torch.rand(1, 3, 37, 50)
    with torch.no_grad():
        out = net(x)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # the adapter's job: pad to the size upstream needs, run upstream, keep the final output, crop back
        xp = pad_to_multiple(x, multiple, square=square)
        assert xp.shape[-2] % multiple == 0 and xp.shape[-1] % multiple == 0
        assert xp.shape[-2] == xp.shape[-1] if square else True
        up = ref(xp)
        up = up[0] if isinstance(up, (list, tuple)) else up
        torch.testing.assert_close(out, up[..., :37, :50], rtol=1e-5, atol=1e-5)
        assert (out - x).abs().mean() > 1e-4  # random weights: it really ran a network


@needs_spandrel
def test_published_configurations_have_the_published_sizes():
    """Parameter counts from the papers (and docs/platform.md): Restormer 26.13M, NAFNet-GoPro 67.89M."""
    for name, millions in (('Restormer', 26.13), ('NAFNet-GoPro', 67.89)):
        net = build_network(dict(PUBLISHED_CONFIGS[name]))
        assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == millions, name


@needs_spandrel
def test_nafnet_padding_follows_its_depth():
    net = build_network({'type': 'PeerNAFNet', **TINY['PeerNAFNet']})
    assert net.required_multiple() == 4  # 2 encoder levels
    deeper = build_network({'type': 'PeerNAFNet', 'width': 8, 'enc_blk_nums': [1, 1, 1], 'middle_blk_num': 1,
                            'dec_blk_nums': [1, 1, 1]})
    assert deeper.required_multiple() == 8


def test_without_spandrel_the_plugin_imports_and_peers_explain_what_to_install():
    code = ('import sys\n'
            'sys.modules["spandrel"] = None\n'
            'sys.modules["spandrel_extra_arches"] = None\n'
            'import tpdiff_plugin\n'
            'from basicsr.utils.registry import ARCH_REGISTRY\n'
            'from tpdiff_plugin.utils.errors import UserError\n'
            'try:\n'
            '    ARCH_REGISTRY.get("PeerRestormer")(dim=8)\n'
            'except UserError as e:\n'
            '    print("USERERROR", e)\n')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip()
    assert line.startswith('USERERROR PeerRestormer needs spandrel') and 'pip install spandrel' in line


def test_missing_peer_placeholder_raises_user_error():
    cls = type('PeerNothing', (peers_arch.MissingPeer,), {'reason': 'ImportError: no module'})
    with pytest.raises(UserError, match='pip install spandrel==0.4.2 spandrel-extra-arches==0.2.0'):
        cls(width=8)
