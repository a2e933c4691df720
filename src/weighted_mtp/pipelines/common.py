"""What every training pipeline does around its objective: processes, model, data, tracking, Trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from weighted_mtp.config.schema import Config
from weighted_mtp.train import distributed as D
from weighted_mtp.train.objective import Objective
from weighted_mtp.train.trainer import Trainer, TrainResult, seed_everything

# (config, model, tokenizer, env) -> the pipeline's objective
ObjectiveFactory = Callable[[Config, nn.Module, Any, D.DistEnv], Objective]


def run_s3_store(config: Config):
    """The run's S3 store (s3://bucket/prefix/<experiment name>/), or None when no bucket is set."""
    from weighted_mtp.tracking import build_s3_store

    if not config.s3.bucket:
        return None
    prefix = f"{config.s3.prefix.strip('/')}/{config.experiment.name}"
    return build_s3_store(config.model_copy(update={"s3": config.s3.model_copy(update={"prefix": prefix})}))


def train_with_objective(
    config: Config, make_objective: ObjectiveFactory, *, resume: bool = False
) -> TrainResult:
    """Join the process group, build model and loaders, train with the objective, leave the group."""
    from weighted_mtp.data import build_loader
    from weighted_mtp.models.loading import load_model_from_config
    from weighted_mtp.tracking import build_tracker

    dist_cfg = config.distributed
    env = D.init_distributed(
        device=config.device,
        backend=dist_cfg.backend,
        strategy=dist_cfg.strategy,
        timeout_s=dist_cfg.timeout_s,
    )
    try:
        seed_everything(config.seed)
        model, tokenizer = load_model_from_config(config)
        train_loader = build_loader(
            config, tokenizer, split=config.data.split, rank=env.rank, world_size=env.world_size
        )
        val_loader = None
        if config.data.val_split and config.training.eval_every:
            val_loader = build_loader(
                config,
                tokenizer,
                split=config.data.val_split,
                rank=env.rank,
                world_size=env.world_size,
                shuffle=False,
            )
        objective = make_objective(config, model, tokenizer, env)
        trainer = Trainer(
            config,
            model,
            objective,
            train_loader,
            val_loader,
            build_tracker(config, env.rank),
            env=env,
            s3_store=run_s3_store(config) if env.is_main else None,
            tokenizer=tokenizer,
        )
        return trainer.fit(resume=resume)
    finally:
        D.shutdown()
