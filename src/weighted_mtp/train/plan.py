"""What a run would do, computed from the config alone; the dry-run prints it."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from weighted_mtp.config import ResolvedConfig, config_to_yaml
from weighted_mtp.config.schema import Config
from weighted_mtp.redact import redact_uri
from weighted_mtp.train.memory import DTYPE_BYTES, MemoryEstimate, estimate_memory

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
        tracking=f"{redact_uri(config.tracking.uri)} [{config.tracking.experiment}]"
        if config.tracking.enabled
        else "off",
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


def _scratch_paths(config: Config, scratch: Path) -> Config:
    """The config with every path the build would write under pointed at `scratch`, unless what the
    build needs is already there: a dry run reads existing storage and writes nothing."""
    from weighted_mtp.data.index import SplitPaths
    from weighted_mtp.data.prepare import processed_dir

    paths = config.paths
    updates: dict[str, Path] = {}
    named_model = config.model.name in ("micro", "smollm2-135m")
    if named_model and not (paths.models / "smollm2-135m" / "tokenizer.json").is_file():
        updates["models"] = scratch / "models"
    processed = processed_dir(paths.datasets, config.data.dataset)
    if not SplitPaths.of(processed, config.data.split).metadata.is_file():
        updates["datasets"] = scratch / "datasets"
    return config.model_copy(update={"paths": paths.model_copy(update=updates)}) if updates else config


def one_training_step(config: Config, console: Console) -> dict[str, float]:
    """Build the model, the data and the pipeline's objective, and run one forward and backward pass."""
    from weighted_mtp.models.loading import training_autocast
    from weighted_mtp.train import distributed as D
    from weighted_mtp.train.run import build_run

    start = time.perf_counter()
    env = D.DistEnv(device=D.resolve_device(config.device))
    run = build_run(config, env, validation=False)
    model, objective = run.model.to(env.device), run.objective
    batch = next(iter(run.train_loader)).to(env.device)
    step_start = time.perf_counter()
    with training_autocast(config, env.device):
        metrics = objective.forward_backward(model, batch, loss_scale=1.0)
    step_s = time.perf_counter() - step_start
    parameters = [p for p in model.parameters() if p.grad is not None]
    for module in objective.trainable_modules().values():
        parameters += [p for p in module.parameters() if p.grad is not None]
    grad_norm = (
        float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])))
        if parameters
        else 0.0
    )
    tokens = int(batch.attention_mask.sum())
    summary = {
        "loss": float(metrics["loss"]),
        "grad_norm": grad_norm,
        "batch_shape": tuple(batch.input_ids.shape),
        "tokens": tokens,
        "step_s": step_s,
        "build_s": step_start - start,
    }
    console.print(
        f"one step on one batch {summary['batch_shape']} ({tokens} tokens): loss {summary['loss']:.4f}, "
        f"grad norm {grad_norm:.4f}, forward+backward {step_s:.2f} s (build {summary['build_s']:.1f} s)"
    )
    return summary


def memory_estimates(config: Config, world_size: int) -> dict[str, MemoryEstimate]:
    """The memory per rank this run would need, with and without activation checkpointing, from the
    model's shapes (read from its checkpoint's metadata, no weights loaded)."""
    from weighted_mtp.models.loading import read_named_or_path, weights_dtype
    from weighted_mtp.train.parallelize import part_modes

    args = read_named_or_path(config.model.name, config.paths.models, config.seed).args
    heads = config.model.n_future_tokens or args.n_future_tokens
    args = dataclasses.replace(args, n_layers=args.n_layers + heads - args.n_future_tokens, n_future_tokens=heads)
    lora = config.training.lora
    common = dict(
        world_size=world_size,
        strategy=config.distributed.strategy,
        weight_bytes=weights_dtype(config).itemsize,  # fp32 under autocast
        compute_bytes=DTYPE_BYTES[config.dtype],
        batch_size=config.training.batch_size,
        seq_len=config.data.max_length,
        **part_modes(config),
        lora_r=lora.r,
        lora_targets=list(lora.target_modules),
        loss_chunk_size=config.training.loss_chunk_size,
    )
    return {
        "plain": estimate_memory(args, activation_checkpointing=False, **common),
        "checkpointed": estimate_memory(args, activation_checkpointing=True, **common),
    }


def print_memory(estimates: dict[str, MemoryEstimate], world_size: int, console: Console) -> None:
    table = Table(title=f"expected memory per rank, {world_size} rank(s), GiB (estimate: docs/training.md)")
    for column in ("activations", "params", "grads", "optimizer", "acts", "loss", "total"):
        table.add_column(column, justify="left" if column == "activations" else "right", no_wrap=True)
    for name, m in estimates.items():
        table.add_row(name, *(f"{v:.3f}" for v in (m.parameters, m.gradients, m.optimizer, m.activations, m.loss, m.total)))
    console.print(table)


def dry_run(resolved: ResolvedConfig, world_size: int | None = None) -> int:
    """Validate, print the resolved config, the plan and the memory it needs per rank (for
    `world_size` ranks, default $WORLD_SIZE), run one step on one batch; write nothing."""
    config = resolved.config
    console = Console(soft_wrap=True)
    console.print(
        "# resolved configuration (layers: " + " < ".join(["schema defaults", *resolved.sources]) + ")"
    )
    console.print(config_to_yaml(config), markup=False, highlight=False, end="")
    plan = make_plan(config)
    print_plan(plan, config, console)
    with tempfile.TemporaryDirectory(prefix="wmtp-dry-run-") as scratch:
        scratch_config = _scratch_paths(config, Path(scratch))
        ranks = world_size or plan.world_size
        print_memory(memory_estimates(scratch_config, ranks), ranks, console)
        one_training_step(scratch_config, console)
    log.info("dry run: nothing written")
    return 0
