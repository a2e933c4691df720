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
    """A name that is not in a registry."""
