"""Greedy decoding against transformers' `generate`: the same weights, the same token ids, one run.

SmolLM2-135M is loaded by the project (`load_model`) and exported as a Hugging Face directory
(`checkpoints.hf.export_hf`), which `transformers.LlamaForCausalLM` loads: both sides hold the same
weights in the same dtype. Each side continues the same MBPP test prompts (the project's prompt
template, left-padded batches) by exactly `--new-tokens` tokens (no stop token), greedy, at batch 1
and at `--batch`, in float32 and bfloat16, alternating side by side so that the load of a shared
machine hits both alike; the fastest of `--repeats` counts. It prints tokens/s, the ratio, whether the
generated tokens are identical, and, for batch 1, the fraction of the memory-bandwidth limit reached
(every weight is read once per token: bandwidth / bytes of weights; the bandwidth is measured here
as the faster of a sum and a one-row product over 1 GiB). In `--compiled-dtypes` it also times our
compiled decoding step (`generate_ids(compiled=True)`, compiled before timing) and counts its
outputs equal to our eager ones.

    .venv/bin/python benchmarks/generation_vs_transformers.py [--prompts 8 --new-tokens 64 --batch 8]
    .venv/bin/python benchmarks/generation_vs_transformers.py --json benchmarks/results/generation.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from weighted_mtp.eval.benchmarks import get_benchmark
from weighted_mtp.eval.generation import generate_ids
from weighted_mtp.io import atomic_write_text
from weighted_mtp.models.checkpoints.hf import export_hf
from weighted_mtp.models.loading import load_model


def read_bandwidth_gb_s(size_mib: int = 1024, repeats: int = 5) -> float:
    """Memory read bandwidth as decoding's kernels see it: the faster of a sum and a one-row product
    (`F.linear`, what batch-1 decoding runs) over `size_mib` MiB of float32, far more than any cache
    holds; the best of `repeats` each. The product reads about 1.5x faster than the sum here, so a
    sum alone would understate the limit."""
    matrix = torch.ones(size_mib << 8, 1024)  # size_mib MiB of float32
    row = torch.ones(1, 1024)
    best = float("inf")
    for read in (matrix.sum, lambda: torch.nn.functional.linear(row, matrix)):
        for _ in range(repeats):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return matrix.numel() * 4 / best / 1e9


def ours(model, prompts: list[list[int]], new_tokens: int, compiled: bool = False) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    out = generate_ids(model, prompts, max_new_tokens=new_tokens, stop_ids=(), pad_id=0, compiled=compiled)
    return [list(o.token_ids) for o in out], time.perf_counter() - start


def ours_compiled(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    return ours(model, prompts, new_tokens, compiled=True)


def theirs(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    seconds = time.perf_counter() - start
    return out[:, width:].tolist(), seconds


def compare(ours_model, hf_model, prompts, new_tokens, batch, repeats, compiled: bool) -> dict:
    sides = [("ours", ours, ours_model), ("transformers", theirs, hf_model)]
    if compiled:
        sides.append(("compiled", ours_compiled, ours_model))
        for start in range(0, len(prompts), batch):  # compiling (once per batch size and cache length) is not decoding
            ours_compiled(ours_model, prompts[start : start + batch], new_tokens)
    best = {name: float("inf") for name, _, _ in sides}
    outputs = {}
    for run, model in ((ours, ours_model), (theirs, hf_model)):  # warm up: first-call set-up is not decoding
        run(model, prompts[:batch], 4)
    for _ in range(repeats):
        for name, run, model in sides:
            tokens, seconds = [], 0.0
            for start in range(0, len(prompts), batch):
                got, took = run(model, prompts[start : start + batch], new_tokens)
                tokens += got
                seconds += took
            best[name] = min(best[name], seconds)
            outputs[name] = tokens
    generated = len(prompts) * new_tokens
    same = sum(a == b for a, b in zip(outputs["ours"], outputs["transformers"]))
    row = {
        "batch": batch,
        "ours_tok_s": generated / best["ours"],
        "transformers_tok_s": generated / best["transformers"],
        "ratio": best["transformers"] / best["ours"],
        "identical_rows": same,
        "rows": len(prompts),
    }
    if compiled:
        row["compiled_tok_s"] = generated / best["compiled"]
        row["compiled_ratio"] = best["transformers"] / best["compiled"]
        row["compiled_identical_to_eager"] = sum(a == b for a, b in zip(outputs["compiled"], outputs["ours"]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--models-dir", type=Path, default=Path("storage/models"))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--compiled-dtypes", default="bfloat16",
                        help="also time `generate_ids(compiled=True)` in these dtypes ('' for none; compiling takes minutes)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import transformers

    benchmark = get_benchmark("mbpp")
    problems = benchmark.load(args.raw_data, "test", args.prompts)
    bandwidth = read_bandwidth_gb_s()
    rows = []
    with tempfile.TemporaryDirectory(prefix="wmtp-bench-hf-") as scratch:
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            model, tokenizer = load_model("smollm2-135m", models_dir=args.models_dir, dtype=dtype)
            model.eval()
            prompts = [tokenizer.encode(benchmark.prompt(p, "alpaca"), add_bos=False) for p in problems]
            export = export_hf(model, Path(scratch) / dtype_name)
            hf_model = transformers.LlamaForCausalLM.from_pretrained(export, dtype=dtype).eval()
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            for batch in (1, args.batch):
                compiled = dtype_name in args.compiled_dtypes.split(",")
                row = compare(model, hf_model, prompts, args.new_tokens, batch, args.repeats, compiled)
                row["dtype"] = dtype_name
                if batch == 1:
                    row["bandwidth_limit_tok_s"] = bandwidth * 1e9 / weight_bytes
                    row["fraction_of_limit"] = row["ours_tok_s"] / row["bandwidth_limit_tok_s"]
                    if "compiled_tok_s" in row:
                        row["compiled_fraction_of_limit"] = row["compiled_tok_s"] / row["bandwidth_limit_tok_s"]
                rows.append(row)
            del model, hf_model
    print(f"SmolLM2-135M, {len(problems)} MBPP test prompts, {args.new_tokens} new tokens, greedy; "
          f"{torch.get_num_threads()} threads, read bandwidth {bandwidth:.1f} GB/s; load {os.getloadavg()[0]:.2f}")
    print(f"{'dtype':9}{'batch':>6}{'ours tok/s':>12}{'transformers':>14}{'ratio':>8}{'identical':>11}{'of limit':>10}")
    for row in rows:
        limit = f"{row['fraction_of_limit']:.0%}" if "fraction_of_limit" in row else ""
        print(f"{row['dtype']:9}{row['batch']:>6}{row['ours_tok_s']:>12.1f}{row['transformers_tok_s']:>14.1f}"
              f"{row['ratio']:>7.2f}x{row['identical_rows']:>6}/{row['rows']:<4}{limit:>10}")
        if "compiled_tok_s" in row:
            print(f"{'':9}{'':>6}{'compiled':>12}{row['compiled_tok_s']:>14.1f}{row['compiled_ratio']:>7.2f}x"
                  f"{row['compiled_identical_to_eager']:>6}/{row['rows']:<4} equal to eager")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "generation_vs_transformers", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads", "load_average": os.getloadavg()[0],
            "read_bandwidth_gb_s": bandwidth, "new_tokens": args.new_tokens, "prompts": len(problems),
            "transformers": transformers.__version__, "torch": torch.__version__, "rows": rows,
        }
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
