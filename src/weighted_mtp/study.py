"""`wmtp study`: the study behind docs/RESULTS.md, as resumable cells.

Every arm starts from the same base (a scale's model with its MTP heads added), trains on the same
data (the split's gold solutions plus the same labelled rollouts) with the same seed, and is
evaluated the same way. The work is cut into cells (a rollout, one arm's training, one evaluation of
one arm); each cell writes `<results>/<name>.json` when it finishes (the command keeps them in
`docs/results/<scale>/`, committed beside docs/RESULTS.md; runs and rollouts stay under `<root>`), so a study killed at any point
resumes at its next unfinished cell (training cells also resume from their last checkpoint, rollout
cells from their last finished problem). `wmtp study report` turns the cells into docs/RESULTS.md.

  wmtp study run --scale cpu [--only eval-] [--max-hours 2.5]
  wmtp study status --scale cpu
  wmtp study report --scale cpu          # writes docs/RESULTS.md from the finished cells

Every arm that trains the language model trains the same parts the same way (`StudyScale.lm_parts`).
Arms: `base` (untouched), `ntp` (n = 1 fine-tuning, a control), `mtp` (n heads, uniform), `verifiable`
(Verifiable Critic WMTP from a critic trained on the rollouts), `rho1_tokenskip` and `rho1_weighted`
(Rho-1 with the `ntp` arm as the reference: the `ref_tuning` recipe at this scale trains exactly the
`ntp` configuration, one head on the same correct solutions, so the study trains it once).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from weighted_mtp.config import load_config
from weighted_mtp.config.schema import Config
from weighted_mtp.errors import ConfigError
from weighted_mtp.eval.passk import exact_mcnemar_p
from weighted_mtp.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyScale:
    """What one scale of the study runs: the model, the data and evaluation budget, the machine."""

    preset: str
    use_micro_model: bool
    n_heads: int
    rollout_samples: int  # model samples per MBPP train / validation problem (plus gold)
    rollout_train_limit: int | None  # None: the whole split
    rollout_val_limit: int | None
    max_new_tokens: int
    epochs: int
    max_steps: int | None  # every training run, so every arm gets the same compute; None: the epochs decide
    lr: float  # every arm that trains the language model (the critic keeps its recipe's)
    eval_mbpp_limit: int | None  # greedy MBPP test problems (None: all 500)
    eval_humaneval_limit: int | None  # greedy HumanEval problems (None: all 164)
    sampled_subset: int  # the first N MBPP test problems for pass@1/pass@10 at T = 0.2, top-p 0.95
    sampled_n: int
    spec_prompts: int  # the first N MBPP test prompts for self-speculative decoding, batch 1
    save_every: int | None = 20
    lm_parts: tuple[str, ...] = ()  # what trains in every arm that trains the language model (config overrides)


SCALES = {
    "cpu": StudyScale(
        preset="cpu-smollm2", use_micro_model=False, n_heads=4, rollout_samples=4, rollout_train_limit=None,
        rollout_val_limit=None, max_new_tokens=128, epochs=1, max_steps=120, lr=1e-4, eval_mbpp_limit=None,
        eval_humaneval_limit=None, sampled_subset=50, sampled_n=10, spec_prompts=20,
        # LoRA on the trunk, the head blocks full rank, the (tied) unembedding frozen, and the heads alone
        # for the first 30 steps: with LoRA heads copied from head 1, the far heads' errors pulled the shared
        # trunk and head 1 collapsed (docs/results/cpu/NOTES.md)
        lm_parts=("training.lora.enabled=false", "training.freeze.trunk=lora", "training.freeze.heads=train",
                  "training.freeze.unembedding=frozen", "training.freeze.trunk_steps=30"),
    ),
    "smoke": StudyScale(
        preset="local-light", use_micro_model=True, n_heads=2, rollout_samples=2, rollout_train_limit=4,
        rollout_val_limit=2, max_new_tokens=12, epochs=1, max_steps=2, lr=1e-4, eval_mbpp_limit=2,
        eval_humaneval_limit=2, sampled_subset=2, sampled_n=2, spec_prompts=2, save_every=None,
    ),
}

ARMS = ("base", "ntp", "mtp", "verifiable", "rho1_tokenskip", "rho1_weighted")
MULTI_HEAD_ARMS = ("mtp", "verifiable", "rho1_tokenskip", "rho1_weighted")  # trained heads to draft with


@dataclass(frozen=True)
class Cell:
    """One finishable piece of the study: what it is decides which of the `*_cell` functions runs it."""

    name: str
    kind: Literal["rollout", "train", "critic_report", "eval", "speculative"]
    arm: str = ""
    split: str = ""
    benchmark: str = ""
    sampled: bool = False
    needs: tuple[str, ...] = ()  # the cells whose outputs (rollouts, a trained model) this one reads


class Study:
    """One scale's cells under one root; `run` finishes the unfinished ones in order."""

    def __init__(
        self, scale: str, root: Path | None = None, *, results: Path | None = None,
        defaults: str = "configs/defaults.yaml", overrides: list[str] | None = None,
    ) -> None:
        if scale not in SCALES:
            raise ConfigError(f"--scale: unknown scale {scale!r} (known: {', '.join(SCALES)})")
        self.scale_name, self.scale = scale, SCALES[scale]
        self.defaults = defaults
        self.overrides = list(overrides or [])
        storage = load_config(defaults=defaults, overrides=self.overrides).config.paths.storage
        self.root = Path(root) if root is not None else Path(storage) / "study" / scale
        self.cells_dir = Path(results) if results is not None else self.root / "cells"

    # ---- configuration

    def config(self, recipe: str | None, *extra: str) -> Config:
        """A recipe's config at this scale, its paths under the study root; user overrides win."""
        scale, root = self.scale, self.root
        paths = [
            f"paths.runs={root / 'runs'}", f"paths.rollouts={root / 'rollouts'}", f"paths.datasets={root / 'datasets'}",
        ]
        return load_config(
            defaults=self.defaults,
            recipe=recipe,
            preset=scale.preset,
            use_micro_model=scale.use_micro_model,
            overrides=[
                *paths,
                f"rollout.n_samples={scale.rollout_samples}",
                f"rollout.max_new_tokens={scale.max_new_tokens}",
                *extra,
                *self.overrides,
            ],
        ).config

    def training_config(self, arm: str) -> Config:
        scale = self.scale
        recipe, extra = {
            "ntp": ("baseline", ["model.n_future_tokens=1", "data.sampler=correct_only"]),
            "mtp": ("baseline", [f"model.n_future_tokens={scale.n_heads}", "data.sampler=correct_only"]),
            "critic": ("critic", [f"model.n_future_tokens={scale.n_heads}", "data.sampler=pairs",
                                  "training.lora.enabled=false"]),
            "verifiable": ("verifiable", [
                f"model.n_future_tokens={scale.n_heads}", "data.sampler=all",
                f"stage2.critic_checkpoint={self.root / 'runs' / 'critic' / 'final'}",
            ]),
            "rho1_tokenskip": ("rho1", [f"model.n_future_tokens={scale.n_heads}", "rho1.selection=top_k",
                                        f"rho1.reference_model={self.root / 'runs' / 'ntp' / 'final'}"]),
            "rho1_weighted": ("rho1", [f"model.n_future_tokens={scale.n_heads}", "rho1.selection=soft",
                                       f"rho1.reference_model={self.root / 'runs' / 'ntp' / 'final'}"]),
        }[arm]
        steps = [] if scale.max_steps is None else [f"training.max_steps={scale.max_steps}"]
        lr = [] if arm == "critic" else [f"training.lr={scale.lr}"]  # the critic's head keeps its recipe's
        parts = [] if arm == "critic" else list(scale.lm_parts)
        return self.config(recipe, *extra, *steps, *lr, *parts,
            f"experiment.name={arm}", "data.dataset=rollouts", "data.split=train", "data.val_split=validation",
            # validate once, at the end (held-out per-head loss and accuracy on the validation rollouts)
            f"training.epochs={scale.epochs}", "training.eval_every=1000000",
            f"training.save_every={scale.save_every if scale.save_every else 'null'}",
        )

    def model_of(self, arm: str) -> str:
        return self.config(None).model.name if arm == "base" else str(self.root / "runs" / arm / "final")

    # ---- cells

    def cells(self) -> list[Cell]:
        """In the order they run: the data, the base model's evaluations, the critic, then each arm's
        training followed by its evaluations."""
        rollouts = ("rollout-train", "rollout-validation")  # training data and held-out data

        def evaluations(arm: str) -> list[Cell]:
            model = () if arm == "base" else (f"train-{arm}",)
            return [Cell(f"eval-{arm}-mbpp-greedy", "eval", arm=arm, benchmark="mbpp", needs=model),
                    Cell(f"eval-{arm}-humaneval-greedy", "eval", arm=arm, benchmark="humaneval", needs=model),
                    Cell(f"eval-{arm}-mbpp-sampled", "eval", arm=arm, benchmark="mbpp", sampled=True, needs=model)]

        cells = [Cell("rollout-train", "rollout", split="train"),
                 Cell("rollout-validation", "rollout", split="validation"),
                 *evaluations("base"),
                 Cell("train-critic", "train", arm="critic", needs=rollouts),
                 Cell("critic-report", "critic_report", needs=("rollout-validation", "train-critic"))]
        teacher = {"verifiable": ("train-critic",), "rho1_tokenskip": ("train-ntp",), "rho1_weighted": ("train-ntp",)}
        for arm in ARMS[1:]:
            cells += [Cell(f"train-{arm}", "train", arm=arm, needs=rollouts + teacher.get(arm, ())),
                      *evaluations(arm)]
            if arm in MULTI_HEAD_ARMS:
                cells.append(Cell(f"speculative-{arm}", "speculative", arm=arm, needs=(f"train-{arm}",)))
        return cells

    def outputs_present(self, cell: Cell) -> bool:
        """Whether what later cells read from this one is on this machine: its result JSON is
        committed, but rollouts and trained models live under `root` (a fresh clone has none)."""
        if cell.kind == "rollout":
            return (self.root / "rollouts" / f"{cell.split}.jsonl").is_file()
        if cell.kind == "train":
            return (self.root / "runs" / cell.arm / "final").is_dir()
        return True

    def result_path(self, cell: str) -> Path:
        return self.cells_dir / f"{cell}.json"

    def finished(self) -> dict[str, dict]:
        out = {}
        for cell in self.cells():
            path = self.result_path(cell.name)
            if path.is_file():
                out[cell.name] = json.loads(path.read_text(encoding="utf-8"))
        return out

    def run(self, only: str | None = None, max_hours: float | None = None) -> list[str]:
        """Run the unfinished cells (those whose name contains `only`), in order; stop starting new
        ones once `max_hours` have passed. A finished cell runs again only when an unfinished one
        needs its outputs and this machine lacks them (rollouts are seeded: the same code makes the
        same samples; NOTES.md beside the results records a rebuild that did not). Returns the cells
        finished by this call, in the order they ran."""
        began = time.monotonic()
        by_name = {cell.name: cell for cell in self.cells()}
        done: list[str] = []

        def out_of_time(before: Cell) -> bool:
            if max_hours is not None and time.monotonic() - began > max_hours * 3600:
                log.info("study: %.1f h passed; stopping before %s", max_hours, before.name)
                return True
            return False

        def ready(cell: Cell) -> bool:
            """Rebuilds the missing outputs `cell` reads, deepest first; False when time ran out."""
            for name in cell.needs:
                needed = by_name[name]
                if not self.outputs_present(needed):
                    if not ready(needed) or out_of_time(needed):
                        return False
                    self.run_one(needed)
                    done.append(name)
            return True

        for cell in by_name.values():
            if (only and only not in cell.name) or self.result_path(cell.name).is_file():
                continue
            if not ready(cell) or out_of_time(cell):
                break
            self.run_one(cell)
            done.append(cell.name)
        return done

    def run_one(self, cell: Cell) -> None:
        log.info("study: cell %s", cell.name)
        started, cpu_started = time.monotonic(), cpu_seconds()
        result = run_cell(self, cell)
        result["cell"] = cell.name
        result["wall_s"] = time.monotonic() - started
        result["cpu_s"] = cpu_seconds() - cpu_started
        result["load_average_1min"] = os.getloadavg()[0]  # above the core count: the machine was shared
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        result["machine"] = machine()
        atomic_write_json(self.result_path(cell.name), result)


