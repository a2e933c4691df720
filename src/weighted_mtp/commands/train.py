"""`wmtp train`: run an experiment's pipeline, or with --dry-run show what it would do."""

from __future__ import annotations

import argparse

from weighted_mtp.commands.common import add_config_arguments, resolve
from weighted_mtp.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train an experiment (baseline, critic, verifiable, rho1, ref_tuning)")
    add_config_arguments(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the resolved config and the plan, run one forward/backward; write nothing",
    )
    parser.add_argument(
        "--world-size", type=int, help="with --dry-run: the number of ranks to estimate memory for (default $WORLD_SIZE or 1)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    parser.add_argument(
        "--fresh", action="store_true", help="start over: remove the run directory's checkpoints, metrics and export first"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weighted_mtp.train.plan import dry_run

    resolved = resolve(args)
    if args.world_size is not None and (args.world_size < 1 or not args.dry_run):
        raise ConfigError("--world-size is for --dry-run, and at least 1")
    if args.dry_run:
        return dry_run(resolved, world_size=args.world_size)
    from weighted_mtp.train.run import train

    if args.resume and args.fresh:
        raise ConfigError("--resume and --fresh contradict each other: continue the run, or start it over")
    train(resolved.config, resume=args.resume, fresh=args.fresh)
    return 0
