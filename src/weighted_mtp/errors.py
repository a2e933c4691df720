"""User-facing errors.

Anything a user can cause with their input (a config, a data file, a checkpoint path) raises a
subclass of `WMTPError`. The CLI prints its message on one line and exits with status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class WMTPError(Exception):
    """An error caused by the user's input; its message must say which file, line or field."""

    exit_code = 2


class ConfigError(WMTPError):
    """Invalid configuration: unknown key, wrong type, missing file, unknown preset."""


class DataError(WMTPError):
    """Invalid or inconsistent dataset files."""


class CheckpointError(WMTPError):
    """A checkpoint or model directory that cannot be loaded."""


class UnknownComponentError(WMTPError):
    """A name that is not among the known ones (models, datasets, benchmarks, value heads)."""


def lookup(table: dict, name: str, kind: str):
    """`table[name]`, or an UnknownComponentError that lists the known names and the closest one."""
    import difflib

    if name in table:
        return table[name]
    known = sorted(table)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownComponentError(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})")