def cpu_seconds() -> float:
    """User and system CPU time of this process and its finished children (sandbox workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine() -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------- cell bodies


def run_cell(study: Study, cell: Cell) -> dict[str, Any]:
    if cell.kind == "rollout":
        return rollout_cell(study, cell.split)
    if cell.kind == "train":
        return train_cell(study, cell.arm)
    if cell.kind == "critic_report":
        return critic_report_cell(study)
    if cell.kind == "speculative":
        return speculative_cell(study, cell.arm)
    return eval_cell(study, cell.arm, cell.benchmark, sampled=cell.sampled)


def rollout_cell(study: Study, split: str) -> dict[str, Any]:
    from weighted_mtp.eval.rollout import run_rollouts

    limit = study.scale.rollout_train_limit if split == "train" else study.scale.rollout_val_limit
    return run_rollouts(study.config("critic"), split=split, limit=limit).to_dict()


def train_cell(study: Study, arm: str) -> dict[str, Any]:
    """One arm's training run; a killed run resumes from its last checkpoint in the run directory."""
    from weighted_mtp.train.run import train

    config = study.training_config(arm)
    result = train(config)
    return {
        "arm": arm, "steps": result.steps, "model_dir": str(result.model_dir), "history": result.history,
        "val_metrics": result.val_metrics, "resumed_from": str(result.resumed_from) if result.resumed_from else None,
    }


