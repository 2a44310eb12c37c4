"""The package's layers: no module imports from a layer above it (every import, also inside functions).

    utils/  version                          (bottom: depends on nothing of ours)
    archs/  losses/  data/  compat  registry (may use utils; archs, losses and data not each other)
    models/  inference  explain  option_check  spandrel  (may use everything below)
    tools/  cli  train  test                 (the command line, on top)

The package root ``__init__`` wires the registries and is left out.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'tpdiff_plugin'

LEVELS = {'utils': 0, 'version': 0, 'archs': 1, 'losses': 1, 'data': 1, 'compat': 1, 'registry': 1,
          'models': 2, 'inference': 2, 'explain': 2, 'option_check': 2, 'spandrel': 2, 'tools': 3, 'cli': 3,
          'train': 3, 'test': 3}
SIBLINGS = {'archs', 'losses', 'data'}  # the bottom layer's three parts stay independent


def part_of(module):
    """``tpdiff_plugin.models.tpdiff_model`` -> ``models``; the package itself -> ``''``."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else ''


def own_imports(path):
    """Every ``tpdiff_plugin`` module imported anywhere in ``path``, with line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split('.')[0] == 'tpdiff_plugin']
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or '').split('.')[0] == 'tpdiff_plugin':
            if node.module == 'tpdiff_plugin':  # `from tpdiff_plugin import x`: x is the part
                found += [(node.lineno, f'tpdiff_plugin.{a.name}') for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def upward_imports(path):
    """``[(line, imported module)]`` of the imports in ``path`` that break the layering."""
    here = part_of('.'.join(('tpdiff_plugin',) + path.relative_to(PACKAGE).with_suffix('').parts))
    bad = []
    for line, module in own_imports(path):
        there = part_of(module)
        if there == '':  # `import tpdiff_plugin`: registers everything, i.e. reaches the models layer
            there = 'models'
        if there == here:
            continue
        if LEVELS[there] > LEVELS[here] or (here in SIBLINGS and there in SIBLINGS):
            bad.append((line, module))
    return bad


MODULES = sorted(p for p in PACKAGE.rglob('*.py') if p != PACKAGE / '__init__.py')


@pytest.mark.parametrize('path', MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_from_a_layer_above(path):
    assert part_of('tpdiff_plugin.' + '.'.join(path.relative_to(PACKAGE).with_suffix('').parts)) in LEVELS
    assert upward_imports(path) == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a utils module that imports a tool, even inside a function, is caught."""
    fake = tmp_path / 'tpdiff_plugin'
    (fake / 'utils').mkdir(parents=True)
    bad = fake / 'utils' / 'bad.py'
    bad.write_text('import os\n\n\ndef f():\n    from tpdiff_plugin.tools.info import run\n    import tpdiff_plugin\n')
    monkeypatch.setattr(__import__(__name__), 'PACKAGE', fake)
    assert upward_imports(bad) == [(5, 'tpdiff_plugin.tools.info'), (6, 'tpdiff_plugin')]


def test_no_package_file_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES + [PACKAGE / '__init__.py']
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
