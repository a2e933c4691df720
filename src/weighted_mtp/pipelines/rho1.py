"""Rho-1 (Lin et al. 2024): train on the tokens whose loss most exceeds a reference model's.

Differs from the baseline in its objective: a frozen reference model (`rho1.reference_model`,
default the ref_tuning run's export `<paths.runs>/ref_tuning/final`) scores every target token
first; the MTP loss then keeps the top `rho1.top_k_ratio` of tokens by excess loss (or softmax
weights with `selection: soft`), per head or by head 1's choice (`rho1.per_head`).
"""

from __future__ import annotations

import logging

from torch import nn

from weighted_mtp.config.schema import Config
from weighted_mtp.errors import CheckpointError, ConfigError
from weighted_mtp.models.loading import DTYPES, load_model
from weighted_mtp.pipelines.objectives import Rho1Objective
from weighted_mtp.registry import PIPELINES
from weighted_mtp.weighting import Rho1Weighting, discounted_head_weights

log = logging.getLogger(__name__)


def reference_location(config: Config) -> str:
    """The reference model's name or path; a clear error when the default one was not trained yet."""
    if config.rho1.reference_model is not None:
        return config.rho1.reference_model
    path = config.paths.runs / "ref_tuning" / "final"
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"rho1.reference_model is not set and {path} does not exist: train the reference first "
            "(`wmtp train --recipe ref_tuning`) or set rho1.reference_model"
        )
    return str(path)


def load_reference(config: Config, model: nn.Module, device) -> nn.Module:
    """The reference model, frozen, in eval mode, on the training device."""
    location = reference_location(config)
    dtype = DTYPES[config.dtype] if device.type == "cpu" else DTYPES["float32"]  # autocast on GPU
    reference, _ = load_model(location, models_dir=config.paths.models, dtype=dtype, seed=config.seed)
    if reference.args.vocab_size != model.args.vocab_size:
        raise ConfigError(
            f"rho1.reference_model {location} has a vocabulary of {reference.args.vocab_size} tokens but the "
            f"model has {model.args.vocab_size}: Rho-1 compares losses on the same tokens"
        )
    if config.rho1.per_head and reference.n_future_tokens < model.n_future_tokens:
        raise ConfigError(
            f"rho1.per_head is true but the reference {location} has {reference.n_future_tokens} head(s) for "
            f"{model.n_future_tokens} trained heads; set rho1.per_head: false (select by head 1's excess loss)"
        )
    reference.requires_grad_(False)
    log.info("rho1 reference: %s (%d head(s))", location, reference.n_future_tokens)
    return reference.to(device).eval()


@PIPELINES.register("rho1")
def rho1_objective(config: Config, model, tokenizer, env) -> Rho1Objective:
    if config.weighting.scheme != "rho1":
        raise ConfigError(
            f"weighting.scheme is {config.weighting.scheme!r}: the rho1 pipeline weighs by excess loss"
        )
    return Rho1Objective(
        load_reference(config, model, env.device),
        Rho1Weighting.from_config(config),
        head_weights=discounted_head_weights(model.n_future_tokens, config.weighting.head_discount),
        chunk_size=config.training.loss_chunk_size,
    )
