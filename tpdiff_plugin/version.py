"""The plugin's version: one place, read by ``setup.py`` (without importing torch), ``tpdiff --version`` and the
metadata every saved checkpoint carries (``utils/checkpoint.py``). Bump it with a ``CHANGELOG.md`` entry."""
__version__ = '0.2.0'
