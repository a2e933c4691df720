"""Verifiable rollouts: sample solutions from a model, run each against its tests, label it.

The output is the raw form of the `rollouts` dataset (`weighted_mtp.data.sources.RolloutSource`),
by default `<paths.rollouts>/<split>.jsonl`, one sample a line:

    problem_id, instruction, input, output, is_correct, difficulty, tests   (what the data layer reads)
    source, sample, program, status, error_class                           (for inspection and reports)

`source` is "model" for the model's own samples and "gold" for the benchmark's reference solution,
which is added to every problem (rendered as the response the template expects) so that each problem
with a failing model sample gives the critic a (correct, incorrect) pair. Gold solutions are run
like any sample: one that fails its tests is labelled incorrect.

Prompts are the benchmark's prompts under the training template, encoded with BOS exactly as the
training loader encodes them (`prompt_adds_bos`), so a rollout is trained on under the token ids it
was sampled from; `output` is the completion as sampled (cut at the template's stop sequences), while
the label comes from the program extracted from it.

Rollouts are written in pieces: every batch of problems is generated, executed and appended to
`<out>.partial` (with its settings in `<out>.partial.json`) before the next starts. A killed rollout
run again with the same settings continues after the last finished problem; the finished file
replaces `<out>` atomically at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from weighted_mtp.config.schema import Config
from weighted_mtp.data.sources import Problem
from weighted_mtp.errors import ConfigError, DataError
from weighted_mtp.eval.benchmarks import Benchmark, get_benchmark
from weighted_mtp.eval.report import SampleResult, evaluate_completions
from weighted_mtp.eval.sampling import ROWS_PER_PIECE, SamplingSettings, sample_problems
from weighted_mtp.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class RolloutSettings:
    """Everything that decides which samples a rollout produces; a resumed rollout must match it."""

    model: str
    benchmark: str
    split: str
    sampling: SamplingSettings
    include_gold: bool = True
    limit: int | None = None
    dtype: str = "float32"  # the generation dtype: bf16 and fp32 sample different tokens

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        model: str | None = None,
        benchmark: str = "mbpp",
        split: str = "train",
        n_samples: int | None = None,
        limit: int | None = None,
        include_gold: bool = True,
    ) -> RolloutSettings:
        section = config.rollout
        sampling = SamplingSettings(
            n_samples=section.n_samples if n_samples is None else n_samples,
            temperature=section.temperature,
            top_p=section.top_p,
            max_new_tokens=section.max_new_tokens,
            template=config.data.prompt_template,
            seed=config.seed,
        )
        from weighted_mtp.models.loading import generation_dtype, resolve_device

        dtype = generation_dtype(config, resolve_device(config.device))
        return cls(str(model or config.model.name), benchmark, split, sampling, include_gold, limit, dtype)

    def same_as(self, saved: Any) -> bool:
        """Whether settings read back from JSON are these (a rollout may resume or be reused)."""
        return saved == json.loads(json.dumps(asdict(self)))


@dataclass
class RolloutSummary:
    """What a rollout produced, in the terms that decide whether the critic can learn from it."""

    path: Path
    n_problems: int
    n_samples: int
    correct: dict[str, int]  # by source: model, gold
    incorrect: dict[str, int]
    problems_with_correct_model_sample: int
    problems_usable_as_pairs: int  # a correct and an incorrect sample of the same problem
    generated_tokens: int = 0
    generation_s: float = 0.0
    execution_s: float = 0.0
    resumed_problems: int = 0
    dtype: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.generation_s if self.generation_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["tokens_per_s"] = self.tokens_per_s
        return out

    def metrics(self) -> dict[str, float]:
        """Flat numbers for a tracker."""
        out = {
            "rollout/samples": self.n_samples,
            "rollout/problems": self.n_problems,
            "rollout/problems_with_correct_model_sample": self.problems_with_correct_model_sample,
            "rollout/problems_usable_as_pairs": self.problems_usable_as_pairs,
            "rollout/tokens_per_s": self.tokens_per_s,
        }
        for source in sorted({*self.correct, *self.incorrect}):
            out[f"rollout/{source}_correct"] = self.correct.get(source, 0)
            out[f"rollout/{source}_incorrect"] = self.incorrect.get(source, 0)
        return out

    def line(self) -> str:
        by_source = ", ".join(
            f"{source} {self.correct.get(source, 0)} correct / {self.incorrect.get(source, 0)} incorrect"
            for source in sorted({*self.correct, *self.incorrect})
        )
        return (
            f"{self.path}: {self.n_samples} samples of {self.n_problems} problems ({by_source}); "
            f"{self.problems_with_correct_model_sample} problems with a correct model sample, "
            f"{self.problems_usable_as_pairs} usable as pairs"
        )


# ----------------------------------------------------------------------------- samples


def gold_response(problem: Problem, benchmark: Benchmark, template: str) -> str | None:
    """The benchmark's reference solution as a response under `template`: a fenced block for chat
    (how chat models answer, and what `extract` takes back out), the bare program otherwise."""
    program = benchmark.reference(problem)
    if program is None:
        return None
    return f"```python\n{program}\n```" if template == "chat" else program


def rollout_records(
    benchmark: Benchmark, problems: list[Problem], results: list[SampleResult], n_model: int
) -> list[dict]:
    """One JSON object per sample, in the `rollouts` source's schema; sample n_model of a problem is gold."""
    problem_of = {benchmark.task_id(p): p for p in problems}
    records = []
    for result in results:
        problem = problem_of[result.task_id]
        is_gold = result.sample_index >= n_model
        records.append(
            {
                "problem_id": problem.problem_id,
                "instruction": problem.instruction,
                "input": problem.input,
                "output": result.completion,
                "is_correct": result.status == "passed",
                "difficulty": problem.difficulty,
                "tests": problem.tests,
                "source": "gold" if is_gold else "model",
                "sample": 0 if is_gold else result.sample_index,
                "program": result.program,
                "status": result.status,
                "error_class": result.error_class,
            }
        )
    return records


