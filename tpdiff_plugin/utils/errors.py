"""User-facing errors: one clear line naming the file or option, no deep stack trace."""


class UserError(Exception):
    """Bad input from the user (a path, an option, a file). The CLI prints ``error: <message>`` and exits 2.

    The message must name the culprit (file path or option key) and say what to do about it.
    """


def read_bytes(path, what):
    """The bytes of the file ``path``; an unreadable one is a UserError ``<what> <path>: cannot read (<reason>)``
    (``what`` names the option it came from, e.g. ``-opt: options file``; empty for a path alone)."""
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as e:
        raise UserError(f'{what + " " if what else ""}{path}: cannot read ({e.strerror})') from None
