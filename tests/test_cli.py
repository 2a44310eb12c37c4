"""The `basicsr` and `tpdiff` console scripts: help, dispatch and one-line errors on bad input."""
import textwrap
from pathlib import Path

import pytest

from tpdiff_plugin import cli
from tpdiff_plugin.utils.errors import UserError


def test_tpdiff_help_lists_tools(cli_runner, tmp_path):
    res = cli_runner(['tpdiff', '--help'], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for module in cli._load_tools():
        assert module.COMMAND in res.stdout
    assert 'make-lmdb' in res.stdout and 'make-demo' in res.stdout and 'report' in res.stdout


def test_tools_holds_only_subcommands():
    """Every module of tools/ is a `tpdiff` sub-command; libraries live in utils/ or data/."""
    names = sorted(p.stem for p in (Path(cli.__file__).parent / 'tools').glob('*.py') if p.stem != '__init__')
    assert names == sorted(cli.TOOL_MODULES)
    for tool in cli._load_tools():
        assert all(hasattr(tool, name) for name in ('COMMAND', 'HELP', 'add_arguments', 'run')), tool.__name__


def test_basicsr_help_and_unknown_command(cli_runner, tmp_path):
    ok = cli_runner(['basicsr', '--help'], cwd=tmp_path)
    assert ok.returncode == 0 and 'train' in ok.stdout and 'test' in ok.stdout
    bad = cli_runner(['basicsr', 'fly', '-opt', 'x.yml'], cwd=tmp_path)
    assert bad.returncode == 2 and 'unknown command "fly"' in bad.stderr


def test_missing_options_file_is_one_line(cli_runner, tmp_path):
    res = cli_runner(['basicsr', 'train', '-opt', 'nope.yml'], cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == ('error: -opt: no such options file: nope.yml (nor a packaged options name; '
                                  '`tpdiff options list` shows them)')
    assert not (tmp_path / 'experiments').exists()


def test_opt_takes_a_packaged_name_and_a_local_file_wins(tmp_path, monkeypatch):
    """`basicsr train -opt demo/stage1` (or the documented options/demo/stage1.yml) outside a clone reads the
    packaged file: the wrapper puts its path into the arguments upstream parses."""
    monkeypatch.chdir(tmp_path)
    packaged = Path(cli.__file__).parent / 'options' / 'demo' / 'stage1.yml'
    for name in ('demo/stage1', 'options/demo/stage1.yml'):
        argv = ['-opt', name, '--auto_resume']
        with pytest.raises(UserError, match='dataroot'):  # resolved, then checked: no demo set in this folder
            cli._check_opt_file(argv)
        assert argv == ['-opt', str(packaged), '--auto_resume']
    local = tmp_path / 'options' / 'demo' / 'stage1.yml'
    local.parent.mkdir(parents=True)
    local.write_text('name: mine\nmodel_type: TPDiffModel\nnum_gpu: 0\nstage: 1\n')
    argv = ['-opt', 'options/demo/stage1.yml']
    cli._check_opt_file(argv)
    assert argv[1] == 'options/demo/stage1.yml'


def test_version(cli_runner, tmp_path):
    from tpdiff_plugin.version import __version__
    for prog in ('tpdiff', 'basicsr'):
        res = cli_runner([prog, '--version'], cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith(f'tpdiff-plugin {__version__} (basicsr 1.4.2, torch ')


def test_invalid_yaml_names_file_and_line(tmp_path, capsys):
    opt = tmp_path / 'bad.yml'
    opt.write_text('name: x\nmodel_type: SRModel\ntrain: [1, 2\n')
    assert cli.basicsr_main(['train', '-opt', str(opt)]) == 2
    err = capsys.readouterr().err
    assert 'bad.yml' in err and 'line' in err and 'Traceback' not in err


def test_missing_dataroot_names_the_option(tmp_path, capsys):
    opt = tmp_path / 'o.yml'
    opt.write_text(textwrap.dedent("""\
        name: x
        model_type: SRModel
        datasets:
          train:
            type: PairedImageDataset
            dataroot_gt: /does/not/exist.lmdb
        """))
    assert cli.basicsr_main(['test', '-opt', str(opt)]) == 2
    err = capsys.readouterr().err
    assert 'datasets.train.dataroot_gt' in err and '/does/not/exist.lmdb' in err


def test_missing_pretrained_checkpoint_names_the_option(tmp_path, capsys):
    opt = tmp_path / 'o.yml'
    opt.write_text('name: x\nmodel_type: SRModel\npath:\n  pretrain_network_tpe: stage1/net_tpe.pth\n')
    assert cli.basicsr_main(['train', '-opt', str(opt)]) == 2
    assert 'path.pretrain_network_tpe' in capsys.readouterr().err


def test_missing_required_key(tmp_path, capsys):
    opt = tmp_path / 'o.yml'
    opt.write_text('model_type: SRModel\n')
    assert cli.basicsr_main(['train', '-opt', str(opt)]) == 2
    assert 'missing required option "name"' in capsys.readouterr().err


def _opt_with_missing_dataroot(tmp_path):
    opt = tmp_path / 'o.yml'
    opt.write_text(textwrap.dedent("""\
        name: x
        model_type: SRModel
        datasets:
          train:
            type: PairedImageDataset
            dataroot_gt: /does/not/exist.lmdb
            gt_size: 64
        """))
    return opt


def test_force_yml_overrides_are_applied_before_the_early_checks(tmp_path):
    opt = _opt_with_missing_dataroot(tmp_path)
    (tmp_path / 'here.lmdb').mkdir()
    cli._check_opt_file(['-opt', str(opt), '--force_yml', f'datasets:train:dataroot_gt={tmp_path}/here.lmdb',
                         'datasets:train:gt_size=32', '--auto_resume'])  # accepted: the override exists
    with pytest.raises(UserError, match='datasets.train.dataroot_gt'):
        cli._check_opt_file(['-opt', str(opt), '--force_yml', 'datasets:train:gt_size=32'])


def test_force_yml_of_a_missing_key_is_named(tmp_path):
    opt = _opt_with_missing_dataroot(tmp_path)
    with pytest.raises(UserError, match='has no option "datasets:train:dataroot_lq"'):
        cli._check_opt_file(['-opt', str(opt), '--force_yml', 'datasets:train:dataroot_lq=/x'])
    with pytest.raises(UserError, match='expected KEY:SUBKEY=VALUE'):
        cli._check_opt_file(['-opt', str(opt), '--force_yml', 'name'])
