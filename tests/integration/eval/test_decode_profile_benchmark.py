"""benchmarks/decode_profile.py on the real SmolLM2 with a few new tokens: both dtypes profiled at two
batch sizes, the groups' shares add up to one, every weight shape timed, and the record renders with
the decoding comparison's reasons. Slow."""

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
        [sys.executable, str(repo_root / "benchmarks" / "decode_profile.py"), "--new-tokens", "4", "--batch", "2", "--threads", "1",
         "--raw-data", str(shared_data), "--models", str(tmp_path / "models"), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [(row["dtype"], row["batch"]) for row in record["rows"]] == [
        ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)
    ]
    for row in record["rows"]:
        assert sum(row["share"].values()) == pytest.approx(1.0) and row["profiled_ms_per_step"]["weights"] > 0
    for kernels in record["kernels"].values():
        assert {tuple(k["shape"]) for k in kernels} >= {(576, 576), (49152, 576)}
    spec = importlib.util.spec_from_file_location("benchmark_report", repo_root / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    generation = {"benchmark": "generation_vs_transformers", "rows": [
        {"dtype": "float32", "batch": 2, "ratio": 1.1, "transformers_tok_s": 1.0, "ours_tok_s": 1.1}]}
    page = report.profile_section(record, generation)
    assert "## Why decoding is where it is: a profile" in page
    (reason,) = [line for line in page if line.startswith("- float32, batch 2: ")]
    assert "weight products alone would allow" in reason  # 2 tok/s needed, the products allow far more
