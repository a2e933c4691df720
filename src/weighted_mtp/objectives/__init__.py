"""One objective per experiment: what differs between them is how a batch becomes a loss.

`OBJECTIVES` maps `experiment.pipeline` to its objective class; `from_config(config, model, device)`
builds it. Everything else about a run (model, data, loop, checkpoints) is the same for all.
"""

from __future__ import annotations

import torch
from torch import nn

from weighted_mtp.config.schema import Config
from weighted_mtp.objectives.base import Counts, Objective, TokenWeights
from weighted_mtp.objectives.baseline import BaselineObjective
from weighted_mtp.objectives.critic import CriticObjective
from weighted_mtp.objectives.grad_norm import GradNormObjective
from weighted_mtp.objectives.rho1 import Rho1Objective
from weighted_mtp.objectives.verifiable import VerifiableObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "baseline": BaselineObjective,
    "ref_tuning": BaselineObjective,
    "critic": CriticObjective,
    "verifiable": VerifiableObjective,
    "rho1": Rho1Objective,
    "grad_norm": GradNormObjective,
}


def build_objective(config: Config, model: nn.Module, device: torch.device) -> Objective:
    """The objective of the config's pipeline (`experiment.pipeline`, validated by the schema)."""
    return OBJECTIVES[config.experiment.pipeline].from_config(config, model, device)


__all__ = [
    "OBJECTIVES",
    "BaselineObjective",
    "Counts",
    "CriticObjective",
    "GradNormObjective",
    "Objective",
    "Rho1Objective",
    "TokenWeights",
    "VerifiableObjective",
    "build_objective",
]
