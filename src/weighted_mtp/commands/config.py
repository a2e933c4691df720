"""`wmtp config`: print the resolved configuration, each value with the layer that set it."""

from __future__ import annotations

import argparse

from weighted_mtp.commands.common import add_config_arguments, resolve
from weighted_mtp.config.loader import annotated_yaml


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="print the resolved configuration")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    resolved = resolve(args)
    print("# layers, later ones win: " + " < ".join(["schema defaults", *resolved.sources]))
    print("# a value without a comment is the schema's default")
    print(annotated_yaml(resolved), end="")
    return 0
