"""``python -m lesionkit``: the same as the ``lesionkit`` command."""

from lesionkit.cli import entry

entry()
