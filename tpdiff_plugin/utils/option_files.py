"""Reading a BasicSR options file: YAML with one-line errors, upstream's ``--force_yml`` overrides, and the
number and integer checks every option shares. What the keys mean is checked in ``tpdiff_plugin/option_check.py``.

The options files ship inside the package (``tpdiff_plugin/options``; a clone's top-level ``options/`` links
to it). :func:`find_options_file` lets every place that takes an options path also take a *packaged name*:
``tpdiff_stage2``, ``demo/stage1.yml``, or a documented path such as ``options/demo/stage1.yml`` run from a
folder that has no such file. A file that exists always wins.
"""
import difflib
import os

import yaml

from tpdiff_plugin.utils.errors import UserError, read_bytes


PACKAGED_OPTIONS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'options')
OPTIONS_EXTENSIONS = ('.yml', '.yaml')


def packaged_options():
    """``{name: file}`` for every options file shipped with the plugin; a name is its path under the packaged
    folder, ``/``-separated, without ``.yml`` (e.g. ``demo/stage1``), sorted."""
    found = {}
    for folder, dirs, files in os.walk(PACKAGED_OPTIONS_DIR):
        dirs.sort()
        for file in sorted(files):
            if file.endswith(OPTIONS_EXTENSIONS):
                rel = os.path.relpath(os.path.join(folder, file), PACKAGED_OPTIONS_DIR)
                found[os.path.splitext(rel)[0].replace(os.sep, '/')] = os.path.join(folder, file)
    return dict(sorted(found.items()))


def packaged_name(value):
    """The packaged name ``value`` would mean (``options/`` prefix, ``./`` and the extension dropped)."""
    name = str(value).replace('\\', '/')
    while name.startswith('./'):
        name = name[2:]
    if name.startswith('options/'):
        name = name[len('options/'):]
    root, ext = os.path.splitext(name)
    return root if ext in OPTIONS_EXTENSIONS else name


def find_options_file(value, what='-opt'):
    """The options file ``value`` names: the path itself when it is a file, else the packaged file of that name
    (see the module docstring); else a UserError naming ``what`` and pointing to ``tpdiff options list``."""
    path = os.fspath(value)
    if os.path.isfile(path):
        return path
    packaged = packaged_options().get(packaged_name(path))
    if packaged is not None:
        return packaged
    raise UserError(f'{what}: no such options file: {path} (nor a packaged options name; '
                    '`tpdiff options list` shows them)')


def load_options_file(path):
    """Parse ``path`` as YAML and return the mapping, or raise UserError naming the file (and line)."""
    data = read_bytes(path, '-opt: options file')
    try:
        opt = yaml.safe_load(data.decode('utf-8'))
    except UnicodeDecodeError as e:
        line = data.count(b'\n', 0, e.start) + 1
        raise UserError(f'{path} (line {line}): not UTF-8 text (byte {data[e.start]:#04x}); save it as UTF-8') \
            from None
    except yaml.YAMLError as e:
        where = ''
        mark = getattr(e, 'problem_mark', None)
        if mark is not None:
            where = f' (line {mark.line + 1}, column {mark.column + 1})'
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise UserError(f'{path}{where}: not valid YAML: {problem}') from None
    except Exception as e:  # noqa: BLE001  (PyYAML's constructors: `!!float inch`, `!!bool x`, nesting too deep)
        text = str(e).strip().splitlines()
        raise UserError(f'{path}: not valid YAML: {type(e).__name__}: {text[0] if text else "(no message)"} (check '
                        'the values with an explicit !!tag, and the nesting)') from None
    if not isinstance(opt, dict):
        raise UserError(f'{path}: expected a mapping of option keys at the top level, got {type(opt).__name__}')
    return opt


def apply_force_yml(opt, entries, source):
    """Apply upstream's ``--force_yml KEY:SUB=VALUE`` overrides to ``opt`` (as ``parse_options`` does later).

    Like upstream, only existing keys can be set; a missing one is a UserError naming it.
    """
    # at call time: basicsr imports only after compat's torchvision mend (the CLI reads the file before that)
    from basicsr.utils.options import _postprocess_yml_value
    for entry in entries:
        if entry.count('=') != 1:
            raise UserError(f'--force_yml: expected KEY:SUBKEY=VALUE, got {entry!r}')
        keys, value = (part.strip() for part in entry.split('='))
        node, path = opt, keys.split(':')
        for depth, key in enumerate(path):
            if not isinstance(node, dict) or key not in node:
                raise UserError(f'--force_yml {entry}: {source} has no option "{":".join(path[:depth + 1])}" '
                                '(--force_yml can only change existing keys)')
            if depth == len(path) - 1:
                node[key] = _postprocess_yml_value(value)
            else:
                node = node[key]
    return opt


def closest_option(key, known):
    """The known option name most like the unknown ``key`` (a typo such as ``teachr``), or None."""
    close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def is_number(value):
    """An int or float option value (YAML's numbers), ``true``/``false`` excluded."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(value, option, minimum, source):
    """``value`` of ``option`` must be an integer >= ``minimum`` (an integral float such as ``5e3`` counts);
    else a UserError naming ``source`` and the option."""
    integral_float = isinstance(value, float) and value.is_integer()  # `!!float 5e3` is common in basicsr files
    if isinstance(value, bool) or not (isinstance(value, int) or integral_float) or value < minimum:
        kind = 'a positive integer' if minimum >= 1 else 'an integer >= 0'
        raise UserError(f'{source}{": " if source else ""}{option} must be {kind}, got {value!r}')
