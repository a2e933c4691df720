"""`wmtp demo` end to end at smoke scale: every stage runs and the table holds what it measured."""

from __future__ import annotations

import json

import pytest

from weighted_mtp.cli import main
from weighted_mtp.eval.passk import exact_mcnemar_p


def test_exact_mcnemar_against_the_binomial_tail():
    from math import comb

    assert exact_mcnemar_p(0, 0) == 1.0
    # 1 vs 6 discordant: 2 * P(X <= 1), X ~ Binomial(7, 1/2)
    assert exact_mcnemar_p(1, 6) == pytest.approx(2 * (comb(7, 0) + comb(7, 1)) / 2**7)
    assert exact_mcnemar_p(6, 1) == exact_mcnemar_p(1, 6)
    assert exact_mcnemar_p(3, 3) == 1.0


def run_demo_cli(in_tmp_repo, shared_data, capsys, *extra):
    status = main([
        "demo", "--scale", "smoke", "--config", str(in_tmp_repo / "configs" / "defaults.yaml"), *extra,
        f"paths.raw_data={shared_data}", "device=cpu", "tracking.enabled=false",
    ])  # fmt: skip
    assert status == 0
    return capsys.readouterr().out


def check_result(out: str, root) -> dict:
    result = json.loads((root / "demo.json").read_text())
    assert result["before"]["problems"] == result["after"]["problems"] == 2
    assert result["rollouts"]["train"]["correct"]["gold"] == 3  # MBPP train 601-603: gold passes
    assert result["critic"]["gold_pairs"] > 0 and 0.0 <= result["critic"]["gold_auc"] <= 1.0
    assert {s["name"] for s in result["stages"]} == {
        "evaluate base", "rollout train", "rollout validation", "train critic", "critic report",
        "train verifiable", "evaluate trained",
    }
    assert result["weights"]["steps"] == 2 and result["weights"]["min"] <= result["weights"]["max"]
    assert (root / "runs" / "verifiable" / "final").is_dir()
    assert (root / "training-curves.png").is_file() and result["locations"]["plots"].endswith("training-curves.png")
    for label in ("pass@1 before", "pass@1 after", "critic AUC (a)", "critic AUC (b)", "token weights", "total"):
        assert label in out
    return result


def test_micro_model_demo_runs_every_stage_and_twice_without_collision(in_tmp_repo, shared_data, capsys):
    out = run_demo_cli(in_tmp_repo, shared_data, capsys, "--use-micro-model", "--preset", "local-light")
    roots = sorted((in_tmp_repo / "storage" / "demo").iterdir())
    assert len(roots) == 1
    check_result(out, roots[0])
    run_demo_cli(in_tmp_repo, shared_data, capsys, "--use-micro-model", "--preset", "local-light")
    assert len(list((in_tmp_repo / "storage" / "demo").iterdir())) == 2


def test_smollm2_demo_at_smoke_scale(in_tmp_repo, shared_data, capsys):
    out = run_demo_cli(in_tmp_repo, shared_data, capsys)
    (root,) = (in_tmp_repo / "storage" / "demo").iterdir()
    result = check_result(out, root)
    assert result["model"] == "smollm2-135m"
