"""The objectives of the critic, verifiable and Rho-1 pipelines (the baseline's is in train/objective.py).

- `CriticObjective`  stage 1: a value head on the trunk regresses each solution's pass/fail reward;
                     the language-model heads are not run.
- `VerifiableObjective` MTP loss weighted by the critic's GAE advantages, exp(A / beta) z-scored and
                     clipped, plus continual value learning (PPO-style clipped value loss around
                     a frozen snapshot of the value head, refreshed every N optimizer steps).
- `Rho1Objective`    MTP loss on the tokens whose loss most exceeds a frozen reference model's.

Every loss is normalised over the whole step (see train/objective.py): the MTP heads by their target
tokens, a value loss by its steps (`token_counts`: "head1".."headn", "steps", "value"); a call with
`global_counts` returns that micro-batch's share of every loss and metric. `evaluate` does the same
with the counts of the whole validation pass.

Objectives with a value head also collect, over one validation pass, how well the value at the last
response step predicts pass/fail (ROC AUC and accuracy at 0.5); the trainer asks for these with
`evaluation_summary()` after the pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from weighted_mtp.data import Batch
from weighted_mtp.losses import MTPLossOutput, mtp_evaluate, mtp_forward_backward
from weighted_mtp.train.lora import merge_lora_state_dict
from weighted_mtp.train.objective import Counts, head_counts, loss_metrics, scaled, share, target_counts
from weighted_mtp.weighting import (
    CriticTargets,
    CriticWeighting,
    Rho1TokenWeights,
    Rho1Weighting,
    WeightingContext,
    critic_pretrain_loss,
    head_target_mask,
    response_step_mask,
    value_loss,
)
from weighted_mtp.weighting.critic import last_true

ValueLossKind = Literal["mse", "bce"]


# ----------------------------------------------------------------------------- value metrics


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half.

    The Mann-Whitney statistic from average ranks; NaN when either class is absent.
    """
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # tied scores share the mean of their ranks
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    first_rank = torch.cumsum(counts, 0) - counts + 1
    mean_rank = (first_rank + (counts - 1) / 2).double()
    ranks[order] = mean_rank[inverse]
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def value_estimates(raw: Tensor, kind: ValueLossKind) -> Tensor:
    """The value head's output as an estimate of the reward: a BCE-trained head outputs logits."""
    return torch.sigmoid(raw) if kind == "bce" else raw


def last_step_values(values: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The value at each row's last response step (the state before its final token), and which
    rows have one (a row whose response was cut away entirely has none)."""
    last = last_true(response_step_mask(labels))
    has_step = last.any(dim=1)
    return (values * last).sum(dim=1), has_step


class PassFailMetrics:
    """Collects last-step values and rewards over a validation pass; `summary()` scores and resets."""

    def __init__(self) -> None:
        self._values: list[Tensor] = []
        self._passed: list[Tensor] = []

    def add(self, estimates: Tensor, batch: Batch) -> None:
        values, has_step = last_step_values(estimates.detach().float(), batch.labels)
        self._values.append(values[has_step].cpu())
        self._passed.append((batch.rewards[has_step] > 0.5).cpu())

    def summary(self) -> dict[str, float]:
        if not self._values:
            return {}
        values, passed = torch.cat(self._values), torch.cat(self._passed)
        self._values, self._passed = [], []
        return {
            "value/auc": roc_auc(values, passed),
            "value/accuracy": float(((values > 0.5) == passed).float().mean()),
            "value/pass_rate": float(passed.float().mean()),
        }


def _prefixed(prefix: str, stats: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{key}": value for key, value in stats.items() if key != "tokens"}


# ----------------------------------------------------------------------------- critic (stage 1)


class CriticObjective:
    """The value head learns P(pass | prefix) at every response step (or only the last one)."""

    def __init__(
        self,
        value_head: nn.Module,
        *,
        loss: ValueLossKind = "mse",
        reward_on: Literal["every_token", "last_token"] = "every_token",
    ) -> None:
        self.value_head = value_head
        self.loss, self.reward_on = loss, reward_on
        self.pass_fail = PassFailMetrics()

    def _loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        raw = self.value_head(hidden)
        mask = response_step_mask(batch.labels)
        return critic_pretrain_loss(raw, batch.rewards, mask, self.loss, self.reward_on), raw

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        """The positions the value loss trains ("value": every step, or each row's last) and all steps."""
        steps = response_step_mask(batch.labels)
        trained = last_true(steps) if self.reward_on == "last_token" else steps
        return {"value": float(trained.sum()), "steps": float(steps.sum())}

    def forward_backward(
        self, model: nn.Module, batch: Batch, *, loss_scale: float, global_counts: Counts | None = None
    ) -> dict[str, float]:
        local = self.token_counts(model, batch)
        total = global_counts or local
        mean_loss, raw = self._loss(model, batch)
        loss = mean_loss * share(local["value"], total["value"])
        (loss * loss_scale).backward()
        estimates = value_estimates(raw.detach(), self.loss)
        step_mask = response_step_mask(batch.labels)
        return {
            "loss": loss.item(),
            "value/mean": float(estimates[step_mask].sum()) / max(total["steps"], 1.0),
        }

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batch: Batch, *, global_counts: Counts | None = None
    ) -> dict[str, float]:
        local = self.token_counts(model, batch)
        total = global_counts or local
        mean_loss, raw = self._loss(model, batch)
        estimates = value_estimates(raw, self.loss)
        self.pass_fail.add(estimates, batch)
        return {
            "loss": mean_loss.item() * share(local["value"], total["value"]),
            "value/mean": float(estimates[response_step_mask(batch.labels)].sum()) / max(total["steps"], 1.0),
        }

    def evaluation_summary(self) -> dict[str, float]:
        return self.pass_fail.summary()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head}


