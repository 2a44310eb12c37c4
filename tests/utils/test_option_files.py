"""utils/option_files.py and option_check.py: inputs the fuzz suite (tests/fuzz/test_fuzz_options.py) found ending
in a traceback; each now ends in one UserError line naming the file or the option."""
import pytest

from tpdiff_plugin.option_check import validate_options
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.option_files import load_options_file


@pytest.mark.parametrize('text, match', [
    (b'name: x\nmodel_type: \x80y\n', r'x.yml \(line 2\): not UTF-8 text \(byte 0x80\)'),  # was UnicodeDecodeError
    (b'lr: !!float inch\n', r"not valid YAML: ValueError: could not convert string to float: 'inch'"),
    (b'use_tb_logger: !!bool maybe\n', "not valid YAML: KeyError: 'maybe'"),
    (b'when: !!timestamp soon\n', 'not valid YAML: AttributeError'),
    (b'a: ' + b'[' * 3000 + b'\n', 'not valid YAML: RecursionError'),
])
def test_unreadable_yaml_is_one_line(tmp_path, text, match):
    (tmp_path / 'x.yml').write_bytes(text)
    with pytest.raises(UserError, match=match) as info:
        load_options_file(str(tmp_path / 'x.yml'))
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('change, match', [
    ({None: 'x'}, 'unknown option "None"'),  # `~: x` in YAML: difflib got a None (TypeError)
    ({3: 'x'}, 'unknown option "3"'),
    ({'datasets': 1}, 'option "datasets" must be a mapping'),  # was AttributeError ('int' has no 'items')
    ({'path': 5}, 'option "path" must be a mapping, got int'),  # was TypeError ('int' is not iterable)
])
def test_options_of_the_wrong_shape_are_named(change, match):
    opt = {'name': 'x', 'model_type': 'TPDiffModel', 'num_gpu': 0, **change}
    with pytest.raises(UserError, match=match):
        validate_options(opt, 'x.yml')


def test_find_options_file_prefers_a_file_then_a_packaged_name(tmp_path, monkeypatch):
    from tpdiff_plugin.utils.option_files import find_options_file, packaged_options
    monkeypatch.chdir(tmp_path)
    stage2 = packaged_options()['tpdiff_stage2']
    for value in ('tpdiff_stage2', 'tpdiff_stage2.yml', 'options/tpdiff_stage2.yml', './options/tpdiff_stage2.yml'):
        assert find_options_file(value) == stage2
    (tmp_path / 'tpdiff_stage2.yml').write_text('name: mine\n')
    assert find_options_file('tpdiff_stage2.yml') == 'tpdiff_stage2.yml'  # a file that exists always wins
    assert find_options_file('tpdiff_stage2') == stage2
    with pytest.raises(UserError, match=r'^--opt: no such options file: demo/stage9 \(nor a packaged'):
        find_options_file('demo/stage9', '--opt')
    with pytest.raises(UserError, match='no such options file'):
        find_options_file('../options/demo/stage1')  # only names inside the packaged folder
