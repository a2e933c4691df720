"""Baseline MTP: every response token weighs the same for every head (and `ref_tuning`, its
next-token special case that trains the Rho-1 reference model)."""

from __future__ import annotations

from weighted_mtp.config.schema import Config
from weighted_mtp.pipelines.common import train_with_objective
from weighted_mtp.registry import PIPELINES
from weighted_mtp.train.objective import BaselineObjective
from weighted_mtp.train.trainer import TrainResult
from weighted_mtp.weighting.base import discounted_head_weights


def baseline_objective(config: Config, model, tokenizer, env) -> BaselineObjective:
    head_weights = discounted_head_weights(model.n_future_tokens, config.weighting.head_discount)
    return BaselineObjective(chunk_size=config.training.loss_chunk_size, head_weights=head_weights)


@PIPELINES.register("baseline")
@PIPELINES.register("ref_tuning")
def run_baseline(config: Config, resume: bool = False) -> TrainResult:
    return train_with_objective(config, baseline_objective, resume=resume)
