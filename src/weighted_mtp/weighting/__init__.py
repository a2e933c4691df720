"""Token weights as plain tensor functions: the critic's (TD/GAE advantages), Rho-1's (excess
loss) and grad_norm's (each token's loss-gradient norm). Which one a run uses follows from its pipeline (`weighting.scheme` names it and is checked
against the pipeline); the baseline weighs every token 1."""

from weighted_mtp.weighting.base import (
    discounted_head_weights,
    head_target_mask,
    response_step_mask,
    spread_over_heads,
    weight_stats,
)
from weighted_mtp.weighting.critic import (
    CriticTargets,
    CriticWeighting,
    critic_pretrain_loss,
    critic_targets,
    gae_advantages,
    pair_margins,
    pairwise_value_loss,
    value_loss,
)
from weighted_mtp.weighting.grad_norm import GradNormWeighting
from weighted_mtp.weighting.rho1 import Rho1StepStatistics, Rho1Weighting, reference_token_ce

__all__ = [
    "CriticTargets",
    "CriticWeighting",
    "GradNormWeighting",
    "Rho1StepStatistics",
    "Rho1Weighting",
    "critic_pretrain_loss",
    "critic_targets",
    "discounted_head_weights",
    "gae_advantages",
    "head_target_mask",
    "pair_margins",
    "pairwise_value_loss",
    "reference_token_ce",
    "response_step_mask",
    "spread_over_heads",
    "value_loss",
    "weight_stats",
]
