"""`wmtp config`: print the resolved configuration and which file set each layer."""

from __future__ import annotations

import argparse

from weighted_mtp.commands.common import add_config_arguments, resolve
from weighted_mtp.config import config_to_yaml


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="print the resolved configuration")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    resolved = resolve(args)
    print("# layers, later ones win: " + " < ".join(["schema defaults", *resolved.sources]))
    print(config_to_yaml(resolved.config), end="")
    return 0
