"""`wmtp train`: run an experiment's pipeline, or with --dry-run show what it would do."""

from __future__ import annotations

import argparse

from weighted_mtp.commands.common import add_config_arguments, resolve


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train an experiment (baseline, critic, verifiable, rho1, ref_tuning)")
    add_config_arguments(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, print the resolved config and the plan, run one forward/backward; write nothing",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weighted_mtp.train.plan import dry_run

    resolved = resolve(args)
    if args.dry_run:
        return dry_run(resolved)
    from weighted_mtp.train.run import train

    train(resolved.config, resume=args.resume)
    return 0
