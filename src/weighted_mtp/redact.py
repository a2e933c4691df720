"""Credentials in URLs: split off for the client that needs them, hidden everywhere else.

A tracking URI such as `http://user:secret@host:5000` must never reach a file, a log line, a
printed config or a tracking parameter; the MLflow client gets the user and password through its
standard environment variables (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) instead.
"""

from __future__ import annotations

import urllib.parse


def _host(parsed: urllib.parse.SplitResult) -> str:
    host = parsed.hostname or ""
    if ":" in host:  # an IPv6 literal keeps its brackets
        host = f"[{host}]"
    return f"{host}:{parsed.port}" if parsed.port else host


def redact_uri(uri: str) -> str:
    """The URI with any password replaced by ***, so it can appear in messages, files and logs."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.password is None:
        return uri
    netloc = f"{parsed.username}:***@{_host(parsed)}" if parsed.username else f"***@{_host(parsed)}"
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without user and password, the user, the password)."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.username is None and parsed.password is None:
        return uri, None, None
    bare = urllib.parse.urlunsplit(parsed._replace(netloc=_host(parsed)))
    unquote = urllib.parse.unquote
    return bare, unquote(parsed.username) if parsed.username else None, (
        unquote(parsed.password) if parsed.password is not None else None)
