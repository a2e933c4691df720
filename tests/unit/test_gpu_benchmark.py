"""benchmarks/gpu_training.py runs (its `--quick` mode: tiny shapes on the CPU, gloo, the same code
path as on the GPU) and its record renders in docs/BENCHMARKS.md; the GPU run itself waits for a device."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys


def test_the_gpu_benchmark_runs_in_quick_mode_and_reports(repo_root, tmp_path):
    out = tmp_path / "results" / "gpu_training.json"
    done = subprocess.run([sys.executable, str(repo_root / "benchmarks" / "gpu_training.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    (row,) = record["training"]
    assert record["benchmark"] == "gpu_training" and record["matmul_tflops"] > 0 and record["copy_gb_s"] > 0
    assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and 0 < row["mfu_of_measured"]
    assert row["first_loss"] > 5.0  # log(512) = 6.2 for a random model
    assert "efficient   4" in record["loss_benchmark"]

    spec = importlib.util.spec_from_file_location("benchmark_report", repo_root / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    page = report.render(out.parent)
    assert "## One GPU: bf16 FSDP2 training of a 1B-class MTP model" in page and "Not run yet" not in page
    assert "Not run yet" in report.render(tmp_path)
