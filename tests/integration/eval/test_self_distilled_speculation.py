"""benchmarks/self_distilled_speculation.py --quick: the three steps (greedy distillation data through
the rollout path, heads-only training with trunk and unembedding frozen, plain vs speculative decoding
on held-out prompts) run end to end on the micro model, the trunk is untouched by the training, both
decoders give the same tokens, a second run reuses the finished steps, and the record renders in
docs/BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import torch
from safetensors.torch import load_file


def test_the_self_distillation_benchmark_trains_heads_only_and_decodes_identically(repo_root, shared_data, tmp_path):
    out, work = tmp_path / "self_distilled_speculation.json", tmp_path / "work"
    command = [sys.executable, str(repo_root / "benchmarks" / "self_distilled_speculation.py"), "--quick",
               "--raw-data", str(shared_data), "--models", str(tmp_path / "models"), "--work-dir", str(work),
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["distillation"]["problems"] == 4 and record["training"]["steps"] == 2
    assert sorted(record["distillation"]) == ["correct", "generated_tokens", "problems"]
    for kind in ("copied_heads", "distilled_heads"):
        assert sorted(record[kind]) == ["humaneval test", "mbpp test"]
        for row in record[kind].values():
            assert row["prompts"] == 2 and row["outputs_differing"] == 0
            assert len(row["acceptance_per_head"]) == 3 and row["tokens_per_forward"] >= 1
    final = work / "runs" / "self_distilled_heads" / "final" / "model.safetensors"
    trained = load_file(final)
    from weighted_mtp.models.loading import load_model

    base = load_model("micro", n_future_tokens=4, models_dir=tmp_path / "models")[0].state_dict()
    for name in ("tok_embeddings.weight", "layers.0.attention.wq.weight", "norm.weight"):
        assert torch.equal(trained[name], base[name]), name  # frozen: the trunk and the unembedding
    assert not torch.equal(trained["extra_heads.0.attention.wq.weight"], base["extra_heads.0.attention.wq.weight"])
    rollouts = work / "rollouts" / "train.jsonl"
    written = final.stat().st_mtime_ns, rollouts.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (final.stat().st_mtime_ns, rollouts.stat().st_mtime_ns) == written  # finished steps are not run again
    spec = importlib.util.spec_from_file_location("benchmark_report", repo_root / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert "## Self-speculative decoding with self-distilled heads" in report.render(tmp_path)
