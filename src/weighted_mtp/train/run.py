"""How a training run is put together from its config: `wmtp train`, its dry run, the demo and the
study all build it here.

`build_run` loads the model, the data loaders and the pipeline's objective; `train` joins the
process group, builds the run and hands it to the `Trainer`, whose loop is the same for every
experiment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from weighted_mtp.config.schema import Config
from weighted_mtp.objectives import Objective, build_objective
from weighted_mtp.train import distributed as D
from weighted_mtp.train.memory import reset_resident_peak, resident_peak
from weighted_mtp.train.trainer import Trainer, TrainResult, seed_everything

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training run is made of, before the trainer wraps and drives it."""

    model: nn.Module
    tokenizer: Any
    objective: Objective
    train_loader: Any
    val_loader: Any | None
    pending_weights: dict[str, Any] | None = None  # a model still on the meta device: what fills it


def build_run(config: Config, env: D.DistEnv, *, validation: bool = True) -> Run:
    """Model and tokenizer, this rank's loaders (validation when `data.val_split` and
    `training.eval_every` are set and `validation`), and the objective of `experiment.pipeline`."""
    from weighted_mtp.data import build_loader
    from weighted_mtp.models.loading import load_model_from_config, load_model_skeleton

    seed_everything(config.seed)
    pending = None
    if sharded_start_up(config, env):
        model, tokenizer, pending = load_model_skeleton(config)
    else:
        model, tokenizer = load_model_from_config(config)
    train_loader = build_loader(config, tokenizer, split=config.data.split, rank=env.rank, world_size=env.world_size)
    val_loader = None
    if validation and config.data.val_split and config.training.eval_every:
        val_loader = build_loader(
            config, tokenizer, split=config.data.val_split, rank=env.rank, world_size=env.world_size, shuffle=False
        )
    objective = build_objective(config, model, env.device)
    return Run(model, tokenizer, objective, train_loader, val_loader, pending)


def sharded_start_up(config: Config, env: D.DistEnv) -> bool:
    """Whether every rank builds the model on the meta device, shards it and reads only its shards:
    FSDP over several ranks (a tied unembedding is the embedding's one shared parameter throughout)."""
    return env.is_distributed and env.strategy == "fsdp"


def run_s3_store(config: Config):
    """The run's S3 store (s3://bucket/prefix/<experiment name>/), or None when no bucket is set."""
    from weighted_mtp.tracking import build_s3_store

    if not config.s3.bucket:
        return None
    prefix = f"{config.s3.prefix.strip('/')}/{config.experiment.name}"
    return build_s3_store(config.model_copy(update={"s3": config.s3.model_copy(update={"prefix": prefix})}))


def train(config: Config, *, resume: bool = False, fresh: bool = False) -> TrainResult:
    """Join the process group, build the run, train it to the end, leave the group."""
    from weighted_mtp.tracking import build_tracker

    dist_cfg = config.distributed
    env = D.init_distributed(
        device=config.device, backend=dist_cfg.backend, strategy=dist_cfg.strategy, timeout_s=dist_cfg.timeout_s
    )
    try:
        before = reset_resident_peak()
        run = build_run(config, env)
        trainer = Trainer(
            config,
            run.model,
            run.objective,
            run.train_loader,
            run.val_loader,
            build_tracker(config, env.rank),
            env=env,
            s3_store=run_s3_store(config) if env.is_main else None,
            tokenizer=run.tokenizer,
            pending_weights=run.pending_weights,
        )
        if before:
            log.info("rank %d: start-up peak resident memory %.2f GiB, %.2f GiB above the process before loading",
                     env.rank, resident_peak() / 2**30, (resident_peak() - before) / 2**30)
        result = trainer.fit(resume=resume, fresh=fresh)
    finally:
        D.shutdown()
    log.info("%s: %d steps, run directory %s", config.experiment.name, result.steps, result.run_dir)
    return result