# ----------------------------------------------------------------------------- verifiable critic WMTP


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


class VerifiableObjective:
    """Critic-weighted MTP with continual value learning, PPO-style.

    The "old" value function is `old_value_head`, a frozen snapshot of the value head taken from the
    critic checkpoint at the start and, with `old_values_refresh_every=N`, re-copied from the
    learning head after every N-th optimizer step (`on_step_end`). Per micro-batch, one trunk pass:
    old values V_old = snapshot(h) (no grad) -> GAE advantages and returns G -> token weights
    clip(exp(z(A) / beta)) -> weighted MTP loss, head by head -> value loss
    coefficient * 0.5 * max((V - G)^2, (V_clip - G)^2) with V = value_head(h) (with grad) and
    V_clip = V_old + clamp(V - V_old, +-clip_range): the value head may move at most clip_range
    away from the values its targets came from before the clipped term stops its gradient. The
    value loss trains the value head and, when the trunk trains, the trunk too. The snapshot is
    checkpointed through `state_dict()` / `load_state_dict()`, so a resumed run continues exactly.
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
        """Called by the trainer after optimizer step `step` (1-based)."""
        if self.old_values_refresh_every is not None and step % self.old_values_refresh_every == 0:
            self.refresh_old_values()

    def state_dict(self) -> dict[str, Any]:
        snapshot = self.old_value_head.state_dict()
        return {"old_value_head": {name: tensor.detach().cpu().clone() for name, tensor in snapshot.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.old_value_head.load_state_dict(state["old_value_head"])

    @torch.no_grad()
    def _old_values(self, hidden: Tensor) -> Tensor:
        snapshot = self.old_value_head
        if next(snapshot.parameters()).device != hidden.device:  # the trainer moves only trained modules
            snapshot.to(hidden.device)
        return value_estimates(snapshot(hidden.detach()), self.value_kind)

    def _values(self, hidden: Tensor) -> Tensor:
        return value_estimates(self.value_head(hidden), self.value_kind)

    # ------------------------------------------------------------------ the loss

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        """Each head's targets, and "steps": the positions where values are trained."""
        steps = response_step_mask(batch.labels)
        return {**target_counts(batch.labels, model.n_future_tokens), "steps": float(steps.sum())}

    def _run(
        self,
        loss_fn: Callable[..., MTPLossOutput],
        model: nn.Module,
        batch: Batch,
        fractions: dict[str, float],
        **kwargs: Any,
    ) -> tuple[MTPLossOutput, CriticStep]:
        """One step of the objective, in order: the trunk; the old values on its output, and from them
        the advantages, returns and token weights; the value loss (a mean over this micro-batch's steps,
        weighed by its fraction of the step's steps, so that it too is a share of the step's mean); then
        the heads' weighted loss, and one backward through the trunk for both."""
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        old_values = self._old_values(hidden)
        targets = self.weighting.targets(old_values, batch.rewards, batch.labels, n_heads=model.n_future_tokens)
        step = CriticStep(old_values, targets)
        trunk_loss = None
        if self.train_values:
            step.values = self._values(hidden)
            loss = value_loss(step.values, old_values, targets.returns, targets.step_mask, self.value_clip_range)
            step.value_loss = (loss * fractions["steps"]).detach()
            trunk_loss = self.value_loss_coefficient * loss * fractions["steps"]
            step.values = step.values.detach()
        out = loss_fn(
            model,
            batch.input_ids,
            batch.labels,
            attention_mask=batch.attention_mask,
            weights=targets.weights,
            head_weights=self.head_weights,
            chunk_size=self.chunk_size,
            h_trunk=hidden,
            trunk_loss=trunk_loss,
            **kwargs,
        )
        return out, step

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
        weight_stats = _prefixed("weights", self.weighting.stats(targets.weights, mask))
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

    def forward_backward(
        self, model: nn.Module, batch: Batch, *, loss_scale: float, global_counts: Counts | None = None
    ) -> dict[str, float]:
        n_heads = model.n_future_tokens
        local = self.token_counts(model, batch)
        counts = global_counts or local
        fractions = self._fractions(local, counts, n_heads)
        out, step = self._run(
            mtp_forward_backward,
            model,
            batch,
            fractions,
            loss_scale=loss_scale,
            target_counts=head_counts(counts, n_heads),
        )
        return self._metrics(out, step, batch, n_heads, fractions)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batch: Batch, *, global_counts: Counts | None = None
    ) -> dict[str, float]:
        n_heads = model.n_future_tokens
        local = self.token_counts(model, batch)
        counts = global_counts or local
        fractions = self._fractions(local, counts, n_heads)
        out, step = self._run(
            mtp_evaluate, model, batch, fractions, target_counts=head_counts(counts, n_heads)
        )
        self.pass_fail.add(step.values if step.values is not None else step.old_values, batch)  # the learning head's
        return self._metrics(out, step, batch, n_heads, fractions)

    def evaluation_summary(self) -> dict[str, float]:
        return self.pass_fail.summary()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head}


