"""`wmtp demo`: Verifiable Critic WMTP end to end on a real model, in minutes on a CPU.

The stages, each a library call any user can make by hand (the commands in brackets):

1. evaluate the untouched base model on a fixed slice of MBPP test        [wmtp eval]
2. roll out on a slice of MBPP train, and on MBPP validation for the critic's held-out report
   (model samples plus each problem's gold solution, labelled by the sandbox)   [wmtp rollout]
3. train the critic (stage 1: a value head on the frozen trunk)             [wmtp train --recipe critic]
4. report the critic on the validation rollouts it never saw: AUC (a) and (b)
5. train Verifiable Critic WMTP (stage 2, LoRA) from that critic           [wmtp train --recipe verifiable]
6. evaluate the result on the same MBPP test slice                          [wmtp eval]

and one table at the end. Every run writes under a new `storage/demo/<time>/`, so running it twice
never collides; its `demo.json` holds every figure of the table. `--scale smoke` is a few problems and
steps (the test suite runs it); `--use-micro-model` swaps in the random micro model for a quick check
of the plumbing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from weighted_mtp.config import load_config
from weighted_mtp.config.schema import Config
from weighted_mtp.eval.passk import exact_mcnemar_p
from weighted_mtp.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoScale:
    """How much of each stage the demo runs."""

    eval_problems: int  # the first N MBPP test problems, greedy, before and after
    train_problems: int  # MBPP train problems rolled out for training
    val_problems: int  # MBPP validation problems rolled out for the critic's held-out report
    n_samples: int  # model samples per rolled-out problem
    max_new_tokens: int
    critic_steps: int
    verifiable_steps: int


SCALES = {
    "demo": DemoScale(eval_problems=30, train_problems=40, val_problems=20, n_samples=4, max_new_tokens=128,
                      critic_steps=30, verifiable_steps=16),
    "smoke": DemoScale(eval_problems=2, train_problems=3, val_problems=2, n_samples=2, max_new_tokens=16,
                       critic_steps=2, verifiable_steps=2),
}


@dataclass
class StageTime:
    name: str
    wall_s: float
    detail: str = ""


@dataclass
class DemoResult:
    root: Path
    model: str
    scale: str
    before: dict[str, Any] = field(default_factory=dict)  # pass@1 with its interval, n problems
    after: dict[str, Any] = field(default_factory=dict)
    paired: dict[str, int] = field(default_factory=dict)  # problems solved before only / after only / both
    rollouts: dict[str, Any] = field(default_factory=dict)
    critic: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    speed: dict[str, Any] = field(default_factory=dict)  # tokens/s of generation and training, dtype
    stages: list[StageTime] = field(default_factory=list)
    locations: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["root"] = str(self.root)
        return out


def stage_config(
    recipe: str, root: Path, *, defaults: str, preset: str, use_micro_model: bool, overrides: list[str],
    extra: list[str],
) -> Config:
    """A recipe's config with the demo's run root; the user's overrides come last and win."""
    return load_config(
        defaults=defaults,
        recipe=recipe,
        preset=preset,
        use_micro_model=use_micro_model,
        overrides=[
            f"paths.runs={root / 'runs'}",
            f"paths.rollouts={root / 'rollouts'}",
            f"paths.datasets={root / 'datasets'}",
            *extra,
            *overrides,
        ],
    ).config


def new_run_root(parent: Path) -> Path:
    """A directory of its own for this demo run, named by its start time: runs never collide."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 100):
        root = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            root.mkdir(parents=True)
            return root
        except FileExistsError:
            continue
    raise FileExistsError(f"{parent}: 99 demo runs started in the same second")


def aggregate_weights(history: list[dict[str, float]]) -> dict[str, float]:
    """Token-weight statistics over a run's steps: mean of the means and stds, extreme min and max."""
    rows = [h for h in history if "weights/mean" in h]
    if not rows:
        return {}
    return {
        "mean": sum(h["weights/mean"] for h in rows) / len(rows),
        "std": sum(h["weights/std"] for h in rows) / len(rows),
        "min": min(h["weights/min"] for h in rows),
        "max": max(h["weights/max"] for h in rows),
        "steps": len(rows),
    }


