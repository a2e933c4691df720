"""The baseline: every response token weighs 1 for every head (plain MTP fine-tuning)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from weighted_mtp.registry import WEIGHTING_SCHEMES
from weighted_mtp.weighting.base import BatchLike, WeightingContext, head_target_mask, weight_stats

if TYPE_CHECKING:
    from weighted_mtp.config.schema import Config


@WEIGHTING_SCHEMES.register("uniform")
class UniformWeighting:
    """Weight 1 on every valid target, 0 elsewhere; head discounting goes through head_weights."""

    name = "uniform"

    @classmethod
    def from_config(cls, config: Config) -> UniformWeighting:
        return cls()

    def weights(self, batch: BatchLike, *, n_heads: int, context: WeightingContext | None = None) -> Tensor:
        return head_target_mask(batch.labels, n_heads).float()

    def stats(self, weights: Tensor, mask: Tensor) -> dict[str, float]:
        return weight_stats(weights, mask)
