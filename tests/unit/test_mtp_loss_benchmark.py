"""Smoke test of benchmarks/mtp_loss_memory.py: one configuration measured in its own process, and the table."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest


@pytest.fixture(scope="module")
def bench(repo_root):
    spec = importlib.util.spec_from_file_location("mtp_loss_memory", repo_root / "benchmarks" / "mtp_loss_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is read from /proc")
@pytest.mark.parametrize("loss", ["naive", "efficient"])
def test_worker_measures_a_positive_peak_and_step_time(bench, loss):
    """Through the driver, as the benchmark runs it: a fresh process per configuration, since the peak
    is the process's resident high-water mark above its state right after importing torch."""
    args = argparse.Namespace(
        shape="micro", batch=2, seq=32, dtype="float32", device="cpu", repeats=1,
        chunk_size=16, threads=1, activation_checkpointing=False,
    )
    result = bench.run_configuration(args, loss, 2)
    assert result.loss == loss and result.n == 2
    assert result.peak_bytes > 0 and result.step_s > 0
    assert result.flops == bench.forward_flops_per_token(bench.SHAPES["micro"], 2, 32)


def test_table_reports_ratios_to_one_head(bench, capsys):
    results = [
        bench.Result(loss, n, peak_bytes=2**20 * (100 + (n - 1) * (50 if loss == "naive" else 5)), step_s=n, flops=n)
        for loss in bench.LOSSES
        for n in bench.HEAD_COUNTS
    ]
    bench.print_table(results)
    out = capsys.readouterr().out
    assert "naive       4     250.0   2.50" in out
    assert "efficient   4     115.0   1.15" in out
    assert "n=4: efficient / naive: peak 0.46x, step time 1.00x" in out


def test_the_record_renders_with_its_target(bench, repo_root, tmp_path):
    results = [bench.Result("efficient", n, peak_bytes=2**20 * (100 + 2 * n), step_s=1 + 0.1 * n, flops=n) for n in bench.HEAD_COUNTS]
    args = argparse.Namespace(shape="micro", batch=2, seq=32, dtype="float32", device="cpu", threads=1, chunk_size=16)
    bench.write_record(args, results, tmp_path / "loss.json")
    spec = importlib.util.spec_from_file_location("benchmark_report", repo_root / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    page = report.render(tmp_path)
    assert "| efficient | 4 | 108.0 | 1.06x | 1.400 | 1.27x | 4.00x | missed: step 1.27x > 1.25x |" in page
