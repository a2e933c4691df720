"""Baseline MTP: every response token weighs the same for every head (and `ref_tuning`, its special
case that trains the Rho-1 reference model on correct solutions)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from weighted_mtp.config.schema import Config
from weighted_mtp.data import Batch
from weighted_mtp.losses import mtp_forward_backward
from weighted_mtp.objectives.base import Counts, Objective, head_counts, loss_metrics, target_counts
from weighted_mtp.weighting import discounted_head_weights


class BaselineObjective(Objective):
    """Uniformly weighted MTP: trunk forward, each head's loss and backward, trunk backward."""

    def __init__(self, *, chunk_size: int = 1024, head_weights: Sequence[float] | None = None) -> None:
        self.chunk_size = chunk_size
        self.head_weights = list(head_weights) if head_weights is not None else None

    @classmethod
    def from_config(cls, config: Config, model: nn.Module, device: torch.device) -> BaselineObjective:
        head_weights = discounted_head_weights(model.n_future_tokens, config.weighting.head_discount)
        return cls(chunk_size=config.training.loss_chunk_size, head_weights=head_weights)

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        return target_counts(batch.labels, model.n_future_tokens)

    def step(self, model: nn.Module, batch: Batch, counts: Counts, *, loss_scale: float | None) -> dict[str, float]:
        out = mtp_forward_backward(
            model,
            batch.input_ids,
            batch.labels,
            loss_scale=loss_scale,
            attention_mask=batch.attention_mask,
            head_weights=self.head_weights,
            chunk_size=self.chunk_size,
            target_counts=head_counts(counts, model.n_future_tokens),
        )
        return loss_metrics(out)
