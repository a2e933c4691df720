"""Critic (stage 1 of verifiable WMTP): a value head on the trunk learns whether a solution passes.

Differs from the baseline in its objective only: no language-model loss, the value head's
`stage1.loss` (mse or bce) against each solution's reward, at every response step or the last one
(`stage1.reward_on`). Train it on correct and incorrect solutions (a pair sampler over rollouts);
the LM heads must be frozen, the trunk may be frozen, LoRA-adapted or trained. The value head is
exported beside the model as `<run>/final/value_head.safetensors`, where `verifiable` finds it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from weighted_mtp.config.schema import Config
from weighted_mtp.data import Batch
from weighted_mtp.errors import ConfigError
from weighted_mtp.models.value_head import build_value_head
from weighted_mtp.objectives.base import Counts, Objective, TokenWeights, share
from weighted_mtp.weighting import critic_pretrain_loss, pair_margins, pairwise_value_loss, response_step_mask
from weighted_mtp.weighting.critic import lambda_return_targets, last_true

ValueLossKind = Literal["mse", "bce", "pairwise"]


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
    """The value head's output as an estimate of the reward: a BCE- or pairwise-trained head outputs
    logits."""
    return torch.sigmoid(raw) if kind in ("bce", "pairwise") else raw


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


class CriticObjective(Objective):
    """The value head learns P(pass | prefix) at every response step (or only the last one), and/or
    to rank a correct solution above an incorrect one of the same problem (pairwise)."""

    def __init__(
        self,
        value_head: nn.Module,
        *,
        loss: ValueLossKind = "mse",
        reward_on: Literal["every_token", "last_token"] = "every_token",
        pairwise_coefficient: float = 0.0,
        lambda_return: tuple[float, float] | None = None,
    ) -> None:
        self.value_head = value_head
        self.loss, self.reward_on = loss, reward_on
        self.lambda_return = lambda_return  # (gamma, lambda) for lambda-return targets, else the reward
        self.pairwise_coefficient = 1.0 if loss == "pairwise" else pairwise_coefficient
        self.pass_fail = PassFailMetrics()

    @classmethod
    def from_config(cls, config: Config, model: nn.Module, device: torch.device) -> CriticObjective:
        if config.model.value_head is None:
            raise ConfigError(
                "model.value_head is not set: the critic pipeline trains a value head (e.g. type: mlp)"
            )
        if not config.stage1.enabled:
            raise ConfigError(
                "stage1.enabled is false: the critic pipeline is stage 1, there is nothing else to train"
            )
        if config.training.freeze.heads != "frozen":
            raise ConfigError(
                f"training.freeze.heads is {config.training.freeze.heads!r}: the critic trains no LM head; "
                "set it to frozen"
            )
        pairwise = config.stage1.loss == "pairwise" or config.stage1.pairwise_coefficient > 0
        if pairwise and config.data.sampler != "pairs":
            raise ConfigError(
                f"stage1.loss / stage1.pairwise_coefficient ask for the pairwise loss, which compares a correct and an "
                f"incorrect solution of one problem, but data.sampler is {config.data.sampler!r}; set data.sampler=pairs"
            )
        value_head = build_value_head(config.model.value_head, model.args.dim)
        return cls(
            value_head,
            loss=config.stage1.loss,
            reward_on=config.stage1.reward_on,
            pairwise_coefficient=config.stage1.pairwise_coefficient,
            lambda_return=(
                (config.stage2.value_weighting.gae_gamma, config.stage2.value_weighting.gae_lambda)
                if config.stage1.targets == "lambda_return"
                else None
            ),
        )

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        """The positions the value loss trains ("value": every step, or each row's last) and all steps."""
        steps = response_step_mask(batch.labels)
        trained = last_true(steps) if self.reward_on == "last_token" else steps
        counts = {"value": float(trained.sum()), "steps": float(steps.sum())}
        if self.pairwise_coefficient > 0:
            counts["pairs"] = float(pair_margins(steps.float(), steps, batch.rewards)[1].sum())
        return counts

    def step(self, model: nn.Module, batch: Batch, counts: Counts, *, loss_scale: float | None) -> dict[str, float]:
        """Trunk -> value head -> value loss against the rewards (and/or the pairwise loss on the
        batch's pairs) -> backward (the LM heads never run)."""
        local = self.token_counts(model, batch)
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        raw = self.value_head(hidden)
        step_mask = response_step_mask(batch.labels)
        metrics: dict[str, float] = {}
        loss = raw.new_zeros(())
        if self.loss != "pairwise":
            targets = None
            if self.lambda_return is not None:
                gamma, lam = self.lambda_return
                targets = lambda_return_targets(
                    value_estimates(raw.detach(), self.loss), batch.rewards, step_mask, gamma=gamma, lam=lam
                )
                targets = targets.clamp(0.0, 1.0) if self.loss == "bce" else targets
            loss = critic_pretrain_loss(raw, batch.rewards, step_mask, self.loss, self.reward_on, targets=targets)
            loss = loss * share(local["value"], counts["value"])
        if self.pairwise_coefficient > 0:
            pair_sum, _ = pairwise_value_loss(raw, step_mask, batch.rewards)
            pairwise = pair_sum / max(counts["pairs"], 1.0)
            loss = loss + self.pairwise_coefficient * pairwise
            margins, counted = pair_margins(raw.detach(), step_mask, batch.rewards)
            metrics["value/pairwise_loss"] = float(pairwise.detach())
            metrics["value/pair_accuracy"] = float(((margins > 0) & counted).sum()) / max(counts["pairs"], 1.0)
        if loss_scale is not None:
            (loss * loss_scale).backward()
        estimates = value_estimates(raw.detach(), self.loss)
        if loss_scale is None:
            self.pass_fail.add(estimates, batch)
        return {
            "loss": loss.item(),
            "value/mean": float(estimates[step_mask].sum()) / max(counts["steps"], 1.0),
            **metrics,
        }

    @torch.no_grad()
    def token_weights(self, model: nn.Module, batch: Batch) -> TokenWeights:
        """No language-model loss, so no weights: the value at each position instead."""
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        return TokenWeights(None, {"value": value_estimates(self.value_head(hidden), self.loss)})

    def evaluation_summary(self) -> dict[str, float]:
        return self.pass_fail.summary()

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"value_head": self.value_head}