def summarize(path: Path, records: list[dict]) -> RolloutSummary:
    outcomes: dict[str, set[bool]] = {}
    model_correct: set[str] = set()
    correct: Counter[str] = Counter()
    incorrect: Counter[str] = Counter()
    for record in records:
        source = record.get("source", "model")
        outcomes.setdefault(record["problem_id"], set()).add(bool(record["is_correct"]))
        (correct if record["is_correct"] else incorrect)[source] += 1
        if record["is_correct"] and source == "model":
            model_correct.add(record["problem_id"])
    return RolloutSummary(
        path=path,
        n_problems=len(outcomes),
        n_samples=len(records),
        correct=dict(correct),
        incorrect=dict(incorrect),
        problems_with_correct_model_sample=len(model_correct),
        problems_usable_as_pairs=sum(len(seen) == 2 for seen in outcomes.values()),
    )


# ----------------------------------------------------------------------------- resumable writing


class PartialRollout:
    """`<out>.partial`: finished problems' records, appended piece by piece and fsynced.

    `<out>.partial.json` holds the settings it was started with; resuming with other settings is an
    error rather than a file that mixes two rollouts.
    """

    def __init__(self, out: Path, settings: RolloutSettings) -> None:
        self.out = out
        self.path = out.with_name(out.name + ".partial")
        self.settings_path = out.with_name(out.name + ".partial.json")
        self.settings = settings

    def load(self, samples_per_problem: dict[str, int]) -> list[dict]:
        """Records of the problems finished so far; a piece cut short by a kill is dropped."""
        if not self.path.exists():
            atomic_write_json(self.settings_path, asdict(self.settings))
            self.path.write_text("", encoding="utf-8")
            return []
        try:
            saved = json.loads(self.settings_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            saved = None
        if not self.settings.same_as(saved):
            raise ConfigError(
                f"{self.path}: an unfinished rollout with other settings ({self.settings_path}); run it "
                "again with the same settings to finish it, or pass --fresh to start over"
            )
        records, whole = [], True
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    if not line.endswith("\n"):
                        raise ValueError("no line end")
                    records.append(json.loads(line))
                except ValueError:  # the last write was cut short by the kill
                    whole = False
                    break
        counts = Counter(r["problem_id"] for r in records)
        complete = {pid for pid, n in counts.items() if n == samples_per_problem.get(pid)}
        kept = [r for r in records if r["problem_id"] in complete]
        if not whole or len(kept) != len(records):
            with atomic_write(self.path) as handle:
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        return kept

    def append(self, records: list[dict]) -> None:
        """One write for a piece's records, flushed to disk before the next piece starts."""
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())

    def finish(self, records: list[dict]) -> None:
        """The whole rollout replaces `out` in one rename; the partial files go."""
        with atomic_write(self.out) as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self.path.unlink(missing_ok=True)
        self.settings_path.unlink(missing_ok=True)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.settings_path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the run


