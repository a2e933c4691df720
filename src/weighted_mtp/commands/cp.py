"""`wmtp cp`: copy a recipe or preset to a file of your own to edit (as torchtune's `tune cp`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from weighted_mtp.errors import ConfigError
from weighted_mtp.io import atomic_write_text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cp", help="copy a recipe (or presets/<name>) to a file to edit")
    parser.add_argument("name", help="a recipe name (see wmtp ls), or presets/<name>")
    parser.add_argument("destination", type=Path)
    parser.add_argument("--config-dir", type=Path, default=Path("configs"), help="where recipes and presets live")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    name = args.name
    source = args.config_dir / (f"{name}.yaml" if name.startswith("presets/") else f"recipe.{name}.yaml")
    if not source.is_file():
        raise ConfigError(f"{name}: no such recipe or preset in {args.config_dir} (wmtp ls lists them)")
    if args.destination.exists():
        raise ConfigError(f"{args.destination}: already exists; nothing was copied")
    args.destination.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.destination, source.read_text(encoding="utf-8"))
    print(f"copied {source} to {args.destination}; train with it: wmtp train --recipe {args.destination}")
    return 0
