"""The `wmtp` command line.

Each subcommand lives in `weighted_mtp/commands/<name>.py` and provides `add_parser(subparsers)`.
The bare form `wmtp --config ... --recipe ...` (the original project's command line) means `train`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from weighted_mtp import __version__
from weighted_mtp.errors import WMTPError

COMMANDS = ("train", "config", "ls", "cp", "data", "model", "generate", "eval", "rollout", "inspect", "demo", "study")
DEFAULT_COMMAND = "train"

log = logging.getLogger("weighted_mtp")


class OneLineErrors(argparse.ArgumentParser):
    """Usage mistakes are one line and exit status 2, like every other error (`wmtp CMD -h` for help)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="wmtp",
        description="Weighted Multi-Token Prediction: train, evaluate and prepare data for MTP code models.",
        epilog="Without a subcommand, `wmtp --config ... --recipe ...` means `wmtp train ...`.",
    )
    parser.add_argument("--version", action="version", version=f"weighted_mtp {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"weighted_mtp.commands.{name}").add_parser(subparsers)
    return parser


def _with_default_command(argv: list[str]) -> list[str]:
    if not argv or argv[0] in COMMANDS or argv[0] in ("-h", "--help", "--version"):
        return argv
    return [DEFAULT_COMMAND, *argv]


def setup_logging(level: str = "info") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def _unknown_command(argv: list[str]) -> str | None:
    """A first word that is neither a command, a flag nor a key=value override: a mistyped command."""
    if not argv or argv[0] in COMMANDS or argv[0].startswith("-") or "=" in argv[0]:
        return None
    import difflib

    close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)}){hint}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    unknown = _unknown_command(argv)
    if unknown is not None:
        print(f"error: {unknown}", file=sys.stderr)
        return 2
    argv = _with_default_command(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(getattr(args, "log_level", "info"))
    try:
        return int(args.func(args) or 0)
    except WMTPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
