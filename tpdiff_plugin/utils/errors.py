"""User-facing errors: one clear line naming the file or option, no deep stack trace."""


class UserError(Exception):
    """Bad input from the user (a path, an option, a file). The CLI prints ``error: <message>`` and exits 2.

    The message must name the culprit (file path or option key) and say what to do about it.
    """
