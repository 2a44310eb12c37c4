"""``tpdiff info``: parameter table per component and MACs, from a BasicSR options file."""
import copy
import re

import pytest
import yaml
from basicsr.archs import build_network

from conftest import tiny_net_opts
from tpdiff_plugin.cli import tpdiff_main

TINY_G = tiny_net_opts(prior_ch=6, deform_impl='grid_sample')  # the TPE's prior_ch
OPTIONS = {
    'name': 'info_test',
    'model_type': 'TPDiffModel',
    'network_g': TINY_G,
    'network_g_tv': {**TINY_G, 'deform_impl': 'torchvision'},
    'network_tpe': dict(type='TexturePriorEncoder', prior_ch=6, mem_slots=8, enc_ch=4),
}



def _write(tmp_path, opt, name='opt.yml'):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(opt), encoding='utf-8')
    return str(path)


def _parse(text):
    """{network key: {'type': str, 'rows': {component: (params, macs)}}}."""
    tables, current = {}, None
    for line in text.splitlines():
        head = re.match(r'^(network_\w+): (\w+)', line)
        if head:
            current = tables[head.group(1)] = {'type': head.group(2), 'rows': {}}
            continue
        row = re.match(r'^  (\S+(?: \S+)*)\s+(\d+)\s+[\d.]+M\s+(\d+)\s+[\d.]+G$', line)
        if row and current is not None:
            current['rows'][row.group(1)] = (int(row.group(2)), int(row.group(3)))
    return tables


def test_table_params_and_macs(tmp_path, capsys):
    path = _write(tmp_path, OPTIONS)
    assert tpdiff_main(['info', '-opt', path, '--size', '32x48']) == 0
    tables = _parse(capsys.readouterr().out)
    assert set(tables) == {'network_g', 'network_g_tv', 'network_tpe'}
    total_macs_of = {}
    for key, table in tables.items():
        net = build_network(copy.deepcopy(OPTIONS[key]))
        assert table['type'] == OPTIONS[key]['type']
        rows = table['rows']
        total_params, total_macs = rows.pop('total')
        assert total_params == sum(p.numel() for p in net.parameters())
        assert sum(p for p, _ in rows.values()) == total_params
        assert sum(m for _, m in rows.values()) == total_macs > 0
        for name, child in net.named_children():
            if child is not None:
                assert rows[name][0] == sum(p.numel() for p in child.parameters()), name
        total_macs_of[key] = total_macs
    g = tables['network_g']['rows']
    assert g['dm'][1] > 0 and g['encoder_level1'][1] > 0 and g['refinement'][1] > 0
    # the output conv, counted by hand: 32·48 pixels × 3 outputs × (2·dim = 8 inputs × 3×3 taps)
    assert g['output'][1] == 32 * 48 * 3 * 8 * 9
    # the TPE's memory is a row of its own
    assert tables['network_tpe']['rows']['memory'] == (8 * 6, 0)
    # torchvision's deform_conv2d gets a handle that counts the same work as the grid_sample form
    assert total_macs_of['network_g_tv'] == total_macs_of['network_g']


def test_deformable_filter_macs_are_counted(tmp_path, capsys):
    """FM-MSA's filter (k²·C MACs per pixel for the weights + 4 per bilinear sample) shows in the count."""
    with_filter = {**OPTIONS, 'network_g': {**TINY_G, 'use_dm': False}}
    without = {**OPTIONS, 'network_g': {**TINY_G, 'use_dm': False, 'fm_msa': False}}
    totals = []
    for opt in (with_filter, without):
        opt = {k: v for k, v in opt.items() if k != 'network_g_tv' and k != 'network_tpe'}
        assert tpdiff_main(['info', '-opt', _write(tmp_path, opt), '--size', '16x16']) == 0
        totals.append(_parse(capsys.readouterr().out)['network_g']['rows']['total'][1])
    # the filter at encoder level 1 alone: 16·16 px × 4 channels × 9 taps × (1 weight + 4 sampling) MACs
    assert totals[0] - totals[1] > 16 * 16 * 4 * 9 * 5


def test_no_macs_option_and_defaults(tmp_path, capsys):
    path = _write(tmp_path, {'name': 'x', 'model_type': 'y', 'network_tpe': {'type': 'TexturePriorEncoder'}})
    assert tpdiff_main(['info', '-opt', path, '--no-macs']) == 0
    out = capsys.readouterr().out
    assert re.search(r'^  total\s+128000\s', out, re.M)
    assert 'all networks: 128000 params' in out


@pytest.mark.parametrize('opt,args,message', [
    (None, [], 'no such options file'),
    ({'name': 'x', 'model_type': 'y'}, [], 'no network_'),
    ({'name': 'x', 'network_g': {'type': 'NoSuchNet'}}, [], 'network_g.type'),
    ({'name': 'x', 'network_g': {'dim': 4}}, [], '"network_g" must be a mapping with a "type"'),
    ({'name': 'x', 'network_g': {'type': 'TPDiffNet', 'dim': 5}}, [], 'network_g: cannot build TPDiffNet'),
    ({'name': 'x', 'network_g': {'type': 'TPDiffNet', 'no_such_arg': 1}}, [], 'no_such_arg'),
    ({'name': 'x', 'network_tpe': {'type': 'TexturePriorEncoder'}}, ['--size', '12by3'], '--size'),
])
def test_user_errors(tmp_path, capsys, opt, args, message):
    path = str(tmp_path / 'missing.yml') if opt is None else _write(tmp_path, opt)
    assert tpdiff_main(['info', '-opt', path] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and message in err
    if opt is None:
        assert 'missing.yml' in err


def test_console_script_reports_missing_file_without_traceback(tmp_path, cli_runner):
    result = cli_runner(['tpdiff', 'info', '-opt', str(tmp_path / 'nope.yml')], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert 'nope.yml' in result.stderr and 'Traceback' not in result.stderr


def test_every_tool_loads_without_the_optional_mmengine(tmp_path):
    """mmengine is an extra: without it `tpdiff` still starts (the install test found `tpdiff --help` dying on
    an import of mmengine), and `tpdiff info` prints the parameters with one line saying MACs need mmengine."""
    import subprocess
    import sys
    path = _write(tmp_path, {k: OPTIONS[k] for k in ('name', 'model_type', 'network_g')})
    code = ('import sys; sys.modules["mmengine"] = None\n'  # `import mmengine...` now raises ImportError
            'from tpdiff_plugin.cli import tpdiff_main\n'
            f'sys.exit(tpdiff_main(["info", "-opt", {path!r}, "--size", "32x32"]))\n')
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert 'MACs not available: UserError: counting MACs needs mmengine' in res.stdout
    params = sum(p.numel() for p in build_network(copy.deepcopy(TINY_G)).parameters())
    assert f'{params:,}' in res.stdout or str(params) in res.stdout


def test_info_takes_a_packaged_options_name(cli_runner, tmp_path):
    res = cli_runner(['tpdiff', 'info', '-opt', 'demo/stage1', '--no-macs'], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'network_g: TPDiffNet' in res.stdout and 'network_tpe: TexturePriorEncoder' in res.stdout
