"""Console scripts: ``basicsr`` (upstream train/test with the plugin registered) and ``tpdiff`` (our tools).

``basicsr train -opt X.yml [--auto_resume] [--launcher ...] [--force_yml ...]`` and
``basicsr test -opt X.yml`` run upstream ``basicsr.train.train_pipeline`` /
``basicsr.test.test_pipeline`` unchanged, with arguments parsed by upstream, so upstream docs
apply. Experiments, results and tb_logger folders are created under the current directory.
``-opt`` also takes a packaged options name (``tpdiff options list``): the wrapper replaces it with the
packaged file's path before upstream parses the arguments, so upstream's parser is not patched.

``tpdiff <tool>`` runs the plugin's own tools. Each tool is a module in ``tpdiff_plugin.tools``
defining ``COMMAND`` (its name), ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args)``,
which raises :class:`UserError` for bad input: ``tpdiff`` prints it as one line ``error: ...``, exit 2.
"""
import argparse
import importlib
import os
import sys

from tpdiff_plugin.option_check import validate_options
from tpdiff_plugin.utils.allocator import tune_malloc
from tpdiff_plugin.utils.errors import UserError
from tpdiff_plugin.utils.option_files import apply_force_yml, find_options_file, load_options_file
from tpdiff_plugin.version import __version__

# Modules under tpdiff_plugin.tools that provide a `tpdiff` sub-command, in --help order.
TOOL_MODULES = ['make_lmdb', 'make_demo', 'options', 'info', 'deblur', 'explain', 'export', 'compare', 'report']


def _fail(message, code=2):
    print(f'error: {message}', file=sys.stderr)
    return code


def prepare_cpu():
    """Per-process settings every CPU entry point needs (see DESIGN.md, Non-functional).

    Near-identity residual nets produce denormal floats, which take x86's slow path (about 20x
    slower measured on our machines); flushing them to zero costs nothing in accuracy that matters.
    glibc's malloc keeps freed memory instead of page-faulting large activations in again on every layer
    (``utils/allocator.py``; ``TPDIFF_NO_MALLOPT=1`` or the user's own ``MALLOC_*_`` settings leave it as is).
    """
    import torch
    torch.set_flush_denormal(True)
    tune_malloc()


def _force_yml_entries(argv):
    """The ``KEY=VALUE`` entries that follow ``--force_yml`` (upstream's nargs='+')."""
    entries, i = [], 0
    while i < len(argv):
        if argv[i] == '--force_yml':
            i += 1
            while i < len(argv) and not argv[i].startswith('-'):
                entries.append(argv[i])
                i += 1
        else:
            i += 1
    return entries


def _check_opt_file(argv):
    """Resolve ``-opt`` (a file, or a packaged options name) in ``argv`` in place, and fail early, with one
    line, on a missing or unreadable options file (upstream would raise deep).

    ``--force_yml`` overrides are applied first, as upstream applies them, so that a path fixed on the
    command line is the one checked.
    """
    for i, a in enumerate(argv):
        if a == '-opt' and i + 1 < len(argv):
            path = argv[i + 1] = find_options_file(argv[i + 1])
            opt = apply_force_yml(load_options_file(path), _force_yml_entries(argv), path)
            validate_options(opt, path)


def run_basicsr(command, argv):
    """Run upstream's train or test pipeline with ``argv`` (upstream's own argument parser)."""
    _check_opt_file(argv)
    prepare_cpu()
    sys.argv = [f'basicsr {command}'] + list(argv)
    root = os.getcwd()
    ok = False
    try:
        if command == 'train':
            from basicsr.train import train_pipeline
            train_pipeline(root)
        else:
            from basicsr.test import test_pipeline
            test_pipeline(root)
        ok = True
    finally:
        _close_process_group(wait_for_others=ok)


def _close_process_group(wait_for_others):
    """End a ``--launcher pytorch/slurm`` run cleanly (upstream never does).

    Without this, one rank can exit while the others still finish their last save, and gloo's worker
    threads are torn down at interpreter exit: "terminate called without an active exception", SIGABRT,
    in about 1 of 4 two-process CPU runs here. A barrier (after success only: a failed rank must not
    wait for the others) and ``destroy_process_group`` avoid both.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_others:
        dist.barrier()
    dist.destroy_process_group()


def basicsr_main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = ('usage: basicsr {train,test} -opt OPTIONS.yml [--auto_resume] [--launcher {none,pytorch,slurm}] '
             '[--force_yml KEY=VALUE ...] [--debug]   |   basicsr --version')
    if not argv or argv[0] in ('-h', '--help'):
        print(usage)
        print('\nRuns upstream basicsr.train.train_pipeline / basicsr.test.test_pipeline with tpdiff-plugin '
              'registered.\nExperiments and results are written under the current directory.')
        return 0
    if argv[0] == '--version':
        print(version_line())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in ('train', 'test'):
        return _fail(f'unknown command "{command}"; {usage}')
    try:
        run_basicsr(command, rest)
    except UserError as e:
        return _fail(str(e))
    return 0


def version_line():
    """``tpdiff-plugin X (basicsr Y, torch Z)``: what a bug report needs first."""
    import basicsr
    import torch
    return f'tpdiff-plugin {__version__} (basicsr {getattr(basicsr, "__version__", "?")}, torch {torch.__version__})'


def _load_tools():
    tools = []
    for name in TOOL_MODULES:
        try:
            tools.append(importlib.import_module(f'tpdiff_plugin.tools.{name}'))
        except ModuleNotFoundError as e:
            if e.name != f'tpdiff_plugin.tools.{name}':
                raise
    return tools


def tpdiff_main(argv=None):
    parser = argparse.ArgumentParser(prog='tpdiff', description='tpdiff-plugin tools (TP-Diff for BasicSR).')
    parser.add_argument('--version', action='version', version=version_line())
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for tool in _load_tools():
        p = sub.add_parser(tool.COMMAND, help=tool.HELP, description=tool.HELP)
        tool.add_arguments(p)
        p.set_defaults(_tool=tool)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    prepare_cpu()
    try:
        result = args._tool.run(args)
    except UserError as e:
        return _fail(str(e))
    except (OSError, MemoryError) as e:  # the machine, not the input (disk full, permissions): one line, exit 1
        where = f' ({e.filename})' if getattr(e, 'filename', None) else ''
        return _fail(f'{args.command}: {e.strerror or e}{where}', code=1)
    except Exception as e:  # noqa: BLE001
        if type(e).__module__ != 'lmdb':
            raise
        out = getattr(args, 'output', None)
        return _fail(f'{args.command}: LMDB error: {e}' + (f' while writing under {out}' if out else '') +
                     '; check free disk space (and the file size limit), then run it again', code=1)
    return int(result or 0)


if __name__ == '__main__':
    sys.exit(tpdiff_main())
