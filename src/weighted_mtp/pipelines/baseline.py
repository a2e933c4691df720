"""Baseline MTP: every response token weighs the same for every head (and `ref_tuning`, its
special case that trains the Rho-1 reference model on correct solutions)."""

from __future__ import annotations

from weighted_mtp.config.schema import Config
from weighted_mtp.registry import PIPELINES
from weighted_mtp.train.objective import BaselineObjective
from weighted_mtp.weighting.base import discounted_head_weights


@PIPELINES.register("baseline")
@PIPELINES.register("ref_tuning")
def baseline_objective(config: Config, model, tokenizer, env) -> BaselineObjective:
    head_weights = discounted_head_weights(model.n_future_tokens, config.weighting.head_discount)
    return BaselineObjective(chunk_size=config.training.loss_chunk_size, head_weights=head_weights)