def critic_report_cell(study: Study) -> dict[str, Any]:
    from weighted_mtp.eval.critic_report import evaluate_critic

    path = study.root / "rollouts" / "validation.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    report = evaluate_critic(study.training_config("critic"), study.root / "runs" / "critic" / "final", records)
    return report.to_dict()


def eval_cell(study: Study, arm: str, benchmark: str, *, sampled: bool) -> dict[str, Any]:
    """Greedy pass@1 on the benchmark's test split, or pass@1 and pass@n at T = 0.2, top-p 0.95 on a
    fixed subset (the Meta protocol, where the CPU budget does not allow every problem)."""
    from weighted_mtp.eval.sampling import SamplingSettings, evaluate_model

    scale = study.scale
    config = study.config(None)
    if sampled:
        settings = SamplingSettings(
            n_samples=scale.sampled_n, temperature=0.2, top_p=0.95, max_new_tokens=scale.max_new_tokens,
            template=config.data.prompt_template, seed=config.seed,
        )
        limit, ks = scale.sampled_subset, [1, scale.sampled_n]
    else:
        settings = SamplingSettings(
            n_samples=1, temperature=0.0, max_new_tokens=scale.max_new_tokens,
            template=config.data.prompt_template, seed=config.seed,
        )
        limit = scale.eval_mbpp_limit if benchmark == "mbpp" else scale.eval_humaneval_limit
        ks = [1]
    report = evaluate_model(config, study.model_of(arm), benchmark_name=benchmark, split="test", limit=limit,
                            settings=settings, ks=ks)
    report.write(study.root / "reports" / f"{arm}-{benchmark}-{'sampled' if sampled else 'greedy'}.json")
    return {
        "arm": arm, "benchmark": benchmark, "sampled": sampled,
        "pass_at_k": {str(k): p.to_dict() for k, p in report.pass_at_k.items()},
        "per_problem": report.to_dict()["per_problem"],
        "n_problems": report.n_problems, "metadata": report.metadata,
    }


