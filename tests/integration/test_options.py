"""Every weighting and critic option of the recipes, one short run each (4 heads, 64-token sequences,
two steps of two micro-batches): each runs end to end with finite losses and logs what it weighs. On
the micro model in the default suite (seconds), and on the real SmolLM2-135M with LoRA as a `slow`
test (about four minutes on 2 cores)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from fixtures.pipelines import write_pair_rollouts

from weighted_mtp.config import load_config
from weighted_mtp.train.run import train

VERIFIABLE = {
    "delta_ema_softmax_step": ("stage2.value_weighting.scorer=critic_delta", "stage2.value_weighting.td_error_normalization=ema",
                               "stage2.value_weighting.ema_warmup=1", "stage2.value_weighting.transform=softmax"),
    "gae_zscore_exp_none_micro_batch": ("stage2.value_weighting.weight_normalization=none",
                                        "stage2.value_weighting.statistics=micro_batch"),
}
RHO1 = {
    "top_k_head1_step": ("rho1.selection=top_k", "rho1.per_head=false"),
    "soft_micro_batch": ("rho1.selection=soft", "rho1.per_head=false", "rho1.statistics=micro_batch"),
}
GRAD_NORM = {
    "defaults": (),
    "softmax_unnormalised": ("grad_norm.transform=softmax", "grad_norm.normalization=none",
                             "grad_norm.weight_normalization=none"),
}


def option_config(micro: bool, recipe: str, name: str, raw: Path, models: Path, *overrides: str):
    return load_config(
        defaults="configs/defaults.yaml", recipe=recipe, preset="local-light" if micro else "cpu-smollm2",
        use_micro_model=micro, overrides=[
            f"paths.raw_data={raw}", f"paths.rollouts={raw / 'rollouts'}", f"paths.models={models}",
            "tracking.enabled=false", f"experiment.name={name}", f"model.n_future_tokens={1 if recipe == 'ref_tuning' else 4}",
            "data.dataset=rollouts", "data.max_length=64", "data.val_split=null", "training.eval_every=null",
            "training.save_every=null", "training.max_steps=2", "training.batch_size=2", "training.grad_accum_steps=2",
            *overrides,
        ],
    ).config  # fmt: skip


def assert_ran(result, *metrics: str) -> None:
    assert result.steps == 2 and len(result.history) == 2
    for step in result.history:
        assert math.isfinite(step["loss"])
        for metric in metrics:
            assert math.isfinite(step[metric]), metric


@pytest.mark.parametrize("micro", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=lambda micro: "micro" if micro else "smollm2")
def test_every_option_runs_end_to_end(micro, in_tmp_repo, shared_data, tmp_path):
    raw = write_pair_rollouts(in_tmp_repo / "raw", shared_data)
    models = tmp_path / "models"

    def config_of(recipe: str, name: str, *overrides: str):
        return option_config(micro, recipe, name, raw, models, "device=cpu", *overrides)

    critic = train(config_of("critic", "critic", "data.sampler=pairs", "stage1.loss=mse",
                             "stage1.pairwise_coefficient=0.5", "stage1.targets=lambda_return"))
    assert_ran(critic, "value/pairwise_loss")
    assert_ran(train(config_of("critic", "critic-bce", "data.sampler=pairs", "stage1.loss=bce")))
    for name, options in VERIFIABLE.items():
        result = train(config_of("verifiable", f"verifiable-{name}", "data.sampler=all",
                                 f"stage2.critic_checkpoint={critic.model_dir}", *options))
        assert_ran(result, "weights/mean", "value/loss")
    reference = train(config_of("ref_tuning", "ref", "data.sampler=correct_only"))
    for name, options in RHO1.items():
        result = train(config_of("rho1", f"rho1-{name}", "data.sampler=correct_only",
                                 f"rho1.reference_model={reference.model_dir}", *options))
        assert_ran(result, "weights/mean", "weights/selected")
    for name, options in GRAD_NORM.items():
        result = train(config_of("grad_norm", f"grad_norm-{name}", "data.sampler=correct_only", *options))
        assert_ran(result, "weights/mean", "weights/grad_norm_head1")
