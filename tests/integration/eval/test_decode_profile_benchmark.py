"""benchmarks/decode_profile.py on the real SmolLM2 with two new tokens: both dtypes profiled, the
groups' shares add up to one, every weight shape timed both ways, and the record renders. Slow."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_decode_profile_groups_the_time_and_renders(repo_root, shared_data, tmp_path):
    out = tmp_path / "decode_profile.json"
    done = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "decode_profile.py"), "--new-tokens", "2", "--threads", "1",
         "--raw-data", str(shared_data), "--models", str(tmp_path / "models"), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [row["dtype"] for row in record["rows"]] == ["float32", "bfloat16"]
    for row in record["rows"]:
        assert sum(row["share"].values()) == pytest.approx(1.0) and row["share"]["weights"] > 0
        assert {tuple(k["shape"]) for k in row["kernels"]} >= {(576, 576), (49152, 576)}
    spec = importlib.util.spec_from_file_location("benchmark_report", repo_root / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert "## Why batch-1 decoding is where it is: a profile" in report.render(tmp_path)