def speculative_cell(study: Study, arm: str) -> dict[str, Any]:
    """Self-speculative greedy decoding with the arm's trained heads on held-out MBPP test prompts,
    batch 1, against plain greedy decoding of the same prompts (run alternately, prompt by prompt):
    acceptance per head, tokens per forward, speed-up, and how many outputs differ."""
    import torch

    from weighted_mtp.data.templates import prompt_adds_bos
    from weighted_mtp.eval.benchmarks import get_benchmark
    from weighted_mtp.eval.generation import compare_speculative
    from weighted_mtp.models.loading import generation_dtype, load_model, resolve_device

    config = study.config(None)
    device = resolve_device(config.device)
    dtype = generation_dtype(config, device)
    model, tokenizer = load_model(study.model_of(arm), models_dir=config.paths.models, device=device,
                                  dtype=getattr(torch, dtype))
    model.eval()
    benchmark = get_benchmark("mbpp")
    template = config.data.prompt_template
    problems = benchmark.load(config.paths.raw_data, "test", study.scale.spec_prompts)
    prompts = [tokenizer.encode(benchmark.prompt(problem, template, tokenizer), add_bos=prompt_adds_bos(template))
               for problem in problems]
    comparison = compare_speculative(model, prompts, max_new_tokens=study.scale.max_new_tokens,
                                     stop_ids=tokenizer.stop_ids)
    return {"arm": arm, "dtype": dtype, **comparison.to_dict()}


