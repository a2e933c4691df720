"""`wmtp rollout`: sample solutions, run them against their tests, write a labelled rollout JSONL.

  wmtp rollout --recipe critic --benchmark mbpp --split train --n-samples 8
  wmtp rollout --recipe critic --model storage/runs/baseline/final --split validation --limit 50

By default the file goes where the `rollouts` dataset reads it (<paths.rollouts>/<split>.jsonl)
and is prepared right away, so `data.dataset: rollouts` trains on it (critic, verifiable). Each
problem's gold solution is added as a correct sample (`source: gold`) unless --no-gold. A killed
rollout, run again with the same settings, continues after its last finished problem.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from weighted_mtp.commands.common import add_config_arguments, resolve


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rollout", help="sample and execute solutions: labelled data for critic/verifiable"
    )
    parser.add_argument(
        "--model", help="checkpoint directory, model file or named model (default: model.name)"
    )
    parser.add_argument(
        "--benchmark", default="mbpp", help="mbpp, humaneval or codecontests (default: %(default)s)"
    )
    parser.add_argument(
        "--split", default="train", help="benchmark split to sample on (default: %(default)s)"
    )
    parser.add_argument("--n-samples", type=int, help="samples per problem (default: rollout.n_samples)")
    parser.add_argument("--limit", type=int, help="the first N problems only")
    parser.add_argument(
        "--workers", type=int, help="sandbox workers (default: evaluation.workers, else all cores)"
    )
    parser.add_argument(
        "--out", type=Path, help="output JSONL (default: <paths.rollouts>/<split>.jsonl)"
    )
    parser.add_argument(
        "--no-gold", action="store_true", help="model samples only, without each problem's gold solution"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="discard an unfinished rollout to the same file and start over"
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weighted_mtp.errors import ConfigError
    from weighted_mtp.eval.rollout import run_rollouts

    for flag, value in (
        ("--n-samples", args.n_samples),
        ("--limit", args.limit),
        ("--workers", args.workers),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    summary = run_rollouts(
        resolve(args).config,
        model_name=args.model,
        benchmark_name=args.benchmark,
        split=args.split,
        n_samples=args.n_samples,
        limit=args.limit,
        out=args.out,
        workers=args.workers,
        include_gold=not args.no_gold,
        fresh=args.fresh,
    )
    print(summary.line())
    return 0
