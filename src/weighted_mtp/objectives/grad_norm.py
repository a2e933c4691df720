"""grad_norm: MTP where each target token weighs by the norm of its own loss gradient.

Differs from the baseline in its objective: before the weighted loss, one pass of every head without
gradient scores each target token by || W^T (softmax(W h) - onehot(y)) || (`losses.head_logit_grad_norms`),
and `weighting.grad_norm` turns the scores into weights (z-score, exp, clip, mean 1; `grad_norm.*`).
No other model is needed: the importance comes from the model being trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from weighted_mtp.config.schema import Config
from weighted_mtp.data import Batch
from weighted_mtp.errors import ConfigError
from weighted_mtp.losses import head_logit_grad_norms, mtp_forward_backward
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
from weighted_mtp.weighting import GradNormWeighting, discounted_head_weights, head_target_mask, weight_stats


class GradNormObjective(Objective):
    """MTP loss weighted by each target token's gradient norm at the unembedding."""

    def __init__(self, weighting: GradNormWeighting, *, head_weights: Sequence[float] | None = None,
                 chunk_size: int = 1024) -> None:
        self.weighting = weighting
        self.head_weights = list(head_weights) if head_weights is not None else None
        self.chunk_size = chunk_size

    @classmethod
    def from_config(cls, config: Config, model: nn.Module, device: torch.device) -> GradNormObjective:
        if config.weighting.scheme != "grad_norm":
            raise ConfigError(f"weighting.scheme is {config.weighting.scheme!r}: the grad_norm pipeline weighs by grad_norm")
        return cls(GradNormWeighting.from_config(config), chunk_size=config.training.loss_chunk_size,
                   head_weights=discounted_head_weights(model.n_future_tokens, config.weighting.head_discount))

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        return target_counts(batch.labels, model.n_future_tokens)

    def _scores(self, model: nn.Module, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        return head_logit_grad_norms(model, hidden.detach(), batch.labels, attention_mask=batch.attention_mask,
                                     chunk_size=self.chunk_size)

    def step(self, model: nn.Module, batch: Batch, counts: Counts, *, loss_scale: float | None) -> dict[str, float]:
        """Trunk -> every head's gradient-norm scores (no gradient; each head's block runs once more,
        with dropout under masks of its own) -> weights -> the heads' weighted loss and backward ->
        the trunk's backward."""
        n_heads = model.n_future_tokens
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        scores = self._scores(model, hidden, batch)
        weights = self.weighting.weights(scores, batch.labels)
        out = mtp_forward_backward(
            model,
            batch.input_ids,
            batch.labels,
            loss_scale=loss_scale,
            attention_mask=batch.attention_mask,
            target_counts=head_counts(counts, n_heads),
            weights=weights,
            head_weights=self.head_weights,
            chunk_size=self.chunk_size,
            h_trunk=hidden,
        )
        mask = head_target_mask(batch.labels, n_heads)
        stats = weight_stats(weights, mask)
        if mask[..., 0].any():
            stats["grad_norm_head1"] = float(scores[..., 0][mask[..., 0]].mean())
        fraction = share(sum(self.token_counts(model, batch).values()), sum(counts.values()))
        return {**loss_metrics(out), **scaled(prefixed("weights", stats), fraction)}

    @torch.no_grad()
    def token_weights(self, model: nn.Module, batch: Batch) -> TokenWeights:
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        scores = self._scores(model, hidden, batch)
        return TokenWeights(self.weighting.weights(scores, batch.labels), {"grad_norm": scores[..., 0]})