def default_rollout_path(config: Config, split: str) -> Path:
    """Where the `rollouts` dataset reads a split from."""
    return Path(config.paths.rollouts) / f"{split}.jsonl"


def finished_summary(summary_path: Path, settings: RolloutSettings) -> RolloutSummary | None:
    """The summary a finished rollout wrote beside itself, if it was made with these settings."""
    try:
        saved = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not settings.same_as(saved.get("settings")):
        return None
    summary = RolloutSummary(**{f.name: saved[f.name] for f in fields(RolloutSummary) if f.name in saved})
    summary.path = Path(summary.path)
    return summary


def run_rollouts(
    config: Config,
    *,
    model_name: str | None = None,
    benchmark_name: str = "mbpp",
    split: str = "train",
    n_samples: int | None = None,
    limit: int | None = None,
    out: Path | None = None,
    workers: int | None = None,
    include_gold: bool = True,
    fresh: bool = False,
    rows_per_piece: int = ROWS_PER_PIECE,
    progress: Any = None,
) -> RolloutSummary:
    """Sample, execute, label and write, resuming an unfinished rollout with the same settings.

    When written where the `rollouts` dataset reads, the split is prepared right away. `progress`
    (a `weighted_mtp.eval.progress.GenerationProgress`) is told of every finished piece.
    """
    from weighted_mtp.eval.progress import GenerationProgress
    from weighted_mtp.eval.sandbox import Limits, Sandbox
    from weighted_mtp.models.loading import load_model_for_generation

    benchmark = get_benchmark(benchmark_name)
    problems = benchmark.load(config.paths.raw_data, split, limit)
    if not problems:
        raise DataError(f"{benchmark_name} {split}: no problems under {config.paths.raw_data}")
    settings = RolloutSettings.from_config(
        config, model=model_name, benchmark=benchmark_name, split=split, n_samples=n_samples, limit=limit,
        include_gold=include_gold,
    )
    path = Path(out) if out is not None else default_rollout_path(config, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = PartialRollout(path, settings)
    summary_path = path.with_name(path.stem + ".summary.json")
    if fresh:
        partial.discard()
    elif path.is_file() and not partial.path.exists() and (finished := finished_summary(summary_path, settings)):
        log.info("%s: finished with the same settings, not sampled again (--fresh samples it anew)", path)
        return finished
    has_gold = {p.problem_id: include_gold and benchmark.reference(p) is not None for p in problems}
    expected = {pid: settings.sampling.n_samples + gold for pid, gold in has_gold.items()}
    records = partial.load(expected)
    done = {r["problem_id"] for r in records}
    todo = [(key, p) for key, p in enumerate(problems) if p.problem_id not in done]
    if done:
        log.info("resuming %s: %d of %d problems done", partial.path, len(done), len(problems))

    model, tokenizer, device, dtype = load_model_for_generation(
        config, settings.model, tokenizer=config.model.tokenizer if model_name is None else None
    )
    log.info("rollout generation on %s in %s", device, dtype)
    progress = progress or GenerationProgress(config.logging.progress_bar, f"rollout {benchmark_name} {split}")
    per_piece = max(1, rows_per_piece // settings.sampling.n_samples)
    generated_tokens, generation_s, execution_s = 0, 0.0, 0.0
    workers = config.evaluation.workers if workers is None else workers
    hidden = (config.paths.raw_data, config.paths.storage)
    with Sandbox(workers, Limits(timeout_s=config.rollout.timeout_s), hidden=hidden) as sandbox, progress:
        progress.start(total=len(problems), done=len(done))
        for start in range(0, len(todo), per_piece):
            piece = todo[start : start + per_piece]
            keys, piece_problems = [k for k, _ in piece], [p for _, p in piece]
            began = time.monotonic()
            completions, n_tokens = sample_problems(model, tokenizer, benchmark, piece_problems, keys, settings.sampling)
            generation_s += time.monotonic() - began
            generated_tokens += n_tokens
            for problem in piece_problems:
                gold = gold_response(problem, benchmark, settings.sampling.template) if has_gold[problem.problem_id] else None
                if gold is not None:
                    completions[benchmark.task_id(problem)].append(gold)
            began = time.monotonic()
            report = evaluate_completions(benchmark, piece_problems, completions, sandbox, split=split)
            execution_s += time.monotonic() - began
            piece_records = rollout_records(benchmark, piece_problems, report.samples, settings.sampling.n_samples)
            partial.append(piece_records)
            records.extend(piece_records)
            progress.advance(len(piece_problems), n_tokens)

    order = {p.problem_id: i for i, p in enumerate(problems)}
    records.sort(key=lambda r: (order[r["problem_id"]], r["source"] == "gold", r["sample"]))
    partial.finish(records)
    summary = summarize(path, records)
    summary.generated_tokens, summary.generation_s, summary.execution_s = generated_tokens, generation_s, execution_s
    summary.resumed_problems, summary.dtype = len(done), dtype
    atomic_write_json(summary_path, {**summary.to_dict(), "settings": asdict(settings)})
    log.info("%s", summary.line())
    if summary.problems_usable_as_pairs == 0:
        log.warning(
            "no problem has both a correct and an incorrect sample: the critic has no pairs; raise "
            "rollout.n_samples or rollout.temperature, keep the gold solutions (no --no-gold), or sample more problems"
        )
    _track(config, settings, summary)
    if path.resolve() == default_rollout_path(config, split).resolve():
        from weighted_mtp.data.prepare import prepare_dataset

        # re-prepare now: a prepared split is otherwise reused as is, and these are new samples
        prepare_dataset(
            "rollouts",
            raw_dir=config.paths.rollouts,
            datasets_dir=config.paths.datasets,
            split=split,
            tokenizer=tokenizer,
        )
    return summary


def _track(config: Config, settings: RolloutSettings, summary: RolloutSummary) -> None:
    """One tracking run per rollout: its settings as parameters, its counts as metrics."""
    from weighted_mtp.tracking import build_tracker

    tracker = build_tracker(config, run_name=f"rollout-{settings.benchmark}-{settings.split}")
    tracker.start()
    try:
        params = {key: value for key, value in asdict(settings).items() if key != "sampling"}
        params.update(asdict(settings.sampling))
        tracker.log_params({f"rollout.{key}": value for key, value in params.items()})
        tracker.log_metrics(summary.metrics(), step=0)
        tracker.log_artifact(summary.path.with_name(summary.path.stem + ".summary.json"), artifact_path="rollout")
    except BaseException:
        tracker.end(status="FAILED")
        raise
    tracker.end()
