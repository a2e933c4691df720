"""`wmtp data prepare|info <dataset>`: build a dataset's processed split and index, or describe it."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from weighted_mtp.commands.common import add_config_arguments, resolve
from weighted_mtp.errors import DataError

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="prepare datasets and inspect their index")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    prepare = actions.add_parser(
        "prepare",
        help="write <paths.datasets>/<dataset>/processed/<split>.jsonl and its metadata index",
        description="Read the raw files under paths.raw_data/<dataset>/ and write the processed split, "
        "its problems file and its index (token lengths come from the configured model's tokenizer).",
    )
    prepare.add_argument("dataset", help="mbpp, humaneval, codecontests or rollouts")
    prepare.add_argument("--split", action="append", help="split to prepare (repeatable; default: every split)")
    prepare.add_argument("--raw", type=Path, help="raw data folder (default: paths.raw_data)")
    prepare.add_argument("--tokenizer", help="tokenizer file for token lengths (default: the model's)")
    add_config_arguments(prepare)
    prepare.set_defaults(func=run_prepare)

    info = actions.add_parser("info", help="summarise a prepared dataset from its index")
    info.add_argument("dataset")
    info.add_argument("--split", action="append", help="split to describe (default: every prepared split)")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_config_arguments(info)
    info.set_defaults(func=run_info)


def load_tokenizer(config, path: str | None) -> Any:
    """The tokenizer whose token lengths the index records: --tokenizer, else the model's own."""
    from weighted_mtp.models.loading import load_tokenizer as load_model_tokenizer

    return load_model_tokenizer(config.model.name, models_dir=config.paths.models, tokenizer=path or config.model.tokenizer)


def run_prepare(args: argparse.Namespace) -> int:
    from weighted_mtp.data.prepare import prepare_dataset
    from weighted_mtp.data.sources import get_source, raw_dir_for

    config = resolve(args).config
    raw_dir = args.raw or raw_dir_for(config.paths, args.dataset)
    source = get_source(args.dataset)
    splits = args.split or list(source.available_splits(raw_dir))
    if not splits:
        raise DataError(f"{raw_dir / args.dataset}: no splits found for dataset {args.dataset!r}")
    for split in splits:
        source.check_split(raw_dir, split)
    tokenizer = load_tokenizer(config, args.tokenizer)
    for split in splits:
        index = prepare_dataset(
            args.dataset, raw_dir=raw_dir, datasets_dir=config.paths.datasets, split=split, tokenizer=tokenizer
        )
        summary = index.summary()
        print(
            f"{args.dataset}/{split}: {summary['problems']} problems, {summary['solutions']} solutions "
            f"({summary['correct']} correct, {summary['incorrect']} incorrect) -> {index.paths.jsonl}"
        )
    return 0


def run_info(args: argparse.Namespace) -> int:
    from weighted_mtp.data.index import SplitIndex
    from weighted_mtp.data.prepare import processed_dir
    from weighted_mtp.data.sources import get_source

    config = resolve(args).config
    get_source(args.dataset)  # an unknown name is an error that lists the known ones
    directory = processed_dir(config.paths.datasets, args.dataset)
    splits = args.split or sorted(p.name.removesuffix("_metadata.json") for p in directory.glob("*_metadata.json"))
    if not splits:
        raise DataError(f"{directory}: dataset {args.dataset!r} is not prepared; run `wmtp data prepare {args.dataset}`")
    summaries = [SplitIndex(directory, split).summary() for split in splits]
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.dataset} ({directory})")
    table.add_column("split", no_wrap=True)
    for column in ("problems", "solutions", "correct", "incorrect", "pairable", "tokens mean/max"):
        table.add_column(column, justify="right")
    for s in summaries:
        table.add_row(
            s["split"], str(s["problems"]), str(s["solutions"]), str(s["correct"]), str(s["incorrect"]),
            str(s["problems_with_pairs"]), f"{s['response_tokens_mean']:.0f}/{s['response_tokens_max']}",
        )
    console = Console()
    console.print(table)
    for s in summaries:
        histogram = ", ".join(f"{d}: {c}" for d, c in s["difficulty_histogram"].items())
        console.print(f"{s['split']}: problems by difficulty {{{histogram}}}", markup=False)
    return 0
