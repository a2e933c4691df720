"""CodeContests through `wmtp eval`: files in the published schema, stdin/stdout tests, the problem's
time limit and CodeContests' output checker, down to the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.codecontests import codecontests_row, write_codecontests

SUM = "a, b = map(int, input().split())\nprint(a + b)\n"
SUM_ABS = "a, b = map(int, input().split())\nprint(abs(a + b))\n"  # passes public and private, not generated
# Prints the sums with CRLF line ends, tabs and trailing blanks: the checker compares tokens.
SUMS_MESSY = (
    "import sys\nn = int(input())\nrows = [sum(map(int, input().split())) for _ in range(n)]\n"
    "sys.stdout.write('\\t'.join(map(str, rows)) + '   \\r\\n\\r\\n')\n"
)
THIRD = "n = int(input())\nprint(f'{1 / n:.7f}')\n"  # expected outputs carry 9 decimals: within 1e-5
YES_NO = "n = int(input())\nprint('Yes' if n % 2 == 0 else 'No')\n"  # expected YES / NO: case-insensitive
# Needs ~1.5 CPU seconds: over the 1 s limit of "Slow", within the 3 s of "Slow, generous".
BURN_1_5_S = "import time\nstart = time.process_time()\nwhile time.process_time() - start < 1.5:\n    pass\n" + SUM


def problems() -> list[dict]:
    return [
        codecontests_row(
            "1_A. Sum", "Print a + b.",
            public=[("1 2\n", "3\n")], private=[("5 7\n", "12\n"), ("0 0\n", "0\n")],
            generated=[("10 -13\n", "-3\n")],
            solutions=[("CPP", "int main(){}\n"), ("PYTHON", "print 3\n"), ("PYTHON3", SUM)],
            incorrect_solutions=[("PYTHON3", SUM_ABS), ("JAVA", "class Main {}\n")],
        ),
        codecontests_row(
            "2_B. Many sums", "Print the sum of each line, separated by whitespace.",
            public=[("2\n1 2\n3 4\n", "3 7\n")], private=[("3\n1 1\n2 2\n3 3\n", "2\n4\n6\n")],
            solutions=[("PYTHON3", SUMS_MESSY)],
        ),
        codecontests_row(
            "3_C. Reciprocal", "Print 1/n.", public=[("3\n", "0.333333333\n")], private=[("8\n", "0.125000000\n")],
            solutions=[("PYTHON3", THIRD)],
        ),
        codecontests_row(
            "4_D. Parity", "Print YES if n is even.", public=[("2\n", "YES\n")], private=[("7\n", "NO\n")],
            solutions=[("PYTHON3", YES_NO)],
        ),
        codecontests_row(
            "5_E. Slow", "Print a + b within one second.", public=[("1 2\n", "3\n")], private=[("2 2\n", "4\n")],
            solutions=[("PYTHON3", SUM)], time_limit_s=1.0,
        ),
        codecontests_row(
            "6_F. Slow, generous", "Print a + b within three seconds.", public=[("1 2\n", "3\n")],
            solutions=[("PYTHON3", SUM)], time_limit_s=3.0,
        ),
    ]


def wmtp_eval(cwd: Path, raw: Path, *args: str) -> dict:
    report = cwd / "report.json"
    command = [
        sys.executable, "-m", "weighted_mtp", "eval", "--benchmark", "codecontests", "--split", "test",
        "--output", str(report), *args, f"paths.raw_data={raw}", "tracking.enabled=false",
    ]
    done = subprocess.run(command, check=False, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pass@1" in done.stderr  # the summary table
    return json.loads(report.read_text())


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_reference_solutions_pass_and_known_incorrect_fail(in_tmp_repo: Path, fmt: str) -> None:
    raw = in_tmp_repo / "raw"
    write_codecontests(raw, "test", problems(), fmt)
    report = wmtp_eval(in_tmp_repo, raw, "--reference-solutions")
    samples = {s["task_id"]: s for s in report["samples"]}
    assert set(samples) == {f"codecontests/{row['name']}" for row in problems()}
    assert report["n_passed"] == report["n_samples"] == 6, report["error_counts"]
    assert report["pass_at_k"]["1"]["mean"] == 1.0
    assert samples["codecontests/1_A. Sum"]["program"] == SUM  # the first PYTHON3 solution, not C++ or Python 2

    incorrect = in_tmp_repo / "incorrect.jsonl"
    incorrect.write_text(json.dumps({"task_id": "codecontests/1_A. Sum", "completion": SUM_ABS}) + "\n")
    (sample,) = wmtp_eval(in_tmp_repo, raw, "--samples", str(incorrect))["samples"]
    assert (sample["status"], sample["error_class"], sample["failed_case"]) == ("failed", "WrongAnswer", 3)


def test_samples_verdicts_and_pass_at_k(in_tmp_repo: Path) -> None:
    raw = in_tmp_repo / "raw"
    write_codecontests(raw, "test", problems(), "jsonl")
    completions = {
        "codecontests/1_A. Sum": [
            f"Here is my solution:\n```python\n{SUM}```\n",
            "print(3)\n",  # right on the public test only
            "a, b = map(int, input().split())\nprint(a // (b - b))\n",
        ],
        "codecontests/5_E. Slow": [SUM, BURN_1_5_S, "while True:\n    pass\n"],
        "codecontests/6_F. Slow, generous": [BURN_1_5_S, "import sys\nsys.exit(3)\n", "print(input())\n"],
    }
    samples_file = in_tmp_repo / "samples.jsonl"
    samples_file.write_text(
        "".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, cs in completions.items() for c in cs)
    )
    report = wmtp_eval(in_tmp_repo, raw, "--samples", str(samples_file), "--k", "1,2,3")
    # A time limit is CPU time; on a crowded machine the wall-clock backstop (3x) can come first.
    limit_hit = {"CPUTimeLimit": "TimeLimit", "WallClockLimit": "TimeLimit"}
    verdicts = [
        (s["task_id"].split(". ")[1], s["status"], limit_hit.get(s["error_class"], s["error_class"]), s["failed_case"])
        for s in report["samples"]
    ]
    assert verdicts == [
        ("Sum", "passed", None, None),
        ("Sum", "failed", "WrongAnswer", 1),  # the first private test
        ("Sum", "failed", "ZeroDivisionError", 0),
        ("Slow", "passed", None, None),
        ("Slow", "timeout", "TimeLimit", 0),  # the problem's 1 s, not the default 10 s
        ("Slow", "timeout", "TimeLimit", 0),
        ("Slow, generous", "passed", None, None),  # the same program within 3 s
        ("Slow, generous", "failed", "SystemExit", 0),  # sys.exit(3)
        ("Slow, generous", "failed", "WrongAnswer", 0),
    ]
    timeouts = [s for s in report["samples"] if s["status"] == "timeout"]
    assert all(s["duration_s"] < 5.0 for s in timeouts), [s["duration_s"] for s in timeouts]
    errors = report["error_counts"]
    assert errors.pop("CPUTimeLimit", 0) + errors.pop("WallClockLimit", 0) == 2
    assert errors == {"WrongAnswer": 2, "ZeroDivisionError": 1, "SystemExit": 1}
    assert [(row["n"], row["c"]) for row in report["per_problem"]] == [(3, 1), (3, 1), (3, 1)]
    # n = 3, c = 1 for every problem: pass@1 = 1/3, pass@2 = 1 - C(2,2)/C(3,2) = 2/3, pass@3 = 1.
    means = {k: v["mean"] for k, v in report["pass_at_k"].items()}
    assert means == pytest.approx({"1": 1 / 3, "2": 2 / 3, "3": 1.0})
