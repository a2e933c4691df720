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

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from weighted_mtp.config import load_saved_config
from weighted_mtp.config.schema import Config
from weighted_mtp.data import Batch
from weighted_mtp.errors import CheckpointError, ConfigError
from weighted_mtp.losses import MTPLossOutput, mtp_forward_backward
from weighted_mtp.models.lora import lora_scaling, merge_lora_state_dict
from weighted_mtp.models.value_head import VALUE_HEAD_FILE, load_value_head
from weighted_mtp.objectives.base import (
    Counts,
    Objective,
    TokenWeights,
    head_counts,
    loss_metrics,
    prefixed,
    scaled,
    share,
    target_counts,
)
from weighted_mtp.objectives.critic import PassFailMetrics, ValueLossKind, value_estimates
from weighted_mtp.weighting import (
    CriticTargets,
    CriticWeighting,
    discounted_head_weights,
    head_target_mask,
    response_step_mask,
    value_loss,
)
from weighted_mtp.weighting.critic import StepStatistics

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


@dataclass
class CriticStep:
    """What one verifiable step computed from the trunk, for its metrics."""

    old_values: Tensor  # the frozen snapshot's values: the advantages and weights come from these
    targets: CriticTargets
    values: Tensor | None = None  # the learning head's values (when the value head trains)
    value_loss: Tensor | None = None  # its share of the step's value loss


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that never trains: no gradients, eval mode (no dropout), outside any optimizer."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def _full_tensor(tensor: Tensor) -> Tensor:
    """A parameter as one whole tensor on every rank (an FSDP shard is gathered: a collective)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class VerifiableObjective(Objective):
    """Critic-weighted MTP with continual value learning, PPO-style.

    The "old" value function is `old_value_head`, a frozen snapshot of the value head taken from the
    critic checkpoint at the start and, with `old_values_refresh_every=N`, re-copied from the
    learning head after every N-th optimizer step (`on_step_end`). Per micro-batch, one trunk pass:
    old values V_old = snapshot(h) (no grad) -> GAE advantages and returns G -> token weights
    clip(exp(z(A) / beta)) -> weighted MTP loss, head by head -> value loss
    coefficient * 0.5 * max((V - G)^2, (V_clip - G)^2) with V = value_head(h) (with grad) and
    V_clip = V_old + clamp(V - V_old, +-clip_range): the value head may move at most clip_range
    away from the values its targets came from before the clipped term stops its gradient. The
    value loss trains the value head and, when the trunk trains, the trunk too. With statistics over
    the step (z-score, mean 1), V_old comes from `prepare_step`'s pass, so that the weights use the
    very scores their statistics came from even when dropout makes two trunk passes differ. The
    snapshot is checkpointed through `state_dict()` / `load_state_dict()`, so a resumed run
    continues exactly.
    """

    def __init__(
        self,
        value_head: nn.Module,
        weighting: CriticWeighting,
        *,
        value_kind: ValueLossKind = "mse",
        value_loss_coefficient: float = 0.5,
        value_clip_range: float | None = 0.2,
        train_values: bool = True,
        old_values_refresh_every: int | None = None,
        lora_scaling: float = 1.0,
        head_weights: Sequence[float] | None = None,
        chunk_size: int = 1024,
    ) -> None:
        if old_values_refresh_every is not None and old_values_refresh_every < 1:
            raise ValueError(f"old_values_refresh_every must be >= 1, got {old_values_refresh_every}")
        self.value_head = value_head
        self.old_value_head = frozen_copy(value_head)
        self.weighting = weighting
        self.score_moments = weighting.new_moments()  # running score statistics (ema normalisation)
        self.step_statistics: StepStatistics | None = None  # the current training step's (prepare_step)
        self.step_old_values: list[tuple[Batch, Tensor]] = []  # each of its micro-batches' V_old, from the same pass
        self.value_kind = value_kind
        self.value_loss_coefficient = value_loss_coefficient
        self.value_clip_range = value_clip_range
        self.train_values = train_values
        self.old_values_refresh_every = old_values_refresh_every
        self.lora_scaling = lora_scaling  # to fold a LoRA-adapted value head into the plain snapshot
        self.head_weights = list(head_weights) if head_weights is not None else None
        self.chunk_size = chunk_size
        self.pass_fail = PassFailMetrics()

    # ------------------------------------------------------------------ the old value function

    @torch.no_grad()
    def refresh_old_values(self) -> None:
        """The snapshot takes the learning head's current weights (every rank, under FSDP too)."""
        state = {name: _full_tensor(tensor) for name, tensor in self.value_head.state_dict().items()}
        self.old_value_head.load_state_dict(merge_lora_state_dict(state, self.lora_scaling))

    def on_step_end(self, step: int) -> None:
        """Called by the trainer after optimizer step `step` (1-based): the step's old values are spent."""
        self.step_old_values = []
        if self.old_values_refresh_every is not None and step % self.old_values_refresh_every == 0:
            self.refresh_old_values()

    def state_dict(self) -> dict[str, Any]:
        snapshot = self.old_value_head.state_dict()
        state = {"old_value_head": {name: tensor.detach().cpu().clone() for name, tensor in snapshot.items()}}
        if self.score_moments is not None:
            state["score_moments"] = self.score_moments.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_value_head.load_state_dict(state["old_value_head"])
        if self.score_moments is not None:
            self.score_moments.load_state_dict(state["score_moments"])

    @torch.no_grad()
    def _old_values(self, hidden: Tensor) -> Tensor:
        snapshot = self.old_value_head
        if next(snapshot.parameters()).device != hidden.device:  # the trainer moves only trained modules
            snapshot.to(hidden.device)
        return value_estimates(snapshot(hidden.detach()), self.value_kind)

    def _values(self, hidden: Tensor) -> Tensor:
        return value_estimates(self.value_head(hidden), self.value_kind)

    @classmethod
    def from_config(cls, config: Config, model: nn.Module, device: torch.device) -> VerifiableObjective:
        """The value head from the critic run's export, the knobs from `stage2.*`."""
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
        return cls(
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

    # ------------------------------------------------------------------ the loss

    @torch.no_grad()
    def prepare_step(self, model: nn.Module, batches: list[Batch], reduce_sum) -> None:
        """The statistics of the whole step's scores (every micro-batch and rank): one forward of the
        trunk and the old value head per micro-batch, without gradient, before the step's backward
        passes, so that accumulation and the number of ranks do not change the weights. Each
        micro-batch's old values are kept for its `step`."""
        self.step_statistics, self.step_old_values = None, []
        if not self.weighting.uses_step_statistics():
            return
        scores = []
        for batch in batches:
            hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
            old_values = self._old_values(hidden)
            self.step_old_values.append((batch, old_values))
            scores.append(self.weighting.scores(old_values, batch.rewards, batch.labels))
        self.step_statistics = self.weighting.step_statistics(scores, reduce_sum, moments=self.score_moments)

    def _prepared_old_values(self, batch: Batch) -> Tensor:
        for prepared, old_values in self.step_old_values:
            if prepared is batch:
                return old_values
        raise RuntimeError("critic weights with statistics over the step: prepare_step was not given this micro-batch")

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        """Each head's targets, and "steps": the positions where values are trained."""
        steps = response_step_mask(batch.labels)
        return {**target_counts(batch.labels, model.n_future_tokens), "steps": float(steps.sum())}

    def step(self, model: nn.Module, batch: Batch, counts: Counts, *, loss_scale: float | None) -> dict[str, float]:
        """One step in plain order: the trunk; the old values on its output, and from them the
        advantages, returns and token weights; the value loss (a mean over this micro-batch's steps,
        weighed by its fraction of the step's steps, so that it too is a share of the step's mean);
        then the heads' weighted loss and their backward, and one backward through the trunk for both."""
        n_heads = model.n_future_tokens
        fractions = self._fractions(self.token_counts(model, batch), counts, n_heads)
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        statistics = self.step_statistics if loss_scale is not None else None  # validation: per batch
        old_values = self._prepared_old_values(batch) if statistics is not None else self._old_values(hidden)
        targets = self.weighting.targets(
            old_values, batch.rewards, batch.labels, n_heads=n_heads, moments=self.score_moments,
            update_moments=loss_scale is not None, statistics=statistics,
        )  # fmt: skip
        critic = CriticStep(old_values, targets)
        trunk_loss = None
        if self.train_values:
            values = self._values(hidden)
            loss = value_loss(values, old_values, targets.returns, targets.step_mask, self.value_clip_range)
            trunk_loss = self.value_loss_coefficient * loss * fractions["steps"]
            critic.values, critic.value_loss = values.detach(), (loss * fractions["steps"]).detach()
        out = mtp_forward_backward(
            model,
            batch.input_ids,
            batch.labels,
            loss_scale=loss_scale,
            attention_mask=batch.attention_mask,
            target_counts=head_counts(counts, n_heads),
            weights=targets.weights,
            head_weights=self.head_weights,
            chunk_size=self.chunk_size,
            h_trunk=hidden,
            trunk_loss=trunk_loss,
        )
        if loss_scale is None:  # the learning head's values, or the snapshot's when it does not learn
            self.pass_fail.add(critic.values if critic.values is not None else old_values, batch)
        return self._metrics(out, critic, batch, n_heads, fractions)

    def _metrics(
        self,
        out: MTPLossOutput,
        step: CriticStep,
        batch: Batch,
        n_heads: int,
        fractions: dict[str, float],
    ) -> dict[str, float]:
        targets = step.targets
        metrics = loss_metrics(out)
        metrics.pop("aux_loss", None)
        step_values = step.old_values[targets.step_mask]
        value_stats = {"value/mean": float(step_values.mean()) if step_values.numel() else 0.0}
        if step.value_loss is not None:
            metrics["value/loss"] = float(step.value_loss)  # already a share
            if self.value_clip_range is not None and step_values.numel():
                moved = (step.values - step.old_values).abs()[targets.step_mask]
                value_stats["value/clip_fraction"] = float((moved > self.value_clip_range).float().mean())
        metrics.update(scaled(value_stats, fractions["steps"]))
        mask = head_target_mask(batch.labels, n_heads)
        weight_stats = prefixed("weights", self.weighting.stats(targets, mask))
        metrics.update(scaled(weight_stats, fractions["targets"]))
        return metrics

    @staticmethod
    def _fractions(local: Counts, total: Counts, n_heads: int) -> dict[str, float]:
        """This micro-batch's fraction of the step's value steps and of its target tokens."""
        heads = [f"head{k}" for k in range(1, n_heads + 1)]
        return {
            "steps": share(local["steps"], total["steps"]),
            "targets": share(sum(local[h] for h in heads), sum(total[h] for h in heads)),
        }

    @torch.no_grad()
    def token_weights(self, model: nn.Module, batch: Batch) -> TokenWeights:
        """The weights the current value head gives (its statistics over this batch), with its
        values and the advantages (GAE, or value changes) the weights come from."""
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        values = self._values(hidden)
        targets = self.weighting.targets(values, batch.rewards, batch.labels, n_heads=model.n_future_tokens,
                                         moments=self.score_moments)
        return TokenWeights(targets.weights, {"value": values, "advantage": targets.advantages})

    def evaluation_summary(self) -> dict[str, float]:
        return self.pass_fail.summary()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head}
