"""Verifiable Critic WMTP (stage 2): token weights from a trained critic's advantages.

Differs from the baseline in its objective: each response token's loss is weighted by
clip(exp(z(A) / beta)), A the GAE advantage from the critic's values (`stage2.value_weighting`),
and the value head keeps learning with the PPO-style clipped value loss (`stage2.value_loss`),
clipped around a frozen snapshot of the head (the "old" values, which the advantages come from)
that is refreshed every `stage2.value_loss.old_values_refresh_every` optimizer steps.
Train on solutions with rewards, correct and incorrect (`data.sampler: all` over rollouts).

The value head comes from the critic run's export (`stage2.critic_checkpoint`, default
`<paths.runs>/critic/final`); the head's architecture and loss (mse values or bce logits) are read
from the config saved there, and the critic must have seen the same trunk as this run's model.
"""

from __future__ import annotations

import logging
from pathlib import Path


from weighted_mtp.config import load_saved_config
from weighted_mtp.config.schema import Config
from weighted_mtp.errors import CheckpointError, ConfigError
from weighted_mtp.models.value_head import VALUE_HEAD_FILE, load_value_head
from weighted_mtp.pipelines.objectives import VerifiableObjective
from weighted_mtp.registry import PIPELINES
from weighted_mtp.train.lora import lora_scaling
from weighted_mtp.weighting import CriticWeighting, discounted_head_weights

log = logging.getLogger(__name__)

def critic_directory(config: Config) -> Path:
    """The critic export this run starts from; a clear error when it is not there yet."""
    if config.stage2.critic_checkpoint is not None:
        path = Path(config.stage2.critic_checkpoint)
        if not (path / VALUE_HEAD_FILE).is_file():
            raise CheckpointError(f"stage2.critic_checkpoint: {path / VALUE_HEAD_FILE} not found")
        return path
    path = config.paths.runs / "critic" / "final"
    if not (path / VALUE_HEAD_FILE).is_file():
        raise CheckpointError(
            f"stage2.critic_checkpoint is not set and {path / VALUE_HEAD_FILE} does not exist: "
            "train the critic first (`wmtp train --recipe critic`) or set stage2.critic_checkpoint"
        )
    return path


def _same_model(name: str, other: str) -> bool:
    if name == other:
        return True
    return Path(name).exists() and Path(other).exists() and Path(name).resolve() == Path(other).resolve()


def critic_settings(config: Config, directory: Path) -> Config:
    """The critic run's config (saved in its export), checked against this run's model."""
    saved = directory / "config.yaml"
    if not saved.is_file():
        if config.model.value_head is None:
            raise ConfigError(f"{saved} not found: set model.value_head and stage1.loss to the critic's")
        log.warning("%s not found: assuming model.value_head and stage1.loss match the critic's", saved)
        return config
    critic = load_saved_config(saved)
    if critic.model.value_head is None:
        raise CheckpointError(f"{saved}: the run that wrote {directory} had no value head")
    trunk_changed = critic.training.freeze.trunk != "frozen"
    trunk_source = str(directory) if trunk_changed else critic.model.name
    if not (_same_model(config.model.name, trunk_source) or _same_model(config.model.name, str(directory))):
        why = "trained its trunk" if trunk_changed else f"read the trunk of {critic.model.name}"
        raise ConfigError(
            f"model.name is {config.model.name!r} but the critic in {directory} {why}: its values mean "
            f"nothing on another trunk; set model.name={trunk_source}"
        )
    return critic


@PIPELINES.register("verifiable")
def verifiable_objective(config: Config, model, tokenizer, env) -> VerifiableObjective:
    if config.weighting.scheme != "critic":
        raise ConfigError(
            f"weighting.scheme is {config.weighting.scheme!r}: the verifiable pipeline weighs by the critic"
        )
    directory = critic_directory(config)
    critic = critic_settings(config, directory)
    value_head = load_value_head(directory, critic, model.args.dim)
    log.info(
        "critic: %s value head from %s (%s)", critic.model.value_head.type, directory, critic.stage1.loss
    )
    value_loss = config.stage2.value_loss
    return VerifiableObjective(
        value_head,
        CriticWeighting.from_config(config),
        value_kind=critic.stage1.loss,
        value_loss_coefficient=value_loss.coefficient,
        value_clip_range=value_loss.clip_range,
        train_values=value_loss.enabled and config.training.freeze.value_head != "frozen",
        old_values_refresh_every=value_loss.old_values_refresh_every,
        lora_scaling=lora_scaling(config.training.lora.r, config.training.lora.alpha),
        head_weights=discounted_head_weights(model.n_future_tokens, config.weighting.head_discount),
        chunk_size=config.training.loss_chunk_size,
    )
