"""`wmtp demo`: the method end to end on the real SmolLM2-135M-Instruct (see `weighted_mtp.demo`).

  wmtp demo                              # about 10-15 minutes on a 2-core CPU
  wmtp demo --scale smoke                # a few problems and steps: checks that every stage runs
  wmtp demo --use-micro-model --scale smoke   # the random micro model: seconds
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from weighted_mtp.demo import SCALES

    parser = subparsers.add_parser(
        "demo", help="evaluate, roll out, train the critic and Verifiable WMTP, evaluate again: one table"
    )
    parser.add_argument("--scale", default="demo", choices=sorted(SCALES), help="how much of each stage (default: %(default)s)")
    parser.add_argument("--config", default="configs/defaults.yaml", help="environment YAML (default: %(default)s)")
    parser.add_argument("--preset", default="cpu-smollm2", help="named overlay (default: %(default)s)")
    parser.add_argument("--use-micro-model", action="store_true", help="the random micro model instead (plumbing only)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides for every stage")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from weighted_mtp.demo import render_table, run_demo

    result = run_demo(
        scale=args.scale, preset=args.preset, use_micro_model=args.use_micro_model, overrides=args.overrides,
        defaults=args.config,
    )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file gets the whole table, not 80 columns of wrapped cells
    console.print(render_table(result))
    for name, where in result.locations.items():
        console.print(f"{name}: {where}")
    return 0
