"""Where greedy decoding spends its time: torch.profiler over SmolLM2-135M decoding, per dtype and batch.

For each dtype, at batch 1 and at `--batch`, it decodes the first MBPP test prompts (the prompts and
padding of generation_vs_transformers.py) and keeps the decoding steps alone: a run of `--new-tokens`
tokens minus a run of one (prefill and first step), timed and profiled. Operators are grouped: the
weight products (`mm`, `mv`, `addmm`, `linear`, the prepacked bf16 product), attention (`bmm`,
`_softmax`, scaled dot-product), and everything else (norms, rotary embedding, casts, indexing,
sampling). The weight products' time per step bounds the speed that the same kernels allow however
little else costs; report.py sets that bound against the decoding target. It also times each weight
matrix's product alone at one row, as `nn.Linear` runs it, as `torch.mv` and prepacked (bf16), in
GB/s of weights read. Writes benchmarks/results/decode_profile.json.

    .venv/bin/python benchmarks/decode_profile.py [--new-tokens 32 --batch 8 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from weighted_mtp.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_OPS = ("aten::mm", "aten::mv", "aten::addmv_", "aten::addmm", "aten::linear", "mkldnn::_linear_pointwise")
ATTENTION_OPS = ("aten::bmm", "aten::_softmax", "aten::_scaled_dot_product")


def profile_decode(model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Decoding steps alone: a run of `new_tokens` minus a run of one token (prefill and the first
    step) leaves `new_tokens - 1` steps, for the wall time and for each operator group's self time."""
    from torch.profiler import ProfilerActivity, profile

    from weighted_mtp.eval.generation import generate_ids

    def decode(tokens: int) -> None:
        generate_ids(model, prompts, max_new_tokens=tokens, stop_ids=(), pad_id=0)

    def timed(tokens: int) -> float:
        began = time.perf_counter()
        decode(tokens)
        return time.perf_counter() - began

    def grouped(tokens: int) -> tuple[dict[str, float], int]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(tokens)
        groups: dict[str, float] = defaultdict(float)
        calls = 0
        for event in prof.key_averages():
            name = event.key
            group = "weights" if name in WEIGHT_OPS else "attention" if name.startswith(ATTENTION_OPS) else "other"
            groups[group] += event.self_cpu_time_total / 1e6
            calls += event.count
        return groups, calls

    with torch.inference_mode():
        decode(new_tokens)  # warm-up
        step_s = min(timed(new_tokens) - timed(1) for _ in range(2)) / (new_tokens - 1)
        (long_run, long_calls), (short_run, short_calls) = grouped(new_tokens), grouped(1)
    steps = new_tokens - 1
    per_step = {group: max(long_run[group] - short_run.get(group, 0.0), 0.0) / steps for group in long_run}
    total = sum(per_step.values())
    return {"batch": len(prompts), "tokens_per_s": len(prompts) / step_s, "ms_per_step": 1000 * step_s,
            "profiled_ms_per_step": {group: 1000 * s for group, s in per_step.items()},
            "share": {group: s / total for group, s in per_step.items()},
            "operator_calls_per_step": (long_calls - short_calls) / steps}


def kernel_rates(model, dtype: torch.dtype) -> list[dict]:
    """One-row products with each distinct weight shape: nn.Linear's path vs torch.mv vs the prepacked
    weight the model's `Linear` uses (bf16), GB/s read."""
    shapes = sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})
    rows = []
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features).to(dtype)
        x = torch.randn(1, in_features).to(dtype)
        timings = {}
        kernels = {"linear": lambda: F.linear(x, weight), "mv": lambda: torch.mv(weight, x[0])}
        if dtype == torch.bfloat16:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            kernels["packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        for name, fn in kernels.items():
            for _ in range(5):
                fn()
            began = time.perf_counter()
            repeats = 50
            for _ in range(repeats):
                fn()
            timings[name] = (time.perf_counter() - began) / repeats
        nbytes = weight.numel() * weight.element_size()
        rows.append({"shape": [out_features, in_features],
                     **{f"{name}_gb_s": nbytes / seconds / 1e9 for name, seconds in timings.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="profile batch 1 and this batch")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--models", type=Path, default=ROOT / "storage" / "models")
    parser.add_argument("--raw-data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_profile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from weighted_mtp.eval.benchmarks import get_benchmark
    from weighted_mtp.models.loading import load_model

    benchmark = get_benchmark("mbpp")
    problems = benchmark.load(args.raw_data, "test", args.batch)
    record = {"benchmark": "decode_profile", "threads": args.threads, "new_tokens": args.new_tokens,
              "torch": torch.__version__, "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
              "rows": [], "kernels": {}}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_model("smollm2-135m", models_dir=args.models, dtype=dtype)
        model.eval()
        prompts = [tokenizer.encode(benchmark.prompt(problem, "alpaca"), add_bos=False) for problem in problems]
        for batch in (1, args.batch):
            row = {"dtype": str(dtype).removeprefix("torch."), **profile_decode(model, prompts[:batch], args.new_tokens)}
            record["rows"].append(row)
            shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(row["share"].items()))
            print(f"{row['dtype']} batch {batch}: {row['tokens_per_s']:.1f} tok/s, {row['operator_calls_per_step']:.0f} "
                  f"operator calls per step; self time: {shares}")
        record["kernels"][row["dtype"]] = kernel_rates(model, dtype)
        for kernel in record["kernels"][row["dtype"]]:
            packed = f", prepacked {kernel['packed_gb_s']:.1f} GB/s" if "packed_gb_s" in kernel else ""
            print(f"  {kernel['shape']}: nn.Linear path {kernel['linear_gb_s']:.1f} GB/s, torch.mv {kernel['mv_gb_s']:.1f} GB/s"
                  + packed)
    record["load_average"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
