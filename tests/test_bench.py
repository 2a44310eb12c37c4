"""Smoke test of bench/run.py --quick: the table has every row, with finite positive numbers (no timing asserts)."""
import json
import math
import os
import sys

from conftest import REPO, run_cmd


def test_bench_quick_prints_every_row(tmp_path):
    sys.path.insert(0, str(REPO / 'bench'))
    try:
        from run import ROW_NAMES
    finally:
        sys.path.remove(str(REPO / 'bench'))
    out = tmp_path / 'bench.json'
    res = run_cmd([sys.executable, str(REPO / 'bench' / 'run.py'), '--quick', '--json', str(out)], cwd=tmp_path,
                  timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    printed = {line.split('|')[0].strip(): line.split('|')[1].strip() for line in res.stdout.splitlines()
               if line.count('|') >= 3}
    rows = {r['row']: r for r in json.loads(out.read_text())['rows']}
    assert list(rows) == list(ROW_NAMES)
    skipped_in_quick = {'peak memory, one 512x512 tile', 'est. peak memory, 3840x2160 tiled'}
    has_model = (REPO / 'options' / 'demo_stage2.yml').is_file() and \
        (REPO / 'tpdiff_plugin' / 'models' / 'tpdiff_model.py').is_file()
    for name in ROW_NAMES:
        assert name in printed, name
        value = rows[name]['value']
        if name in skipped_in_quick or (name.startswith('stage-2') and not has_model):
            assert value is None and printed[name] == 'skipped'
            continue
        assert value is not None and math.isfinite(value) and value > 0, (name, value)
        assert math.isclose(float(printed[name]), value, rel_tol=1e-2, abs_tol=1e-3), name
    # the parameter ratio is the two networks' own counts
    from basicsr.archs import build_network
    from tpdiff_plugin.archs.ttformer_arch import TPDiffNet
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    expected = count(TPDiffNet()) / count(build_network({'type': 'PeerRestormer'}))
    assert math.isclose(rows['TP-Diff / Restormer params']['value'], expected, rel_tol=1e-9)
    assert 'T=8 steps' in rows['DM sampling share of TP-Diff']['note']
    assert os.path.isfile(out)
