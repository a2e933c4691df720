"""`make bench`'s report path in a quick mode: the generation comparison writes its JSON and the
report turns it into a table. Nothing here is timed; the figures are whatever the run measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_generation_comparison_reports_every_dtype_and_batch(tmp_path, shared_data):
    pytest.importorskip("transformers")
    results = tmp_path / "results"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "generation_vs_transformers.py"), "--raw-data", str(shared_data),
        "--models-dir", str(tmp_path / "models"), "--prompts", "2", "--new-tokens", "4", "--batch", "2",
        "--repeats", "1", "--compiled-dtypes", "", "--json", str(results / "generation_vs_transformers.json"),
    ]  # compiling SmolLM2 takes minutes; the compiled step's outputs are tested in tests/unit/test_generation.py
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    record = json.loads((results / "generation_vs_transformers.json").read_text())
    assert [(row["dtype"], row["batch"]) for row in record["rows"]] == [
        ("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)
    ]
    assert all(row["ours_tok_s"] > 0 and row["transformers_tok_s"] > 0 for row in record["rows"])
    assert record["rows"][0]["identical_rows"] == 2  # float32 greedy: the same tokens as transformers
    out = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--results", str(results), "--out", str(out)],
                   check=True, capture_output=True, text=True)  # fmt: skip
    page = out.read_text()
    assert page.count("| float32 |") == 2 and page.count("| bfloat16 |") == 2
    assert "of bandwidth limit" in page and ("met" in page or "missed" in page)


def test_the_training_comparison_reports_its_ratio_and_equal_first_losses(tmp_path, shared_data):
    pytest.importorskip("transformers")
    results = tmp_path / "results"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "training_vs_transformers.py"), "--raw-data", str(shared_data),
        "--models-dir", str(tmp_path / "models"), "--batch", "1", "--length", "16", "--steps", "1", "--warmup", "0",
        "--json", str(results / "training_vs_transformers.json"),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    fp32, bf16 = json.loads((results / "training_vs_transformers.json").read_text())["rows"]
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16")
    assert fp32["first_loss_ours"] == pytest.approx(fp32["first_loss_transformers"], rel=1e-4)  # same weights, same data
    assert bf16["first_loss_ours"] == pytest.approx(bf16["first_loss_transformers"], rel=3e-2)  # bf16 rounding
    row = fp32
    out = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--results", str(results), "--out", str(out)],
                   check=True, capture_output=True, text=True)  # fmt: skip
    assert row["profile_s"]["ours"]["matrix products"] > 0 and row["profile_s"]["transformers"]["optimizer"] > 0
    page = out.read_text()
    assert "## A training step against transformers" in page and "Matrix products alone take" in page



def test_a_decoding_target_above_the_bandwidth_limit_is_reported_as_unreachable():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    row = {"batch": 1, "ours_tok_s": 31.1, "transformers_tok_s": 28.9, "ratio": 31.1 / 28.9, "identical_rows": 8, "rows": 8}
    record = {"prompts": 8, "new_tokens": 64, "transformers": "x", "torch": "y", "machine": "m", "load_average": 0.0,
              "read_bandwidth_gb_s": 24.8, "date": "d",
              "rows": [{**row, "dtype": "float32", "bandwidth_limit_tok_s": 46.0, "fraction_of_limit": 31.1 / 46.0},
                       {**row, "dtype": "bfloat16", "bandwidth_limit_tok_s": 92.0, "fraction_of_limit": 31.1 / 92.0}]}
    fp32, bf16 = [line for line in report.generation_section(record) if line.startswith(("| float32", "| bfloat16"))]
    assert "unreachable here: 2x is 58 tok/s, above the 46 tok/s" in fp32
    assert "unreachable" not in bf16 and "missed: ratio 1.08x" in bf16
    record["rows"][1].update(compiled_tok_s=50.0, compiled_ratio=50.0 / 28.9, compiled_identical_to_eager=5,
                             compiled_fraction_of_limit=50.0 / 92.0)
    page = report.generation_section(record)
    (compiled,) = [line for line in page[page.index("| dtype | batch | compiled (tok/s) | transformers (tok/s) | ratio "
                                                  "| equal to eager | of bandwidth limit | target |") + 2:]]
    assert compiled.startswith("| bfloat16 | 1 | 50.0 | 28.9 | 1.73x | 5/8 | 54% of 92 tok/s | missed: ratio 1.73x, 0.27x short |")
