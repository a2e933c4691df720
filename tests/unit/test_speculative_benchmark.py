"""Smoke test of benchmarks/speculative_decoding.py: train a tiny model on whole programs, decode both ways."""

from __future__ import annotations

import json
import subprocess
import sys


def test_benchmark_trains_decodes_and_compares(repo_root, shared_data, tmp_path):
    figures = tmp_path / "figures.json"
    command = [
        sys.executable, str(repo_root / "benchmarks" / "speculative_decoding.py"),
        "--raw-data", str(shared_data), "--work-dir", str(tmp_path / "work"), "--json", str(figures),
        "--heads", "3", "--trunk-layers", "1", "--dim", "64", "--vocab-size", "300", "--steps", "3",
        "--train-programs", "4", "--prompts", "1", "--max-new-tokens", "6", "--repeats", "1",
        "--train-threads", "1",
    ]
    run = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "on 4 programs" in run.stdout  # whole programs, not windows of a token stream
    assert (tmp_path / "work" / "model" / "config.json").is_file()

    results = json.loads(figures.read_text())
    assert set(results) == {"trained-on (MBPP train)", "held-out (MBPP valid.)", "held-out (MBPP test)"}
    for rows in results.values():
        assert [row["heads"] for row in rows] == [3]  # default: min(4, n) and n, here both 3
        for row in rows:
            assert row["mismatches"] == 0  # speculative output is plain greedy's, token for token
            assert len(row["acceptance"]) == 2
            assert 1.0 <= row["tokens_per_forward"] <= 3.0
            assert row["speculative_tok_s"] > 0 and row["plain_tok_s"] > 0