def status_lines(study: Study) -> list[str]:
    finished = study.finished()
    lines = []
    for cell in study.cells():
        result = finished.get(cell.name)
        lines.append(f"{'done' if result else 'todo'}  {cell.name}" + (
            f"  ({result['wall_s'] / 60:.1f} min, {result['finished']})" if result else ""))
    return lines


def settings_of(study: Study) -> dict[str, Any]:
    return {"scale": study.scale_name, **asdict(study.scale)}


# ----------------------------------------------------------------------------- docs/RESULTS.md


def _pct(summary: dict | None) -> str:
    if not summary:
        return "not run yet"
    return f"{100 * summary['mean']:.1f} [{100 * summary['ci_low']:.1f}, {100 * summary['ci_high']:.1f}]"


def _greedy_outcomes(result: dict) -> dict[str, bool]:
    return {row["task_id"]: row["c"] > 0 for row in result["per_problem"]}


def discordant(a: dict, b: dict) -> tuple[int, int]:
    """Problems solved (greedy) by arm a only and by arm b only, over the problems both were scored on."""
    outcome_a, outcome_b = _greedy_outcomes(a), _greedy_outcomes(b)
    shared = outcome_a.keys() & outcome_b.keys()
    return (sum(outcome_a[t] and not outcome_b[t] for t in shared),
            sum(outcome_b[t] and not outcome_a[t] for t in shared))


def paired_test(a: dict, b: dict) -> str:
    """Exact McNemar on greedy outcomes: +(a only) / -(b only), p."""
    a_only, b_only = discordant(a, b)
    return f"+{a_only} / -{b_only}, p = {format_p(exact_mcnemar_p(a_only, b_only))}"


def format_p(p: float) -> str:
    """Two significant digits, so that a small p is not printed as 0.00."""
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


PLOTTED_METRICS = ("loss", "head1/ce", "head2/ce", "head4/ce", "weights/mean", "value/loss")


def write_plots(study: Study) -> dict[str, Path]:
    """PNGs beside the cell results: training curves of every finished run, pass@1 of every arm."""
    from weighted_mtp.plots import pass_at_k_chart, training_curves

    done = study.finished()
    plots: dict[str, Path] = {}
    histories = {r["arm"]: r["history"] for name, r in done.items() if name.startswith("train-") and r["history"]}
    if histories:
        plots["training curves"] = training_curves(histories, PLOTTED_METRICS, study.cells_dir / "training-curves.png")
    for benchmark in ("mbpp", "humaneval"):
        rows = {arm: done[f"eval-{arm}-{benchmark}-greedy"]["pass_at_k"]["1"]
                for arm in ARMS if f"eval-{arm}-{benchmark}-greedy" in done}
        if rows:
            plots[f"{benchmark} greedy pass@1"] = pass_at_k_chart(
                rows, f"{benchmark} test, greedy pass@1 (95% CI)", study.cells_dir / f"pass-at-1-{benchmark}.png"
            )
    return plots


