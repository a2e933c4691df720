"""Score completions on a benchmark: run every sample in the sandbox, compute pass@k, write a report.

The JSON report holds the summary (pass@k with its interval, exact match, error classes) and
every sample with its program, verdict and error class, so a result can be audited sample by sample.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from weighted_mtp.data.sources import Problem
from weighted_mtp.errors import ConfigError
from weighted_mtp.eval.benchmarks import Benchmark
from weighted_mtp.eval.passk import PassAtK, pass_at_k_summary
from weighted_mtp.eval.sandbox import Sandbox
from weighted_mtp.io import atomic_write_json


@dataclass
class SampleResult:
    task_id: str
    sample_index: int
    completion: str
    program: str
    status: str
    error_class: str | None
    error_message: str
    duration_s: float
    exact_match: bool | None = None
    failed_case: int | None = None  # stdin/stdout tests: the first failing case, counted public, private, generated


@dataclass
class EvalReport:
    benchmark: str
    split: str
    ks: list[int]
    pass_at_k: dict[int, PassAtK]
    samples: list[SampleResult]
    exact_match: float | None
    wall_s: float
    metadata: dict = field(default_factory=dict)

    @property
    def n_problems(self) -> int:
        return len({s.task_id for s in self.samples})

    @property
    def n_passed(self) -> int:
        return sum(s.status == "passed" for s in self.samples)

    @property
    def error_counts(self) -> dict[str, int]:
        return dict(Counter(s.error_class or s.status for s in self.samples if s.status != "passed").most_common())

    def metrics(self) -> dict[str, float]:
        """Flat metrics for a tracker."""
        out = {f"{self.benchmark}/pass@{k}": p.mean for k, p in self.pass_at_k.items()}
        out.update({f"{self.benchmark}/pass@{k}_ci_low": p.ci_low for k, p in self.pass_at_k.items()})
        out.update({f"{self.benchmark}/pass@{k}_ci_high": p.ci_high for k, p in self.pass_at_k.items()})
        if self.exact_match is not None:
            out[f"{self.benchmark}/exact_match"] = self.exact_match
        return out

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "split": self.split,
            "n_problems": self.n_problems,
            "n_samples": len(self.samples),
            "n_passed": self.n_passed,
            "pass_at_k": {str(k): p.to_dict() for k, p in self.pass_at_k.items()},
            "exact_match": self.exact_match,
            "error_counts": self.error_counts,
            "wall_s": self.wall_s,
            "metadata": self.metadata,
            "per_problem": self._per_problem(),
            "samples": [asdict(s) for s in self.samples],
        }

    def _per_problem(self) -> list[dict]:
        ids = list(dict.fromkeys(s.task_id for s in self.samples))
        rows = {task_id: {"task_id": task_id, "n": 0, "c": 0} for task_id in ids}
        for s in self.samples:
            rows[s.task_id]["n"] += 1
            rows[s.task_id]["c"] += s.status == "passed"
        for k, p in self.pass_at_k.items():
            for task_id, value in zip(ids, p.per_problem):
                rows[task_id][f"pass@{k}"] = value
        return list(rows.values())

    def write(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    def summary_table(self):
        from rich.table import Table

        table = Table(title=f"{self.benchmark} ({self.split}): {self.n_problems} problems, {len(self.samples)} samples")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_column("95% CI", justify="right")
        for k, p in self.pass_at_k.items():
            table.add_row(f"pass@{k}", f"{100 * p.mean:.2f}%", f"[{100 * p.ci_low:.2f}, {100 * p.ci_high:.2f}]")
        if self.exact_match is not None:
            table.add_row("exact match", f"{100 * self.exact_match:.2f}%", "")
        table.add_row("samples passed", f"{self.n_passed}/{len(self.samples)}", "")
        for error, count in self.error_counts.items():
            table.add_row(f"  {error}", str(count), "")
        table.add_row("wall time", f"{self.wall_s:.1f} s", "")
        return table


def evaluate_completions(
    benchmark: Benchmark,
    problems: Sequence[Problem],
    completions: Mapping[str, Sequence[str]],
    sandbox: Sandbox,
    ks: Sequence[int] = (1,),
    *,
    split: str = "test",
    are_programs: bool = False,
    on_result: Callable[[int], None] | None = None,
    metadata: dict | None = None,
) -> EvalReport:
    """Run every completion of every problem; `completions` maps a benchmark task id to its samples.

    With `are_programs`, completions are taken as the program itself (the gold self-check);
    otherwise the program is extracted from each completion first.
    """
    start = time.monotonic()
    problem_of = {benchmark.task_id(p): p for p in problems}
    unknown = [task_id for task_id in completions if task_id not in problem_of]
    if unknown:
        raise ConfigError(f"{len(unknown)} task ids are not in {benchmark.name}: {', '.join(map(str, unknown[:5]))}")
    jobs: list[tuple[str, int, str, str]] = []
    for task_id, samples in completions.items():
        problem = problem_of[task_id]
        for index, completion in enumerate(samples):
            program = completion if are_programs else benchmark.extract(problem, completion)
            jobs.append((task_id, index, completion, program))
    if not jobs:
        raise ConfigError(f"no completions to evaluate on {benchmark.name}")
    results = sandbox.run_many(
        [benchmark.program(problem_of[task_id], program) for task_id, _, _, program in jobs],
        on_result=(lambda i, r: on_result(i)) if on_result else None,
    )
    samples = [
        SampleResult(
            task_id, index, completion, program, result.status, result.error_class, result.error_message,
            result.duration_s, benchmark.exact_match(problem_of[task_id], program), result.extra.get("failed_case"),
        )
        for (task_id, index, completion, program), result in zip(jobs, results)
    ]
    n_per_task = Counter(s.task_id for s in samples)
    c_per_task = Counter(s.task_id for s in samples if s.status == "passed")
    task_ids = list(n_per_task)
    usable_ks = sorted(k for k in set(ks) if k <= min(n_per_task.values()))
    if not usable_ks:
        raise ConfigError(f"pass@k needs k <= samples per problem ({min(n_per_task.values())}); asked for {list(ks)}")
    pass_at = {
        k: pass_at_k_summary([n_per_task[t] for t in task_ids], [c_per_task[t] for t in task_ids], k)
        for k in usable_ks
    }
    matches = [s.exact_match for s in samples if s.exact_match is not None]
    metadata = dict(metadata or {})
    if set(ks) - set(usable_ks):
        metadata["skipped_k"] = sorted(set(ks) - set(usable_ks))
    return EvalReport(
        benchmark.name, split, usable_ks, pass_at, samples,
        sum(matches) / len(matches) if matches else None, time.monotonic() - start, metadata,
    )
