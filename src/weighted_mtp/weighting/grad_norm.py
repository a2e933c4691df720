"""grad_norm weighting: a token weighs by how hard the model is pushed on it.

The score of head k's target at position p is the norm of the gradient of that token's cross-entropy
with respect to the hidden state the unembedding reads, || W^T (softmax(W h) - onehot(y)) ||
(`losses.head_logit_grad_norms`, closed form, chunked): near 0 for a token the head already predicts
with confidence, up to about 2 max ||W_v|| for one it gets confidently wrong. Scores then go through
the same steps as the critic's advantages (`weighting.critic`), per head over the micro-batch's
targets of that head: z-score (or none), exp(s / temperature) (or L * softmax over each row's L
targets), clip to [clip_min, clip_max], rescale to mean 1.

The statistics are the micro-batch's own (unlike the critic's, which default to the whole step):
computing them over the step would run every head's block and unembedding once more per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from weighted_mtp.weighting.base import head_target_mask
from weighted_mtp.weighting.critic import clipped_weights, transformed_scores

if TYPE_CHECKING:
    from weighted_mtp.config.schema import Config


@dataclass(frozen=True)
class GradNormWeighting:
    """How gradient-norm scores become token weights (`grad_norm.*` in the config)."""

    normalization: Literal["zscore", "none"] = "zscore"
    transform: Literal["exp", "softmax"] = "exp"
    temperature: float = 1.0
    clip_min: float = 0.1
    clip_max: float = 3.0
    weight_normalization: Literal["mean1", "none"] = "mean1"

    @classmethod
    def from_config(cls, config: Config) -> GradNormWeighting:
        section = config.grad_norm
        return cls(section.normalization, section.transform, section.temperature, section.clip_min,
                   section.clip_max, section.weight_normalization)

    def weights(self, scores: Tensor, labels: Tensor) -> Tensor:
        """[B,T,n] weights from [B,T,n] scores (head k's at [..., k-1]); 0 where a head has no target."""
        mask = head_target_mask(labels, scores.shape[-1]).to(scores.device)
        weights = torch.zeros(scores.shape, dtype=torch.promote_types(scores.dtype, torch.float32),
                              device=scores.device)
        for k0 in range(scores.shape[-1]):
            raw = transformed_scores(scores[..., k0], mask[..., k0], temperature=self.temperature,
                                     normalization=self.normalization, transform=self.transform)
            weights[..., k0] = clipped_weights(raw, mask[..., k0], clip_min=self.clip_min, clip_max=self.clip_max,
                                               weight_normalization=self.weight_normalization)
        return weights