def run_demo(
    *, scale: str = "demo", preset: str = "cpu-smollm2", use_micro_model: bool = False,
    overrides: list[str] | None = None, root: Path | None = None, defaults: str = "configs/defaults.yaml",
) -> DemoResult:
    from weighted_mtp.eval.critic_report import evaluate_critic
    from weighted_mtp.eval.rollout import run_rollouts
    from weighted_mtp.eval.sampling import SamplingSettings, evaluate_model
    from weighted_mtp.train.run import train

    size = SCALES[scale]
    overrides = list(overrides or [])
    base = load_config(defaults=defaults, preset=preset, use_micro_model=use_micro_model, overrides=overrides).config
    if root is None:
        root = new_run_root(Path(base.paths.storage) / "demo")
    root.mkdir(parents=True, exist_ok=True)
    model_name = base.model.name
    result = DemoResult(root=root, model=model_name, scale=scale)
    common = dict(defaults=defaults, preset=preset, use_micro_model=use_micro_model, overrides=overrides)
    sampling = [f"rollout.n_samples={size.n_samples}", f"rollout.max_new_tokens={size.max_new_tokens}"]
    greedy = SamplingSettings(
        n_samples=1, temperature=0.0, max_new_tokens=size.max_new_tokens, template=base.data.prompt_template,
        seed=base.seed,
    )

    with _Stage(result, "evaluate base", f"{size.eval_problems} MBPP test problems, greedy"):
        before = evaluate_model(base, model_name, benchmark_name="mbpp", split="test", limit=size.eval_problems,
                                settings=greedy)
        before.write(root / "eval-before.json")
    result.before = _pass_at_1(before)
    result.speed["generation_tokens_per_s"] = before.metadata["tokens_per_s"]
    result.speed["generation_dtype"] = before.metadata["dtype"]

    critic_cfg = stage_config("critic", root, **common, extra=[
        *sampling, f"training.max_steps={size.critic_steps}", "training.lora.enabled=false",
        "data.val_split=validation", f"training.eval_every={size.critic_steps}", "training.save_every=null",
        "data.sampler=pairs",
    ])
    summaries = {}
    for split, limit in (("train", size.train_problems), ("validation", size.val_problems)):
        with _Stage(result, f"rollout {split}", f"{limit} problems x {size.n_samples} samples + gold"):
            summaries[split] = run_rollouts(critic_cfg, split=split, limit=limit)
    result.rollouts = {split: s.to_dict() for split, s in summaries.items()}

    with _Stage(result, "train critic", f"{size.critic_steps} steps, value head on the frozen trunk"):
        critic = train(critic_cfg)
    critic_dir = critic.model_dir
    with _Stage(result, "critic report", "validation rollouts, never trained on"):
        records = [json.loads(line) for line in (root / "rollouts" / "validation.jsonl").read_text().splitlines()]
        report = evaluate_critic(critic_cfg, critic_dir, records)
    result.critic = report.to_dict()

    verifiable_cfg = stage_config("verifiable", root, **common, extra=[
        *sampling, f"training.max_steps={size.verifiable_steps}", f"stage2.critic_checkpoint={critic_dir}",
        "data.val_split=null", "training.eval_every=null", "training.save_every=null", "training.lr=1e-4",
    ])
    with _Stage(result, "train verifiable", f"{size.verifiable_steps} steps, LoRA"):
        verifiable = train(verifiable_cfg)
    result.weights = aggregate_weights(verifiable.history)
    speeds = [h["tokens_per_s"] for h in verifiable.history if "tokens_per_s" in h]
    result.speed["training_tokens_per_s"] = sum(speeds) / len(speeds) if speeds else 0.0

    with _Stage(result, "evaluate trained", f"{size.eval_problems} MBPP test problems, greedy"):
        after = evaluate_model(base, str(verifiable.model_dir), benchmark_name="mbpp", split="test",
                               limit=size.eval_problems, settings=greedy)
        after.write(root / "eval-after.json")
    result.after = _pass_at_1(after)
    result.paired = _paired(before, after)
    from weighted_mtp.plots import training_curves

    curves = training_curves(
        {"critic": critic.history, "verifiable": verifiable.history},
        ["loss", "head1/ce", "head2/ce", "value/loss", "weights/mean", "weights/clipped_high"],
        root / "training-curves.png",
    )
    result.locations = {
        "run root": str(root),
        "critic checkpoints": str(critic.run_dir),
        "verifiable checkpoints": str(verifiable.run_dir),
        "trained model": str(verifiable.model_dir),
        "eval reports": f"{root / 'eval-before.json'}, {root / 'eval-after.json'}",
        "rollouts": str(root / "rollouts"),
        "plots": str(curves),
        "tracking": _tracking_location(base, {"critic": critic.tracking_run_id, "verifiable": verifiable.tracking_run_id}),
    }
    atomic_write_json(root / "demo.json", result.to_dict())
    return result


