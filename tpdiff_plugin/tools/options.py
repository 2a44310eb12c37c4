"""``tpdiff options list`` and ``tpdiff options copy NAME... [DIR]``: the options files that ship with the plugin.

A pip-installed plugin has no ``options/`` folder of its own. ``list`` prints every packaged options file with the
first line of its header comment. ``copy`` writes one or more of them out for editing: NAME is a packaged name
as ``list`` shows it (``tpdiff_stage2``, ``demo/stage1``; ``.yml`` and an ``options/`` prefix are accepted), DIR
the folder to write into (default: the current folder), each file under its own base name. ``--all`` copies every
file, keeping the tree, into DIR (default ``options``), so that documented paths such as
``options/demo/stage1.yml`` then exist as files. Existing files are never overwritten without ``--force``, and each
file is written atomically (temporary file, rename).

Every options path the plugin accepts (``basicsr train|test -opt``, ``tpdiff deblur --opt``, ``tpdiff compare
-opt``, ...) also takes a packaged name directly, so copying is only needed to edit one.
"""
import os
import shutil

from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.option_files import PACKAGED_OPTIONS_DIR, packaged_name, packaged_options

COMMAND = 'options'
HELP = 'List the options files that ship with the plugin, or copy them out for editing.'


def add_arguments(parser):
    sub = parser.add_subparsers(dest='action', metavar='ACTION')
    sub.required = True
    sub.add_parser('list', help='every packaged options file, with its one-line description')
    copy = sub.add_parser('copy', help='write packaged options files out for editing')
    copy.add_argument('names', nargs='*', metavar='NAME', help='packaged names (see `tpdiff options list`), then '
                      'optionally the folder to write into (default: the current folder)')
    copy.add_argument('--all', action='store_true', help='copy every packaged file, keeping the tree (default '
                      'folder: options)')
    copy.add_argument('--force', action='store_true', help='overwrite files that exist')


def description(path):
    """The first line of the file's header comment, without the ``#`` ('' when it has none)."""
    with open(path, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if line.startswith('#'):
                return line.lstrip('#').strip()
            if line:
                return ''
    return ''


def _plan(args, available):
    """``[(source file, destination file)]`` for ``copy``, or a UserError before anything is written."""
    names = list(args.names)
    if args.all:
        if len(names) > 1:
            raise UserError('options copy --all: takes at most one argument, the folder to write into')
        folder = names[0] if names else 'options'
        return [(src, os.path.join(folder, os.path.relpath(src, PACKAGED_OPTIONS_DIR))) for src in available.values()]
    if not names:
        raise UserError('options copy: name the options to copy (see `tpdiff options list`), or use --all')
    folder = '.'
    if len(names) > 1 and packaged_name(names[-1]) not in available:
        folder = names.pop()  # the last argument is the destination folder, like cp
    unknown = [n for n in names if packaged_name(n) not in available]
    if unknown:
        raise UserError(f'options copy: no packaged options named {", ".join(unknown)} (`tpdiff options list` shows '
                        'them)')
    plan = [(available[packaged_name(n)], os.path.join(folder, os.path.basename(available[packaged_name(n)])))
            for n in names]
    seen = {}
    for src, dst in plan:
        if dst in seen and seen[dst] != src:
            raise UserError(f'options copy: {packaged_name(os.path.relpath(seen[dst], PACKAGED_OPTIONS_DIR))} and '
                            f'{packaged_name(os.path.relpath(src, PACKAGED_OPTIONS_DIR))} would both be written to '
                            f'{dst}; copy them into different folders')
        seen[dst] = src
    return plan


def copy_file(src, dst):
    """Copy ``src`` to ``dst`` through a temporary file and a rename (a kill leaves no half-written options)."""
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(dst)}.tmp{os.getpid()}')
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run(args):
    available = packaged_options()
    if args.action == 'list':
        width = max(map(len, available))
        for name, path in available.items():
            print(f'{name:<{width}}  {description(path)}')
        print(f'\n{len(available)} files in {PACKAGED_OPTIONS_DIR}. Use a name wherever an options file is taken '
              '(e.g. `basicsr train -opt demo/stage1`), or `tpdiff options copy NAME` to edit one.')
        return 0
    plan = _plan(args, available)
    folders = [dst for _, dst in plan if os.path.isdir(dst)]
    if folders:
        raise UserError(f'options copy: {folders[0]} is a folder; nothing was written')
    exists = [dst for _, dst in plan if os.path.exists(dst)]
    if exists and not args.force:
        raise UserError(f'options copy: {exists[0]} exists' + (f' (and {len(exists) - 1} more)' if len(exists) > 1
                                                               else '') + '; nothing was written (--force overwrites)')
    for src, dst in plan:
        copy_file(src, dst)
        print(f'wrote {dst}')
    return 0
