"""`tpdiff options list|copy`: the packaged options files, listed and written out for editing."""
import os
from pathlib import Path

import pytest
import yaml

from tpdiff_plugin.utils.option_files import PACKAGED_OPTIONS_DIR, packaged_options

REPO_OPTIONS = Path(__file__).resolve().parents[2] / 'options'


def test_the_package_holds_every_options_file():
    """The wheel's options are the repository's: `options/` is the packaged folder itself."""
    names = set(packaged_options())
    on_disk = {str(p.relative_to(REPO_OPTIONS).with_suffix('')) for p in REPO_OPTIONS.rglob('*.yml')}
    assert names == on_disk and {'tpdiff_stage1', 'tpdiff_stage2', 'demo/stage1', 'test/gopro'} <= names
    assert os.path.samefile(REPO_OPTIONS, PACKAGED_OPTIONS_DIR)


def test_list_prints_names_and_descriptions(cli_runner, tmp_path):
    res = cli_runner(['tpdiff', 'options', 'list'], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    names = list(packaged_options())
    lines = {line.split()[0]: line for line in res.stdout.splitlines()[:len(names)]}
    assert list(lines) == names
    assert 'TP-Diff demo, stage 1' in lines['demo/stage1']


def test_copy_writes_identical_files_and_never_overwrites(cli_runner, tmp_path):
    res = cli_runner(['tpdiff', 'options', 'copy', 'demo/stage1', 'tpdiff_stage2.yml', 'mine'], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for name, file in (('demo/stage1', 'stage1.yml'), ('tpdiff_stage2', 'tpdiff_stage2.yml')):
        assert (tmp_path / 'mine' / file).read_bytes() == Path(packaged_options()[name]).read_bytes()
    (tmp_path / 'mine' / 'stage1.yml').write_text('name: edited\n')
    again = cli_runner(['tpdiff', 'options', 'copy', 'demo/stage2', 'demo/stage1', 'mine'], cwd=tmp_path)
    assert again.returncode == 2 and 'mine/stage1.yml exists; nothing was written' in again.stderr
    assert (tmp_path / 'mine' / 'stage1.yml').read_text() == 'name: edited\n'
    assert not (tmp_path / 'mine' / 'stage2.yml').exists()  # nothing at all, not the first of two
    forced = cli_runner(['tpdiff', 'options', 'copy', 'demo/stage1', 'mine', '--force'], cwd=tmp_path)
    assert forced.returncode == 0 and yaml.safe_load((tmp_path / 'mine' / 'stage1.yml').read_text())['stage'] == 1


def test_copy_all_keeps_the_tree_so_documented_paths_exist(cli_runner, tmp_path):
    res = cli_runner(['tpdiff', 'options', 'copy', '--all'], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for name in packaged_options():
        assert (tmp_path / 'options' / f'{name}.yml').is_file(), name
    assert not [p for p in (tmp_path / 'options').rglob('.*')]  # no temporary files left


@pytest.mark.parametrize('args, message', [
    (['copy', 'nope'], 'no packaged options named nope'),
    (['copy'], 'name the options to copy'),
    (['copy', 'test/demo', 'compare/demo'], 'would both be written to ./demo.yml'),
    (['copy', '--all', 'a', 'b'], 'takes at most one argument'),
])
def test_copy_errors_are_one_line(cli_runner, tmp_path, args, message):
    res = cli_runner(['tpdiff', 'options', *args], cwd=tmp_path)
    assert res.returncode == 2 and message in res.stderr and 'Traceback' not in res.stderr
    assert list(tmp_path.iterdir()) == []
