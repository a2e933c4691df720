"""Verifiable rollouts: sample solutions from a model, run each against its tests, label it.

The output is the raw form of the `rollouts` dataset (`weighted_mtp.data.sources.RolloutSource`),
by default `<paths.rollouts>/<split>.jsonl`, one sample a line:

    problem_id, instruction, input, output, is_correct, difficulty, tests   (what the data layer reads)
    sample, program, status, error_class, finish_reason                     (for inspection)

Prompts are rendered with the training template (`data.prompt_template`), so a rollout is later
trained on under exactly the prompt it was sampled from; `output` is the completion as sampled
(cut at the benchmark's stop sequences), while the label comes from the program extracted from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from weighted_mtp.config.schema import Config
from weighted_mtp.data.sources import Problem
from weighted_mtp.data.templates import render
from weighted_mtp.errors import DataError
from weighted_mtp.eval.benchmarks import Benchmark, get_benchmark
from weighted_mtp.eval.report import SampleResult, evaluate_completions
from weighted_mtp.io import atomic_write

log = logging.getLogger(__name__)


@dataclass
class RolloutSettings:
    n_samples: int = 8
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256
    template: str = "alpaca"
    seed: int = 0

    @classmethod
    def from_config(cls, config: Config, n_samples: int | None = None) -> RolloutSettings:
        section = config.rollout
        return cls(
            n_samples=n_samples or section.n_samples,
            temperature=section.temperature,
            top_p=section.top_p,
            max_new_tokens=section.max_new_tokens,
            template=config.data.prompt_template,
            seed=config.seed,
        )


@dataclass
class RolloutSummary:
    path: Path
    n_problems: int
    n_samples: int
    n_correct: int
    problems_with_both: int  # problems with a correct and an incorrect sample: pairs for the critic


def rollout_prompt(problem: Problem, template: str, tokenizer: Any) -> str:
    """The training prompt of a problem (the prompt part of the template, without a response)."""
    prompt, _ = render(
        template, {"instruction": problem.instruction, "input": problem.input, "output": ""}, tokenizer
    )
    return prompt


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: list[Problem],
    benchmark: Benchmark,
    settings: RolloutSettings,
) -> dict[str, list[str]]:
    """`settings.n_samples` completions per problem, keyed by the benchmark's task id."""
    from weighted_mtp.eval.generation import generate

    model.eval()
    prompts = [rollout_prompt(p, settings.template, tokenizer) for p in problems]
    samples = generate(
        model,
        tokenizer,
        prompts,
        n_samples=settings.n_samples,
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=settings.max_new_tokens,
        stop=benchmark.stop_sequences(settings.template),
        seed=settings.seed,
        add_bos=settings.template != "chat",  # as the training loader encodes prompts
    )
    return {benchmark.task_id(p): [c.text.rstrip() for c in row] for p, row in zip(problems, samples)}


def rollout_records(benchmark: Benchmark, problems: list[Problem], results: list[SampleResult]) -> list[dict]:
    """One JSON object per sample, in the `rollouts` source's schema."""
    problem_of = {benchmark.task_id(p): p for p in problems}
    records = []
    for result in results:
        problem = problem_of[result.task_id]
        records.append(
            {
                "problem_id": problem.problem_id,
                "instruction": problem.instruction,
                "input": problem.input,
                "output": result.completion,
                "is_correct": result.status == "passed",
                "difficulty": problem.difficulty,
                "tests": problem.tests,
                "sample": result.sample_index,
                "program": result.program,
                "status": result.status,
                "error_class": result.error_class,
            }
        )
    return records


def write_rollouts(path: Path, records: list[dict]) -> Path:
    """The JSONL, written under a temporary name and renamed: never half a file."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def summarize(path: Path, records: list[dict]) -> RolloutSummary:
    outcomes: dict[str, set[bool]] = {}
    for record in records:
        outcomes.setdefault(record["problem_id"], set()).add(record["is_correct"])
    return RolloutSummary(
        path=path,
        n_problems=len(outcomes),
        n_samples=len(records),
        n_correct=sum(r["is_correct"] for r in records),
        problems_with_both=sum(len(seen) == 2 for seen in outcomes.values()),
    )


def default_rollout_path(config: Config, split: str) -> Path:
    """Where the `rollouts` dataset reads a split from."""
    return Path(config.paths.rollouts) / f"{split}.jsonl"


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
) -> RolloutSummary:
    """Sample, execute, label and write; when written where the `rollouts` dataset reads, prepare it."""
    from weighted_mtp.eval.sandbox import Limits, Sandbox
    from weighted_mtp.models.loading import DTYPES, load_model, resolve_device

    benchmark = get_benchmark(benchmark_name)
    problems = benchmark.load(config.paths.raw_data, split, limit)
    if not problems:
        raise DataError(f"{benchmark_name} {split}: no problems under {config.paths.raw_data}")
    settings = RolloutSettings.from_config(config, n_samples)
    model, tokenizer = load_model(
        model_name or config.model.name,
        models_dir=config.paths.models,
        device=resolve_device(config.device),
        dtype=DTYPES[config.dtype],
        seed=config.seed,
        tokenizer=config.model.tokenizer if model_name is None else None,
    )
    completions = sample_completions(model, tokenizer, problems, benchmark, settings)
    limits = Limits(timeout_s=config.rollout.timeout_s)
    with Sandbox(workers or config.evaluation.workers, limits) as sandbox:
        report = evaluate_completions(benchmark, problems, completions, sandbox, split=split)
    records = rollout_records(benchmark, problems, report.samples)
    path = Path(out) if out is not None else default_rollout_path(config, split)
    write_rollouts(path, records)
    summary = summarize(path, records)
    log.info(
        "%d rollouts of %d problems: %d correct; %d problems have both a correct and an incorrect sample",
        summary.n_samples,
        summary.n_problems,
        summary.n_correct,
        summary.problems_with_both,
    )
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
