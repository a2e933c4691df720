"""Where batch-1 greedy decoding spends its time: torch.profiler over SmolLM2-135M decoding, per dtype.

For each dtype it decodes `--new-tokens` tokens after one MBPP prompt (the first call warms up), then
profiles a second decode and groups the operators: the weight products (`mm`, `mv`, `addmv`,
`addmm`, `linear`), attention (`bmm`, `_softmax`, scaled dot-product), and everything else (norms,
rotary embedding, casts, indexing, the Python between them). It also times each weight matrix's
product alone at one row, as `nn.Linear` runs it and as `torch.mv`, to show what the kernels reach
(GB/s of weights read). Writes benchmarks/results/decode_profile.json, which report.py turns into the
"why" under the decoding table.

    .venv/bin/python benchmarks/decode_profile.py [--new-tokens 32 --threads 2]
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

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_OPS = ("aten::mm", "aten::mv", "aten::addmv_", "aten::addmm", "aten::linear", "mkldnn::_linear_pointwise")
ATTENTION_OPS = ("aten::bmm", "aten::_softmax", "aten::_scaled_dot_product")


def profile_decode(model, ids: list[int], new_tokens: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from weighted_mtp.eval.generation import generate_ids

    with torch.inference_mode():
        generate_ids(model, [ids], max_new_tokens=new_tokens)  # warm-up
        began = time.perf_counter()
        generate_ids(model, [ids], max_new_tokens=new_tokens)
        seconds = time.perf_counter() - began
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_ids(model, [ids], max_new_tokens=new_tokens)
    groups: dict[str, float] = defaultdict(float)
    calls = 0
    for event in prof.key_averages():
        name = event.key
        group = "weights" if name in WEIGHT_OPS else "attention" if name.startswith(ATTENTION_OPS) else "other"
        groups[group] += event.self_cpu_time_total
        calls += event.count
    total = sum(groups.values())
    return {"tokens_per_s": new_tokens / seconds, "ms_per_token": 1000 * seconds / new_tokens,
            "share": {k: v / total for k, v in groups.items()}, "operator_calls_per_token": calls / new_tokens}


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
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--models", type=Path, default=ROOT / "storage" / "models")
    parser.add_argument("--raw-data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_profile.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from weighted_mtp.eval.benchmarks import get_benchmark
    from weighted_mtp.models.loading import load_model

    benchmark = get_benchmark("mbpp")
    problem = benchmark.load(args.raw_data, "test", 1)[0]
    record = {"benchmark": "decode_profile", "threads": args.threads, "new_tokens": args.new_tokens,
              "torch": torch.__version__, "machine": platform.platform(), "date": time.strftime("%Y-%m-%d"),
              "rows": []}
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_model("smollm2-135m", models_dir=args.models, dtype=dtype)
        model.eval()
        ids = tokenizer.encode(benchmark.prompt(problem, "chat", tokenizer))
        row = {"dtype": str(dtype).removeprefix("torch."), **profile_decode(model, ids, args.new_tokens),
               "kernels": kernel_rates(model, dtype)}
        record["rows"].append(row)
        shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(row["share"].items()))
        print(f"{row['dtype']}: {row['tokens_per_s']:.1f} tok/s, {row['operator_calls_per_token']:.0f} operator calls "
              f"per token; self time: {shares}")
        for kernel in row["kernels"]:
            packed = f", prepacked {kernel['packed_gb_s']:.1f} GB/s" if "packed_gb_s" in kernel else ""
            print(f"  {kernel['shape']}: nn.Linear path {kernel['linear_gb_s']:.1f} GB/s, torch.mv {kernel['mv_gb_s']:.1f} GB/s"
                  + packed)
    record["load_average"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
