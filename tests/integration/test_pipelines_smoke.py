"""Every experiment pipeline, end to end on the micro model: critic -> verifiable, ref_tuning -> rho1, rollouts.

Runs are a few steps of 64-token sequences; what is checked is behaviour (values reloaded equal the
critic's, weights inside the clip range, the selected fraction), not learning progress.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from fixtures.pipelines import pipeline_config, write_pair_rollouts

from weighted_mtp.objectives import Rho1Objective, VerifiableObjective, build_objective
from weighted_mtp.train.run import train

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One resolved tokenizer for every run of the session (the micro model's)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture
def raw_data(in_tmp_repo: Path, shared_data: Path) -> Path:
    return write_pair_rollouts(in_tmp_repo / "raw", shared_data)




@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list:
    """(objective, model, its trainable modules as built) of every run `train` builds, in order."""
    built: list = []

    def recording(config, model, device):
        objective = build_objective(config, model, device)
        built.append((objective, model, copy.deepcopy(objective.trainable_modules())))
        return objective

    monkeypatch.setattr("weighted_mtp.train.run.build_objective", recording)
    return built


def test_critic_then_verifiable_from_the_critics_export(raw_data, models_dir, made):
    critic_config = pipeline_config(
        "critic",
        raw_data,
        models_dir,
        "data.dataset=rollouts",
        "data.sampler=pairs",
        "training.max_steps=3",
        "data.val_split=validation",
        "training.eval_every=3",
    )
    critic = train(critic_config)
    critic_objective, critic_model, _ = made[0]
    assert critic.steps == 3 and (critic.model_dir / "value_head.safetensors").is_file()
    assert 0.0 <= critic.val_metrics["val/value/auc"] <= 1.0
    assert critic.val_metrics["val/value/pass_rate"] == 0.5  # pairs: one correct, one incorrect
    assert all(math.isfinite(step["loss"]) for step in critic.history)

    verifiable_config = pipeline_config(
        "verifiable",
        raw_data,
        models_dir,
        "data.dataset=rollouts",
        "data.sampler=all",
        "training.max_steps=2",
    )
    result = train(verifiable_config)
    probe = torch.randn(2, 5, critic_model.args.dim)
    with torch.no_grad():
        torch.testing.assert_close(made[1][2]["value_head"](probe), critic_objective.value_head.cpu()(probe))
    clip = verifiable_config.stage2.value_weighting
    assert clip.weight_normalization == "mean1"
    for step in result.history:  # clipped, then rescaled to mean 1 over the steps: the spread stays bounded
        assert 0 < step["weights/min"] < step["weights/max"]
        assert step["weights/max"] / step["weights/min"] <= clip.weight_clip_max / clip.weight_clip_min + 1e-6
        assert 0.5 < step["weights/mean"] < 1.5
        assert step["weights/std"] > 0 and math.isfinite(step["value/loss"])
    assert (result.model_dir / "value_head.safetensors").is_file()


def test_verifiable_resumes_with_the_old_value_snapshot_of_its_checkpoint(raw_data, models_dir, made):
    critic_config = pipeline_config(
        "critic", raw_data, models_dir, "data.dataset=rollouts", "data.sampler=pairs", "training.max_steps=1"
    )
    train(critic_config)
    critic_head = made[0][0].value_head.cpu()

    # refreshed after step 2 (the checkpoint), not after step 3: the end state is step 2's head
    overrides = ("data.dataset=rollouts", "data.sampler=all", "training.max_steps=3", "training.save_every=2",
                 "training.keep_last=3", "stage2.value_loss.old_values_refresh_every=2",
                 "stage2.value_weighting.td_error_normalization=ema", "stage2.value_weighting.ema_warmup=1",
                 "stage2.value_weighting.ema_momentum=0.5")  # the running score statistics must resume too  # fmt: skip
    config = pipeline_config("verifiable", raw_data, models_dir, *overrides)
    uninterrupted = train(config)
    snapshot = {k: v.clone() for k, v in made[1][0].old_value_head.state_dict().items()}
    assert any(not torch.equal(v, critic_head.state_dict()[k]) for k, v in snapshot.items())  # refreshed

    checkpoints = config.run_dir / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000003")  # as if killed after step 2's checkpoint
    resumed = train(config, resume=True)
    assert resumed.resumed_from == checkpoints / "step_00000002"
    for name, tensor in made[2][0].old_value_head.state_dict().items():
        assert torch.equal(tensor, snapshot[name]), name
    step_3, resumed_step_3 = uninterrupted.history[-1], resumed.history[-1]
    for key in ("loss", "value/mean", "value/loss", "value/clip_fraction", "weights/mean", "weights/std"):
        assert resumed_step_3[key] == pytest.approx(step_3[key], rel=1e-6, abs=1e-9), key
    assert made[2][0].score_moments == made[1][0].score_moments  # restored, then updated by step 3 alike


def test_verifiable_without_a_critic_names_the_command_to_run_first(raw_data, models_dir):
    from weighted_mtp.errors import CheckpointError

    config = pipeline_config("verifiable", raw_data, models_dir, "data.dataset=rollouts", "data.sampler=all")
    with pytest.raises(CheckpointError, match="wmtp train --recipe critic"):
        VerifiableObjective.from_config(config, None, CPU)


def test_ref_tuning_then_rho1_against_the_tuned_reference(raw_data, models_dir, made):
    reference_config = pipeline_config(
        "ref_tuning", raw_data, models_dir, "training.max_steps=1", "data.n_samples=4"
    )
    reference = train(reference_config)
    assert (reference.model_dir / "config.json").is_file()

    rho1_config = pipeline_config(
        "rho1",
        raw_data,
        models_dir,
        "training.max_steps=2",
        "data.n_samples=8",
        "rho1.top_k_ratio=0.5",
    )
    result = train(rho1_config)
    objective = made[1][0]
    assert objective.reference.n_future_tokens == 1  # the ref_tuning export, not the 2-head policy
    assert all(not p.requires_grad for p in objective.reference.parameters())
    for step in result.history:
        assert step["weights/selected"] == pytest.approx(0.5, abs=0.02)


def test_rho1_without_a_reference_names_the_command_to_run_first(raw_data, models_dir):
    from weighted_mtp.errors import CheckpointError

    config = pipeline_config("rho1", raw_data, models_dir)
    with pytest.raises(CheckpointError, match="wmtp train --recipe ref_tuning"):
        Rho1Objective.from_config(config, None, CPU)


def test_rollout_labels_are_what_the_sandbox_says(raw_data, models_dir):
    from weighted_mtp.cli import main
    from weighted_mtp.eval.benchmarks import get_benchmark
    from weighted_mtp.eval.sandbox import Sandbox

    out = raw_data / "rollouts" / "train.jsonl"  # where the rollouts dataset reads: prepared as well
    status = main([
        "rollout", "--recipe", "critic", "--preset", "local-light", "--use-micro-model", "--limit", "2",
        "--n-samples", "2", "--workers", "1", "--out", str(out), f"paths.raw_data={raw_data}",
        f"paths.rollouts={raw_data / 'rollouts'}",
        f"paths.models={models_dir}", "device=cpu", "tracking.enabled=false", "rollout.max_new_tokens=16",
    ])  # fmt: skip
    assert status == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 6 and {r["problem_id"] for r in records} == {"mbpp/601", "mbpp/602"}
    assert [r["source"] for r in records] == ["model", "model", "gold"] * 2
    assert all(r["is_correct"] for r in records if r["source"] == "gold")  # MBPP 601 and 602 gold pass
    benchmark = get_benchmark("mbpp")
    problems = {p.problem_id: p for p in benchmark.load(raw_data, "train", 2)}
    with Sandbox(1) as sandbox:
        for record in records:
            problem = problems[record["problem_id"]]
            assert record["program"] == benchmark.extract(problem, record["output"])
            assert sandbox.run(benchmark.program(problem, record["program"])).passed == record["is_correct"]
    prepared = Path("storage/datasets/rollouts/processed/train_metadata.json")
    assert json.loads(prepared.read_text())["n_solutions"] == 6
    summary = json.loads(out.with_name("train.summary.json").read_text())
    assert summary["n_samples"] == 6 and summary["correct"]["gold"] == 2
    assert not out.with_name("train.jsonl.partial").exists()


def test_pairwise_and_lambda_return_critics_train_and_feed_verifiable(raw_data, models_dir):
    overrides = ("data.dataset=rollouts", "data.sampler=pairs", "training.max_steps=2", "data.val_split=validation",
                 "training.eval_every=2", "stage1.loss=mse", "stage1.pairwise_coefficient=0.5")  # fmt: skip
    critic = train(pipeline_config("critic", raw_data, models_dir, *overrides))
    assert all(math.isfinite(step["value/pairwise_loss"]) for step in critic.history)
    assert 0.0 <= critic.val_metrics["val/value/pair_accuracy"] <= 1.0
    bootstrapped = pipeline_config("critic", raw_data, models_dir, *overrides[:-2], "stage1.loss=bce",
                                   "stage1.targets=lambda_return", "experiment.name=critic_lambda")  # fmt: skip
    assert all(math.isfinite(step["loss"]) for step in train(bootstrapped).history)
    pairwise_only = pipeline_config("critic", raw_data, models_dir, *overrides[:-2], "stage1.loss=pairwise",
                                    "experiment.name=critic_pairwise")  # fmt: skip
    assert train(pairwise_only).steps == 2
    verifiable = pipeline_config(
        "verifiable", raw_data, models_dir, "data.dataset=rollouts", "data.sampler=all", "training.max_steps=1",
        f"stage2.critic_checkpoint={pairwise_only.run_dir / 'final'}",
    )
    assert math.isfinite(train(verifiable).history[0]["loss"])


def test_a_pairwise_critic_without_pairs_names_the_sampler(raw_data, models_dir):
    from weighted_mtp.errors import ConfigError
    from weighted_mtp.objectives import CriticObjective

    config = pipeline_config("critic", raw_data, models_dir, "data.dataset=rollouts", "data.sampler=all",
                             "stage1.loss=pairwise")  # fmt: skip
    with pytest.raises(ConfigError, match="set data.sampler=pairs"):
        CriticObjective.from_config(config, None, CPU)


def test_each_validation_draws_the_weights_of_a_weighted_run_but_not_of_the_baseline(raw_data, models_dir):
    validated = ("data.dataset=rollouts", "data.val_split=validation", "training.eval_every=2", "training.max_steps=2")
    critic = train(pipeline_config("critic", raw_data, models_dir, "data.sampler=pairs", *validated))
    assert not (critic.run_dir / "plots").exists()  # no LM weights to draw
    verifiable = train(pipeline_config("verifiable", raw_data, models_dir, "data.sampler=all",
                                       f"stage2.critic_checkpoint={critic.model_dir}", *validated))
    (plot,) = sorted((verifiable.run_dir / "plots").glob("weights-step_*.png"))
    assert plot.name == "weights-step_000002.png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    baseline = train(pipeline_config("baseline", raw_data, models_dir, "data.sampler=correct_only", *validated))
    assert not (baseline.run_dir / "plots").exists()  # every weight is 1


def test_the_trunk_waits_for_the_heads_for_trunk_steps_then_trains(raw_data, models_dir):
    """`training.freeze.trunk_steps: 2`: after 2 steps the trunk blocks are the initial ones and the heads
    moved; a run resumed to 4 steps trains the trunk too (the phase follows the step)."""
    from safetensors.torch import load_file

    from weighted_mtp.models.loading import load_model

    overrides = ("training.freeze.trunk_steps=2", "training.save_every=2")
    config = pipeline_config("baseline", raw_data, models_dir, "training.max_steps=2", *overrides)
    initial = load_model("micro", n_future_tokens=2, models_dir=models_dir, seed=config.seed)[0].state_dict()
    first = train(config)
    after_two = load_file(first.model_dir / "model.safetensors")
    trunk_block, head_block = "layers.0.attention.wq.weight", "extra_heads.0.attention.wq.weight"
    assert torch.equal(after_two[trunk_block], initial[trunk_block])
    assert not torch.equal(after_two[head_block], initial[head_block])
    later = train(pipeline_config("baseline", raw_data, models_dir, "training.max_steps=4", *overrides))
    assert later.resumed_from is not None
    assert not torch.equal(load_file(later.model_dir / "model.safetensors")[trunk_block], initial[trunk_block])


def test_trunk_steps_are_refused_under_fsdp_before_anything_is_sharded(raw_data, models_dir):
    from weighted_mtp.errors import ConfigError
    from weighted_mtp.train import distributed as D
    from weighted_mtp.train.run import build_run
    from weighted_mtp.train.trainer import Trainer

    config = pipeline_config("baseline", raw_data, models_dir, "training.freeze.trunk_steps=2",
                             "distributed.strategy=fsdp")  # fmt: skip
    env = D.DistEnv(world_size=2, strategy="fsdp")  # no process group: the check comes before any collective
    run = build_run(config, D.DistEnv())
    with pytest.raises(ConfigError, match="training.freeze.trunk_steps: not with FSDP"):
        Trainer(config, run.model, run.objective, run.train_loader, env=env)