def render_results(study: Study, plots: dict[str, Path] | None = None, relative_to: Path | None = None) -> str:
    """docs/RESULTS.md from the finished cells: every figure in it was measured by a cell. `plots`
    (from `write_plots`) are linked relative to `relative_to`, the report's folder."""
    done = study.finished()
    cells = study.cells()
    todo = [c.name for c in cells if c.name not in done]
    lines = [
        "# Results: the method on a real model",
        "",
        f"Generated by `wmtp study report --scale {study.scale_name}` from the cell results in "
        f"`{study.cells_dir}/`; every number below was measured by a cell of `wmtp study run --scale "
        f"{study.scale_name}`. Intervals are 95% percentile bootstraps over problems; paired tests are exact "
        "McNemar tests on greedy outcomes per problem.",
        "",
        f"**Cells finished: {len(done)} of {len(cells)}.**"
        + (f" Not yet run: {', '.join(todo)}." if todo else ""),
        "",
        "## Commands",
        "",
        "```",
        f"wmtp study run --scale {study.scale_name}       # as many times as it takes; finished cells are kept",
        f"wmtp study report --scale {study.scale_name}    # this file, from docs/results/{study.scale_name}/",
        "```",
        "",
        "## Set-up",
        "",
        "```",
        json.dumps(settings_of(study), indent=2),
        "```",
        "",
    ]
    notes = study.cells_dir / "NOTES.md"  # what the cells cannot say themselves, written by whoever ran them
    if notes.is_file():
        lines += ["## Notes on how the cells were run", "", notes.read_text(encoding="utf-8").strip(), ""]
    machines = {json.dumps(r.get("machine"), sort_keys=True) for r in done.values()}
    for text in sorted(machines):
        lines.append(f"- machine: `{text}`")
    lines.append("")

    lines += ["## Rollouts", "", "| split | samples | gold correct | model correct / all | problems with a correct model sample | usable as pairs | tok/s | wall |", "|---|---|---|---|---|---|---|---|"]
    for split in ("train", "validation"):
        r = done.get(f"rollout-{split}")
        if r is None:
            lines.append(f"| {split} | not run yet | | | | | | |")
            continue
        model_all = r["correct"].get("model", 0) + r["incorrect"].get("model", 0)
        lines.append(
            f"| {split} | {r['n_samples']} | {r['correct'].get('gold', 0)} | {r['correct'].get('model', 0)} / {model_all} "
            f"| {r['problems_with_correct_model_sample']} of {r['n_problems']} | {r['problems_usable_as_pairs']} "
            f"| {r['tokens_per_s']:.0f} ({r.get('dtype', '')}) | {r['wall_s'] / 60:.1f} min |"
        )
    lines.append("")

    critic = done.get("critic-report")
    lines += ["## Critic (stage 1), held out on the validation rollouts", ""]
    if critic is None:
        lines.append("Not run yet.")
    else:
        lines += [
            f"- (a) model-correct vs model-incorrect, same problem: AUC {critic['model_auc']:.3f} "
            f"[{critic['model_auc_ci'][0]:.3f}, {critic['model_auc_ci'][1]:.3f}] over {critic['model_pairs']} pairs",
            f"- (b) gold vs model-incorrect, same problem: AUC {critic['gold_auc']:.3f} "
            f"[{critic['gold_auc_ci'][0]:.3f}, {critic['gold_auc_ci'][1]:.3f}] over {critic['gold_pairs']} pairs",
            "- mean last-step value: " + ", ".join(f"{k} {v:.3f}" for k, v in critic["mean_value"].items()),
        ]
        for label, values in critic["value_by_position"].items():
            lines.append(f"- mean value along {label} responses (10 bins): " + " ".join(f"{v:.2f}" for v in values))
    lines.append("")

    lines += ["## pass@k", "", "| arm | MBPP test greedy pass@1 | HumanEval greedy pass@1 | MBPP subset pass@1 (T=0.2) | MBPP subset pass@10 | MBPP greedy vs base | MBPP greedy vs mtp |", "|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        mbpp = done.get(f"eval-{arm}-mbpp-greedy")
        humaneval = done.get(f"eval-{arm}-humaneval-greedy")
        sampled = done.get(f"eval-{arm}-mbpp-sampled")
        base, mtp = done.get("eval-base-mbpp-greedy"), done.get("eval-mtp-mbpp-greedy")
        n = study.scale.sampled_n
        lines.append(
            f"| {arm} | {_pct(mbpp and mbpp['pass_at_k']['1'])} | {_pct(humaneval and humaneval['pass_at_k']['1'])} "
            f"| {_pct(sampled and sampled['pass_at_k']['1'])} | {_pct(sampled and sampled['pass_at_k'].get(str(n)))} "
            f"| {paired_test(mbpp, base) if mbpp and base and arm != 'base' else ''} "
            f"| {paired_test(mbpp, mtp) if mbpp and mtp and arm not in ('mtp', 'base') else ''} |"
        )
    lines.append("")

    lines += ["## What the paired tests say", ""]
    base = done.get("eval-base-mbpp-greedy")
    findings = []
    for arm in ARMS[1:]:
        result = done.get(f"eval-{arm}-mbpp-greedy")
        if result and base:
            findings.append(f"- {arm} vs base on MBPP test (greedy, solved by {arm} only / by base only): "
                            f"{paired_test(result, base)}"
                            + (" (significant at 0.05)" if exact_mcnemar_p(*discordant(result, base)) < 0.05
                               else " (not significant at 0.05)"))
    lines += findings or ["No arm has been compared with the base yet."]
    lines.append("")

    lines += ["## Training", "",
              "Held-out: per-head cross-entropy and top-1 accuracy on the validation rollouts' correct samples "
              "(the critic: ROC AUC of its last-step value on validation pairs).", "",
              "| run | steps | wall | final loss | held-out |", "|---|---|---|---|---|"]
    for arm in ("critic", *[a for a in ARMS if a != "base"]):
        r = done.get(f"train-{arm}")
        if r is None:
            lines.append(f"| {arm} | not run yet | | | |")
            continue
        last = r["history"][-1] if r["history"] else {}
        val = ", ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in sorted(r["val_metrics"].items())
                        if k.endswith(("/ce", "/accuracy", "value/auc")) and isinstance(v, float))
        lines.append(f"| {arm} | {r['steps']} | {r['wall_s'] / 60:.1f} min | {last.get('loss', float('nan')):.4f} | {val} |")
    lines.append("")

    lines += ["## Self-speculative decoding on held-out prompts", "",
              "| arm | prompts | acceptance, heads 2..n | tokens per forward | speed-up over plain greedy | outputs differing |",
              "|---|---|---|---|---|---|"]
    for arm in MULTI_HEAD_ARMS:
        r = done.get(f"speculative-{arm}")
        if r is None:
            lines.append(f"| {arm} | not run yet | | | | |")
            continue
        lines.append(
            f"| {arm} | {r['prompts']} ({r['dtype']}) | {' '.join(f'{a:.2f}' for a in r['acceptance_per_head'])} "
            f"| {r['tokens_per_forward']:.2f} | {r['speedup']:.2f}x | {r['outputs_differing']} |"
        )
    lines.append("")

    if plots:
        lines += ["## Plots", ""]
        for title, path in plots.items():
            link = os.path.relpath(path, relative_to) if relative_to is not None else str(path)
            lines += [f"![{title}]({link})", ""]

    lines += ["## Time per cell", "",
              "CPU time counts this process and its sandbox workers; a load average above the number of cores at "
              "the end of a cell means other work shared the machine, and its wall time is longer than the cell "
              "alone would take.", "",
              "| cell | wall | CPU | load average (1 min) at the end | finished |", "|---|---|---|---|---|"]
    for cell in cells:
        r = done.get(cell.name)
        if r is None:
            lines.append(f"| {cell.name} | not run yet | | | |")
            continue
        cpu = f"{r['cpu_s'] / 60:.1f} min" if "cpu_s" in r else "not recorded"
        load = f"{r['load_average_1min']:.1f}" if "load_average_1min" in r else "not recorded"
        lines.append(f"| {cell.name} | {r['wall_s'] / 60:.1f} min | {cpu} | {load} | {r['finished']} |")
    lines.append("")
    return "\n".join(lines)