class _Stage:
    """Times one stage into the result's table."""

    def __init__(self, result: DemoResult, name: str, detail: str) -> None:
        self.result, self.name, self.detail = result, name, detail

    def __enter__(self) -> None:
        log.info("demo: %s (%s)", self.name, self.detail)
        self.began = time.monotonic()

    def __exit__(self, *exc) -> None:
        self.result.stages.append(StageTime(self.name, time.monotonic() - self.began, self.detail))


def _pass_at_1(report) -> dict[str, Any]:
    p = report.pass_at_k[1]
    return {"pass@1": p.mean, "ci_low": p.ci_low, "ci_high": p.ci_high, "problems": report.n_problems,
            "passed": report.n_passed}


def _paired(before, after) -> dict[str, int]:
    """Problems solved by one model and not the other (greedy, one sample each): the discordant
    pairs an exact McNemar test reads."""
    passed_before = {s.task_id for s in before.samples if s.status == "passed"}
    passed_after = {s.task_id for s in after.samples if s.status == "passed"}
    same_text = sum(
        a.completion == b.completion for a, b in zip(sorted(before.samples, key=lambda s: s.task_id),
                                                     sorted(after.samples, key=lambda s: s.task_id))
    )
    return {
        "before_only": len(passed_before - passed_after),
        "after_only": len(passed_after - passed_before),
        "both": len(passed_before & passed_after),
        "identical_completions": same_text,
    }


def _tracking_location(config: Config, run_ids: dict[str, str | None]) -> str:
    if not config.tracking.enabled:
        return "tracking disabled"
    from weighted_mtp.redact import redact_uri

    runs = ", ".join(f"{name} run {run_id}" for name, run_id in run_ids.items() if run_id)
    return f"MLflow {redact_uri(config.tracking.uri)}, experiment {config.tracking.experiment!r}: {runs}"


def render_table(result: DemoResult):
    """The demo's one table (rich), and the locations below it."""
    from rich.table import Table

    def pct(d: dict) -> str:
        return f"{100 * d['pass@1']:.1f}% [{100 * d['ci_low']:.1f}, {100 * d['ci_high']:.1f}] ({d['passed']}/{d['problems']})"

    def auc(value: float, ci: tuple[float, float] | list[float], pairs: int) -> str:
        if pairs == 0:
            return "no pairs"
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] over {pairs} pairs"

    table = Table(title=f"wmtp demo: Verifiable Critic WMTP on {result.model} ({result.scale})")
    table.add_column("")
    table.add_column("value")
    table.add_row("pass@1 before (95% CI)", pct(result.before))
    table.add_row("pass@1 after (95% CI)", pct(result.after))
    paired = result.paired
    table.add_row(
        "paired outcome",
        f"solved before only {paired['before_only']}, after only {paired['after_only']}, both {paired['both']}; "
        f"exact McNemar p = {exact_mcnemar_p(paired['before_only'], paired['after_only']):.3f}; "
        f"{paired['identical_completions']}/{result.before['problems']} completions identical",
    )
    for split, summary in result.rollouts.items():
        counts = ", ".join(
            f"{source} {summary['correct'].get(source, 0)}/{summary['correct'].get(source, 0) + summary['incorrect'].get(source, 0)} correct"
            for source in ("model", "gold")
        )
        table.add_row(f"rollouts {split}", f"{summary['n_samples']} samples: {counts}; "
                      f"{summary['problems_usable_as_pairs']} problems usable as pairs")
    critic = result.critic
    table.add_row("critic AUC (a) model correct vs incorrect", auc(critic["model_auc"], critic["model_auc_ci"], critic["model_pairs"]))
    table.add_row("critic AUC (b) gold vs model incorrect", auc(critic["gold_auc"], critic["gold_auc_ci"], critic["gold_pairs"]))
    table.add_row("critic mean value", ", ".join(f"{k} {v:.3f}" for k, v in critic["mean_value"].items()))
    if result.weights:
        w = result.weights
        table.add_row("token weights", f"mean {w['mean']:.3f}, std {w['std']:.3f}, min {w['min']:.3f}, max {w['max']:.3f}")
    table.add_row("generation", f"{result.speed['generation_tokens_per_s']:.0f} tok/s ({result.speed['generation_dtype']})")
    table.add_row("training (verifiable)", f"{result.speed['training_tokens_per_s']:.0f} tok/s")
    for stage in result.stages:
        table.add_row(f"  {stage.name}", f"{stage.wall_s:.0f} s  ({stage.detail})")
    table.add_row("total", f"{sum(s.wall_s for s in result.stages):.0f} s")
    return table
