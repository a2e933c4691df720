"""Critic (stage 1 of verifiable WMTP): a value head on the trunk learns whether a solution passes.

Differs from the baseline in its objective only: no language-model loss, the value head's
`stage1.loss` (mse or bce) against each solution's reward, at every response step or the last one
(`stage1.reward_on`). Train it on correct and incorrect solutions (a pair sampler over rollouts);
the LM heads must be frozen, the trunk may be frozen, LoRA-adapted or trained. The value head is
exported beside the model as `<run>/final/value_head.safetensors`, where `verifiable` finds it.
"""

from __future__ import annotations

from weighted_mtp.config.schema import Config
from weighted_mtp.errors import ConfigError
from weighted_mtp.models.value_head import build_value_head
from weighted_mtp.pipelines.objectives import CriticObjective
from weighted_mtp.registry import PIPELINES


@PIPELINES.register("critic")
def critic_objective(config: Config, model, tokenizer, env) -> CriticObjective:
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
            f"training.freeze.heads is {config.training.freeze.heads!r}: the critic trains no LM head; set it to frozen"
        )
    value_head = build_value_head(config.model.value_head, model.args.dim)
    return CriticObjective(value_head, loss=config.stage1.loss, reward_on=config.stage1.reward_on)
