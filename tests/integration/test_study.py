"""`wmtp study` at smoke scale (micro model): every cell runs, a killed study resumes at its next cell,
and the report is generated from the cells alone."""

from __future__ import annotations

import json

import pytest

import weighted_mtp.study as study_module
from weighted_mtp.cli import main
from weighted_mtp.study import Study, render_results


def smoke_study(in_tmp_repo, shared_data) -> Study:
    return Study("smoke", results=in_tmp_repo / "docs" / "results" / "smoke", overrides=[f"paths.raw_data={shared_data}", "device=cpu", "tracking.enabled=false"])


def test_a_killed_study_resumes_at_its_next_unfinished_cell(in_tmp_repo, shared_data, monkeypatch):
    study = smoke_study(in_tmp_repo, shared_data)
    real = study_module.run_cell
    calls = []

    def killed_on_second(study, cell):
        calls.append(cell.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would, before the cell writes its result
        return real(study, cell)

    monkeypatch.setattr(study_module, "run_cell", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        study.run(only="rollout")
    assert study.result_path("rollout-train").is_file()
    assert not study.result_path("rollout-validation").exists()
    monkeypatch.setattr(study_module, "run_cell", real)
    assert study.run(only="rollout") == ["rollout-validation"]
    assert study.run(only="rollout") == []  # finished cells are never run again
    train = json.loads(study.result_path("rollout-train").read_text())
    assert train["n_problems"] == 4 and train["correct"]["gold"] == 4 and train["wall_s"] > 0


def test_a_fresh_clone_rebuilds_only_the_outputs_its_next_cell_reads(in_tmp_repo, shared_data):
    """Results are committed, rollouts and trained models are not: a finished cell runs again only
    when an unfinished one reads what it made, and its seeded rollouts come out the same."""
    study = smoke_study(in_tmp_repo, shared_data)
    assert study.run(only="rollout") == ["rollout-train", "rollout-validation"]
    first = (study.root / "rollouts" / "train.jsonl").read_text()
    (study.root / "rollouts" / "train.jsonl").unlink()
    (study.root / "rollouts" / "validation.jsonl").unlink()
    assert study.run(only="rollout") == []  # nothing unfinished reads them
    assert study.run(only="train-critic") == ["rollout-train", "rollout-validation", "train-critic"]
    assert (study.root / "rollouts" / "train.jsonl").read_text() == first
    assert study.run(only="critic-report") == ["critic-report"]  # the critic is still here


def test_every_cell_of_the_smoke_study_runs_and_the_report_reads_them(in_tmp_repo, shared_data, capsys):
    overrides = [f"paths.raw_data={shared_data}", "device=cpu", "tracking.enabled=false"]
    assert main(["study", "run", "--scale", "smoke", *overrides]) == 0
    study = smoke_study(in_tmp_repo, shared_data)
    done = study.finished()
    assert set(done) == {cell.name for cell in study.cells()}
    assert done["train-verifiable"]["steps"] == 2 and done["train-ntp"]["steps"] == 2
    assert done["critic-report"]["gold_pairs"] > 0
    assert done["eval-mtp-mbpp-sampled"]["pass_at_k"].keys() == {"1", "2"}

    out = in_tmp_repo / "RESULTS.md"
    assert main(["study", "report", "--scale", "smoke", "--out", str(out), *overrides]) == 0
    text = out.read_text()
    assert f"Cells finished: {len(done)} of {len(done)}." in text
    assert "not run yet" not in text
    assert "![training curves](docs/results/smoke/training-curves.png)" in text
    assert (in_tmp_repo / "docs" / "results" / "smoke" / "pass-at-1-mbpp.png").is_file()
    for arm in ("base", "ntp", "mtp", "verifiable", "rho1_tokenskip", "rho1_weighted"):
        assert f"| {arm} | 0.0 [0.0, 0.0]" in text  # the random micro model solves nothing
    assert main(["study", "status", "--scale", "smoke", *overrides]) == 0
    assert "todo" not in capsys.readouterr().out


def test_the_report_of_an_unstarted_study_says_what_is_missing(in_tmp_repo, shared_data):
    study = smoke_study(in_tmp_repo, shared_data)
    text = render_results(study)
    assert "Cells finished: 0 of" in text and "not run yet" in text and "## Notes" not in text
    study.cells_dir.mkdir(parents=True)
    (study.cells_dir / "NOTES.md").write_text("The rollouts were made twice.\n")
    assert "## Notes on how the cells were run\n\nThe rollouts were made twice." in render_results(study)


def test_every_language_model_arm_of_the_cpu_study_trains_the_same_parts(in_tmp_repo, shared_data):
    """LoRA trunk, full-rank head blocks, frozen unembedding, heads alone first: in ntp, mtp and the
    weighted arms alike; the critic keeps its recipe's (a value head on a frozen model)."""
    study = Study("cpu", root=in_tmp_repo / "study", overrides=[f"paths.raw_data={shared_data}"])
    for arm in ("ntp", "mtp", "verifiable", "rho1_tokenskip", "rho1_weighted"):
        training = study.training_config(arm).training
        assert (training.lora.enabled, training.freeze.trunk, training.freeze.heads) == (False, "lora", "train"), arm
        assert (training.freeze.unembedding, training.freeze.trunk_steps, training.max_steps) == ("frozen", 30, 120), arm
    critic = study.training_config("critic").training
    assert critic.freeze.trunk_steps is None and critic.freeze.unembedding == "as_heads"


def test_paired_p_values_keep_two_significant_digits():
    from weighted_mtp.study import format_p

    assert format_p(1.0) == "1"
    assert format_p(0.1904) == "0.19"
    assert format_p(0.000324) == "0.00032"  # the ntp arm's +22 / -5 is not "0.00"
    assert format_p(3.2e-7) == "3.2e-07"
