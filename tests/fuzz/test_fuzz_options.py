"""Fuzzed options files through ``load_options_file`` and ``validate_options``: a mapping that passes, or one
clear UserError line.

Inputs start from ``options/demo/stage1.yml``: its text with characters, YAML punctuation or lines inserted,
deleted or re-indented, and non-UTF-8 bytes; and its parsed mapping with keys renamed (to typos, numbers,
None), removed or added, values replaced by values of other types (numbers, text, lists, nested mappings,
None) and sections wrapped in lists.
"""
import copy

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import REPO
from fuzz_helpers import _EDIT, fuzz_settings, mutate, outcome
from tpdiff_plugin.option_check import validate_options
from tpdiff_plugin.utils.option_files import load_options_file

BASE_TEXT = (REPO / 'options/demo/stage1.yml').read_text()
BASE = yaml.safe_load(BASE_TEXT)
# (floats without subnormals: the root conftest sets torch.set_flush_denormal(True), which hypothesis refuses)

_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_subnormal=False),
                    st.text(max_size=12), st.sampled_from(['2e-4', 'auto', '.', '/', 'datasets_lmdb', '~', 'lmdb',
                                                           'TPDiffNet', 'TPDiffModel', 'UnpairedCycleModel',
                                                           'UnpairedImageDataset']))
_KEY = st.one_of(st.text(max_size=12), st.integers(-5, 5), st.none(), st.booleans(),
                 st.floats(0, 2, allow_subnormal=False),
                 st.sampled_from(['netwrok_g', 'trian', 'type', 'lr', 'gt_size', 'path', 'datasets', 'train']))
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(_KEY, inner, max_size=3)), max_leaves=8)


@pytest.fixture(scope='module')
def spot(tmp_path_factory):
    return tmp_path_factory.mktemp('fuzz_options')


def check(opt, source):
    """The contract after a successful load: validation passes or names one problem in one line."""
    outcome(validate_options, opt, source)


_TEXT_EDIT = st.one_of(
    st.tuples(st.just('insert'), st.integers(0, 10 ** 5),
              st.one_of(st.text(max_size=6), st.sampled_from([':', '- ', '[', ']', '{', '}', '!!float ', '&a ', '*a',
                                                              '#', '|', '>', "'", '"', '\t', '\n', '  ', '? ']))),
    st.tuples(st.just('delete'), st.integers(0, 10 ** 5), st.integers(1, 8)),
    st.tuples(st.just('line'), st.integers(0, 10 ** 4), st.sampled_from(['drop', 'dup', 'indent', 'dedent'])))


def edit_text(text, edits):
    for op, pos, arg in edits:
        if op == 'line':
            lines = text.split('\n')
            i = pos % len(lines)
            if arg == 'drop':
                del lines[i]
            elif arg == 'dup':
                lines.insert(i, lines[i])
            else:
                lines[i] = '  ' + lines[i] if arg == 'indent' else lines[i][2:]
            text = '\n'.join(lines)
        else:
            pos %= len(text) + 1
            text = text[:pos] + arg + text[pos:] if op == 'insert' else text[:pos] + text[pos + arg:]
    return text


@fuzz_settings(2)
@given(st.lists(_TEXT_EDIT, min_size=1, max_size=5), st.lists(_EDIT, max_size=2))
def test_mutated_yaml_text(spot, edits, byte_edits):
    path = spot / 'fuzz.yml'
    path.write_bytes(mutate(edit_text(BASE_TEXT, edits).encode('utf-8', errors='surrogatepass'), byte_edits))
    opt, _ = outcome(load_options_file, str(path))
    if opt is not None:
        assert isinstance(opt, dict)
        check(opt, str(path))


def _containers(node, trail=()):
    """Every (trail, mapping or list) inside ``node``, itself first."""
    yield trail, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _containers(value, trail + (key,))


@st.composite
def mutated_options(draw):
    opt = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        places = [c for _, c in _containers(opt) if isinstance(c, dict) or (isinstance(c, list) and c)]
        node = draw(st.sampled_from(places))
        op = draw(st.sampled_from(['set', 'delete', 'rename', 'add', 'wrap']))
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys and op != 'add':
            continue
        key = draw(st.sampled_from(keys)) if keys else None
        if op == 'set':
            node[key] = draw(_VALUE)
        elif op == 'wrap':
            node[key] = [node[key]] if draw(st.booleans()) else {draw(_KEY): node[key]}
        elif isinstance(node, list):
            node.append(draw(_VALUE))
        elif op == 'delete':
            del node[key]
        elif op == 'rename':
            node[draw(_KEY)] = node.pop(key)
        else:
            node[draw(_KEY)] = draw(_VALUE)
    return opt


@fuzz_settings(4)
@given(mutated_options())
def test_mutated_option_mappings(opt):
    check(opt, 'fuzz.yml')


def test_the_unmutated_file_fails_only_on_its_missing_data(spot):
    opt, _ = outcome(load_options_file, str(REPO / 'options/demo/stage1.yml'))
    assert opt == BASE
    _, error = outcome(validate_options, opt, 'stage1.yml')
    assert error is None or 'no such file or folder' in error
