"""utils/networks.py: building a registered network from an option block, with one-line errors."""
import pytest
import torch

from conftest import tiny_net_opts
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.networks import build_network_block


def test_builds_the_block_and_leaves_it_unchanged():
    block = tiny_net_opts(identity_init=True)
    before = dict(block)
    net = build_network_block('x.yml', 'network_g', block)
    assert type(net).__name__ == 'TPDiffNet' and block == before
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(net(x), x)  # identity start: the block's options reached the constructor


@pytest.mark.parametrize('block, message', [
    ({'dim': 8}, 'x.yml: option "network_g" must be a mapping with a "type"'),
    ({'type': 'NoSuchNet'}, 'x.yml: network_g.type: no network named "NoSuchNet" is registered'),
    ({'type': 'TPDiffNet', 'dim': 7}, 'x.yml: network_g: cannot build TPDiffNet'),
    ({'type': 'TPDiffNet', 'inp_channels': 3}, 'x.yml: network_g.inp_channels is now called in_ch'),
    ({'type': 'PatchDiscriminator', 'n_layers': 2}, 'x.yml: network_g.n_layers is now called num_layers'),
])
def test_bad_blocks_are_one_line_errors(block, message):
    with pytest.raises(UserError) as err:
        build_network_block('x.yml', 'network_g', block)
    assert str(err.value).startswith(message) and '\n' not in str(err.value)