# ----------------------------------------------------------------------------- Rho-1


class Rho1Objective:
    """MTP loss on the tokens with the highest excess loss over a frozen reference model."""

    def __init__(
        self,
        reference: nn.Module,
        weighting: Rho1Weighting,
        *,
        head_weights: Sequence[float] | None = None,
        chunk_size: int = 1024,
    ) -> None:
        self.reference = reference
        self.weighting = weighting
        self.head_weights = list(head_weights) if head_weights is not None else None
        self.chunk_size = chunk_size

    def _token_weights(self, batch: Batch, n_heads: int) -> Rho1TokenWeights:
        reference_ce = self.weighting.reference_ce(
            self.reference, batch, n_heads=n_heads, chunk_size=self.chunk_size
        )
        return self.weighting.weights(
            batch, n_heads=n_heads, context=WeightingContext(reference_ce=reference_ce)
        )

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        return target_counts(batch.labels, model.n_future_tokens)

    def _metrics(
        self, out: MTPLossOutput, weights: Rho1TokenWeights, batch: Batch, n_heads: int, fraction: float = 1.0
    ) -> dict[str, float]:
        stats = self.weighting.stats(weights, head_target_mask(batch.labels, n_heads))
        return {**loss_metrics(out), **scaled(_prefixed("weights", stats), fraction)}

    def _run(self, loss_fn, model: nn.Module, batch: Batch, global_counts: Counts | None, **loss_kwargs):
        """`mtp_forward_backward` or `mtp_evaluate` with the selection's weights, as shares of the step."""
        n_heads = model.n_future_tokens
        local = self.token_counts(model, batch)
        counts = global_counts or local
        weights = self._token_weights(batch, n_heads)
        out = loss_fn(
            model,
            batch.input_ids,
            batch.labels,
            attention_mask=batch.attention_mask,
            weights=weights,
            head_weights=self.head_weights,
            chunk_size=self.chunk_size,
            target_counts=head_counts(counts, n_heads),
            **loss_kwargs,
        )
        fraction = share(sum(local.values()), sum(counts.values()))
        return self._metrics(out, weights, batch, n_heads, fraction)

    def forward_backward(
        self, model: nn.Module, batch: Batch, *, loss_scale: float, global_counts: Counts | None = None
    ) -> dict[str, float]:
        return self._run(mtp_forward_backward, model, batch, global_counts, loss_scale=loss_scale)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, batch: Batch, *, global_counts: Counts | None = None
    ) -> dict[str, float]:
        return self._run(mtp_evaluate, model, batch, global_counts)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {}
