"""Sampling a benchmark's problems: one prompt path for evaluation and rollouts.

A problem is prompted with `benchmark.prompt` under the training template and encoded with BOS
exactly as the training loader encodes it (`prompt_adds_bos`); its samples are seeded by the
problem's place in the whole split, so generating a split in pieces (for a progress display, or to
resume a rollout) gives the same samples as generating it at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from weighted_mtp.data.sources import Problem
from weighted_mtp.data.templates import prompt_adds_bos
from weighted_mtp.eval.benchmarks import Benchmark

log = logging.getLogger(__name__)

ROWS_PER_PIECE = 32  # one generation batch: 8 problems of 4 samples


@dataclass(frozen=True)
class SamplingSettings:
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    template: str = "alpaca"
    seed: int = 0
    speculative: bool = False

    @property
    def distinct_rows(self) -> int:
        """Rows generated per problem: greedy decoding repeats one row."""
        return 1 if self.temperature == 0 else self.n_samples


def sample_problems(
    model: Any,
    tokenizer: Any,
    benchmark: Benchmark,
    problems: Sequence[Problem],
    keys: Sequence[int],
    settings: SamplingSettings,
) -> tuple[dict[str, list[str]], int]:
    """`n_samples` completions per problem keyed by task id, and the number of tokens generated.

    `keys` are the problems' places in the whole split (they seed the samples).
    """
    from weighted_mtp.eval.generation import generate

    prompts = [benchmark.prompt(p, settings.template, tokenizer) for p in problems]
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
        add_bos=prompt_adds_bos(settings.template),
        speculative=settings.speculative,
        prompt_keys=list(keys),
    )
    completions = {benchmark.task_id(p): [c.text.rstrip() for c in row] for p, row in zip(problems, samples)}
    distinct = settings.distinct_rows
    return completions, sum(c.n_tokens for row in samples for c in row[:distinct])


def sample_split(
    model: Any,
    tokenizer: Any,
    benchmark: Benchmark,
    problems: Sequence[Problem],
    settings: SamplingSettings,
    progress: Any,
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Every problem's completions, a piece at a time so that `progress` moves; and speed figures.

    Pieces hold problems of similar prompt length (a batch is left-padded to its longest prompt: one
    3,700-token MBPP prompt among short ones made its batch cost 19 times that length). Samples are
    seeded by each problem's place in `problems`, so the grouping does not change them.
    """
    per_piece = max(1, ROWS_PER_PIECE // settings.distinct_rows)
    lengths = [len(benchmark.prompt(p, settings.template, tokenizer)) for p in problems]
    order = sorted(range(len(problems)), key=lambda i: -lengths[i])
    completions: dict[str, list[str]] = {}
    n_tokens, began = 0, time.monotonic()
    with progress:
        progress.start(total=len(problems))
        for start in range(0, len(order), per_piece):
            keys = order[start : start + per_piece]
            piece = [problems[i] for i in keys]
            done, tokens = sample_problems(model, tokenizer, benchmark, piece, keys, settings)
            completions.update(done)
            n_tokens += tokens
            progress.advance(len(piece), tokens)
    elapsed = time.monotonic() - began
    completions = {benchmark.task_id(p): completions[benchmark.task_id(p)] for p in problems}  # split order
    return completions, {
        "generation_s": elapsed, "generated_tokens": n_tokens, "tokens_per_s": n_tokens / max(elapsed, 1e-9),
    }


def evaluate_model(
    config: Any,
    model_name: str,
    *,
    benchmark_name: str,
    split: str,
    limit: int | None,
    settings: SamplingSettings,
    ks: Sequence[int] = (1,),
    workers: int | None = None,
    timeout_s: float | None = None,
    progress_mode: str | None = None,
) -> Any:
    """pass@k of a model on a benchmark split: sample every problem (with a progress display), run
    every sample in the sandbox, and return the `EvalReport` with the generation figures in its
    metadata (dtype, device, tokens/s)."""
    from weighted_mtp.eval.benchmarks import get_benchmark
    from weighted_mtp.eval.progress import GenerationProgress
    from weighted_mtp.eval.report import evaluate_completions
    from weighted_mtp.eval.sandbox import Limits, Sandbox
    from weighted_mtp.models.loading import load_model_for_generation

    benchmark = get_benchmark(benchmark_name)
    problems = benchmark.load(config.paths.raw_data, split, limit)
    model, tokenizer, device, dtype = load_model_for_generation(config, model_name)
    log.info("sampling %s %s on %s in %s", benchmark_name, split, device, dtype)
    progress = GenerationProgress(progress_mode or config.logging.progress_bar, f"sampling {benchmark_name} {split}")
    completions, speed = sample_split(model, tokenizer, benchmark, problems, settings, progress)
    del model
    metadata = {
        "source": "model", "model": str(model_name), "device": str(device), "dtype": dtype,
        **{key: value for key, value in vars(settings).items()}, **speed,
    }
    workers = config.evaluation.workers if workers is None else workers
    timeout_s = config.evaluation.timeout_s if timeout_s is None else timeout_s
    with Sandbox(workers, Limits(timeout_s=timeout_s), hidden=(config.paths.raw_data, config.paths.storage)) as sandbox:
        return evaluate_completions(benchmark, problems, completions, sandbox, ks, split=split, metadata=metadata)
