"""Token weighting schemes; importing this package registers them in WEIGHTING_SCHEMES."""

from weighted_mtp.weighting.base import (
    WeightingContext,
    WeightingScheme,
    build_weighting,
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
    value_loss,
)
from weighted_mtp.weighting.rho1 import Rho1TokenWeights, Rho1Weighting, reference_token_ce
from weighted_mtp.weighting.uniform import UniformWeighting

__all__ = [
    "CriticTargets",
    "CriticWeighting",
    "Rho1TokenWeights",
    "Rho1Weighting",
    "UniformWeighting",
    "WeightingContext",
    "WeightingScheme",
    "build_weighting",
    "critic_pretrain_loss",
    "critic_targets",
    "discounted_head_weights",
    "gae_advantages",
    "head_target_mask",
    "reference_token_ce",
    "response_step_mask",
    "spread_over_heads",
    "value_loss",
    "weight_stats",
]
