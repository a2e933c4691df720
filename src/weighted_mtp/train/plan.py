"""What a run would do, computed from the config alone; the dry-run prints it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from weighted_mtp.config import ResolvedConfig, config_to_yaml
from weighted_mtp.config.schema import Config

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    model: str
    n_heads: int
    dataset: str
    world_size: int
    sequences_per_step: int
    max_tokens_per_step: int
    steps: str
    run_dir: str
    checkpoints: str
    tracking: str
    s3: str


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_plan(config: Config) -> RunPlan:
    ws = world_size()
    training = config.training
    per_step = training.batch_size * training.grad_accum_steps * ws
    if training.max_steps is not None:
        steps = str(training.max_steps)
    elif config.data.n_samples is not None:
        steps = str(training.epochs * -(-config.data.n_samples // per_step))
    else:
        steps = f"{training.epochs} epoch(s) over {config.data.dataset}/{config.data.split}"
    s3 = f"s3://{config.s3.bucket}/{config.s3.prefix}/{config.experiment.name}" if config.s3.bucket else "off"
    return RunPlan(
        model=config.model.name,
        n_heads=config.model.n_future_tokens,
        dataset=f"{config.data.dataset}/{config.data.split} ({config.data.sampler}, {config.data.prompt_template})",
        world_size=ws,
        sequences_per_step=per_step,
        max_tokens_per_step=per_step * config.data.max_length,
        steps=steps,
        run_dir=str(config.run_dir),
        checkpoints=str(config.run_dir / "checkpoints"),
        tracking=f"{config.tracking.uri} [{config.tracking.experiment}]" if config.tracking.enabled else "off",
        s3=s3,
    )


def print_plan(plan: RunPlan, config: Config, console: Console) -> None:
    table = Table(title=f"{config.experiment.name}: {config.experiment.pipeline} pipeline", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = {
        "model": f"{plan.model}, {plan.n_heads} head(s), {config.dtype} on {config.device}",
        "weighting": config.weighting.scheme,
        "data": plan.dataset,
        "ranks": f"{plan.world_size} ({config.distributed.strategy})",
        "sequences / step": str(plan.sequences_per_step),
        "tokens / step (max)": str(plan.max_tokens_per_step),
        "steps": plan.steps,
        "run directory": plan.run_dir,
        "checkpoints": plan.checkpoints,
        "tracking": plan.tracking,
        "s3": plan.s3,
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def dry_run(resolved: ResolvedConfig) -> int:
    """Validate, print the resolved config and the plan, and write nothing."""
    config = resolved.config
    console = Console(soft_wrap=True)
    console.print("# resolved configuration (layers: " + " < ".join(["schema defaults", *resolved.sources]) + ")")
    console.print(config_to_yaml(config), markup=False, highlight=False, end="")
    print_plan(make_plan(config), config, console)
    log.info("dry run: nothing written")
    return 0
