"""Fuzzed checkpoints through ``load_network_file`` / ``pick_params``: the network loaded, or one clear UserError.

Inputs start from a tiny TPDiffNet's ``{'params': state_dict}``: tensors swapped for other shapes, dtypes
(integer, bool, half, complex), layouts (sparse, meta, quantized), NaN/Inf, scalars, non-tensor values (numbers,
text, lists, nested mappings); keys renamed (typos, ``module.`` prefixes, numbers, None), removed or added; the
state under other entries, or the whole file something other than a mapping; and the saved file's bytes
truncated or edited (read in a forked child: torch's zip reader must not take the test run with it).
"""
import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import tiny_net
from fuzz_helpers import _EDIT, fuzz_settings, isolated, mutate, outcome
from tpdiff_plugin.utils.checkpoint import load_network_file, pick_params

NET = tiny_net()
STATE = {k: v.clone() for k, v in NET.state_dict().items()}
NAMES = sorted(STATE)

pytestmark = pytest.mark.filterwarnings('ignore::UserWarning')  # torch's notes on sparse, quantized and complex tensors


def _odd_tensor(kind, like):
    if kind == 'shape':
        return torch.zeros(like.numel() + 1)
    if kind == 'scalar':
        return torch.tensor(1.5)
    if kind == 'empty':
        return torch.zeros(0)
    if kind == 'nan':
        return torch.full_like(like, float('nan')) if like.is_floating_point() else like
    if kind == 'sparse':
        return like.reshape(like.shape[0], -1).to_sparse() if like.dim() else like.to_sparse()
    if kind == 'meta':
        return torch.empty_like(like, device='meta')
    if kind == 'quantized':
        return torch.quantize_per_tensor(like.float(), 0.1, 0, torch.qint8)
    return like.to({'int': torch.int64, 'bool': torch.bool, 'half': torch.float16, 'bf16': torch.bfloat16,
                    'double': torch.float64, 'complex': torch.complex64}[kind])


_TENSOR_KINDS = ['shape', 'scalar', 'empty', 'nan', 'sparse', 'meta', 'quantized', 'int', 'bool', 'half', 'bf16',
                 'double', 'complex']
_JUNK = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_subnormal=False),
                               st.text(max_size=8)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3),
                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
_KEY = st.one_of(st.sampled_from(NAMES).map(lambda k: 'module.' + k), st.sampled_from(NAMES).map(lambda k: k + 'x'),
                 st.text(max_size=10), st.integers(-3, 3), st.none())


@st.composite
def checkpoints(draw):
    state = dict(STATE)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(['tensor', 'junk', 'rename', 'delete', 'add']))
        name = draw(st.sampled_from(NAMES))
        if name not in state:
            continue
        if op == 'tensor':
            state[name] = _odd_tensor(draw(st.sampled_from(_TENSOR_KINDS)), STATE[name])
        elif op == 'junk':
            state[name] = draw(_JUNK)
        elif op == 'rename':
            state[draw(_KEY)] = state.pop(name)
        elif op == 'delete':
            del state[name]
        else:
            state[draw(_KEY)] = draw(st.one_of(st.sampled_from(list(STATE.values())), _JUNK))
    wrap = draw(st.sampled_from(['params', 'params_ema', 'both', 'bare', 'other', 'list', 'junk']))
    if wrap in ('params', 'params_ema', 'other'):
        return {wrap: state}
    if wrap == 'both':
        return {'params': state, 'params_ema': draw(st.sampled_from([state, dict(STATE), {}]))}
    if wrap == 'list':
        return [state]
    return state if wrap == 'bare' else draw(_JUNK)


_LOAD_ARGS = st.tuples(st.sampled_from([None, 'params', 'params_ema', 'other']), st.booleans(), st.booleans())


@pytest.fixture(scope='module')
def spot(tmp_path_factory):
    return tmp_path_factory.mktemp('fuzz_checkpoints')


@fuzz_settings(2)
@given(checkpoints(), _LOAD_ARGS)
def test_mutated_state_dicts(spot, ckpt, load_args):
    param_key, strict, fallback = load_args
    outcome(pick_params, ckpt, 'fuzz.pth', param_key, fallback)
    path = spot / 'net_g.pth'
    torch.save(ckpt, path)
    outcome(load_network_file, NET, str(path), '--weights', param_key=param_key, strict=strict,
            fallback_to_params=fallback)


@fuzz_settings()
@given(st.lists(_EDIT, min_size=1, max_size=4))
def test_damaged_checkpoint_files(spot, edits):
    buf = io.BytesIO()
    torch.save({'params': STATE}, buf)
    path = spot / 'damaged.pth'
    path.write_bytes(mutate(buf.getvalue(), edits))
    isolated(load_network_file, NET, str(path), '--weights')


def test_the_unmutated_checkpoint_loads(spot):
    torch.save({'params': STATE}, spot / 'clean.pth')
    assert outcome(load_network_file, NET, str(spot / 'clean.pth'), '--weights') == ('params', None)
