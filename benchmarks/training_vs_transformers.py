"""A training step against transformers: forward, backward and AdamW on the same weights and batch.

SmolLM2-135M with one head, loaded by the project and exported as a Hugging Face directory that
`transformers.LlamaForCausalLM` loads (the same weights). Both sides train on the same batch of MBPP
train solutions (`--batch` rows of `--length` tokens) with fused `torch.optim.AdamW`, the default of both
trainers (ours: `train.optim.build_optimizer`; transformers: `adamw_torch_fused`): ours with the
memory-efficient loss (`mtp_forward_backward`, n = 1), transformers with `model(input_ids, labels=...)`
and `loss.backward()`. Steps alternate side by side; the median step after `--warmup` counts. The first
step's losses are compared (same weights, same data: they should agree to float precision). All of
it in each of `--dtypes` (float32 and bfloat16: weights, activations and optimizer state). Then three
more steps of each side run under torch.profiler, their operators' self time grouped (matrix
products, attention, loss, optimizer, the rest; each group's median), so that the report says where
each side's step goes and how much of it is the same matrix-product kernels on both sides.

With `--compiled` each dtype also runs compiled against compiled: ours with `model.compile: true`
(`compile_blocks`: each transformer block), transformers with `model.compile()` (the whole model, what
its Trainer's `torch_compile=True` does). The first step of each side, which compiles (with an empty
compiler cache), is reported too.

With `--autocast` a third pair of rows trains under mixed precision: float32 weights and AdamW state,
the forward under bf16 autocast. Ours as `wmtp train` runs `dtype: bfloat16` (the backward inside the
loss, under the same autocast); transformers as its Trainer runs `bf16=True` on a CPU (the forward
under `torch.autocast`, `loss.backward()` after it).

    .venv/bin/python benchmarks/training_vs_transformers.py [--batch 4 --length 256 --steps 6]
    .venv/bin/python benchmarks/training_vs_transformers.py --compiled --autocast --json benchmarks/results/training_vs_transformers.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from weighted_mtp.io import atomic_write_text
from weighted_mtp.losses import mtp_forward_backward
from weighted_mtp.models.checkpoints.hf import export_hf
from weighted_mtp.models.loading import load_model
from weighted_mtp.train.optim import build_optimizer
from weighted_mtp.train.parallelize import compile_blocks


def batch_of_solutions(tokenizer, raw_data: Path, rows: int, length: int) -> torch.Tensor:
    """`rows` x `length` token ids cut from MBPP train solutions laid end to end."""
    text = "\n\n".join(json.loads(line)["code"] for line in (raw_data / "mbpp" / "train.jsonl").read_text().splitlines())
    ids = tokenizer.encode(text, add_bos=False)[: rows * length]
    return torch.tensor(ids).view(rows, length)


def mixed_precision(autocast: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()


def ours_forward_backward(model, input_ids: torch.Tensor, autocast: bool = False) -> float:
    with mixed_precision(autocast):  # the trainer's `training_autocast` around the objective's step
        out = mtp_forward_backward(model, input_ids, input_ids)  # labels aligned with the inputs: head 1 predicts t+1
    return float(out.loss)


def theirs_forward_backward(model, input_ids: torch.Tensor, autocast: bool = False) -> float:
    with mixed_precision(autocast):  # the Trainer's `compute_loss` under autocast, its backward outside
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return float(loss.detach())


def optimizer_step(optimizer) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# Operator name prefixes of each group, checked in this order; anything else is "other".
OPERATOR_GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn::"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention"),
    "loss": ("aten::_log_softmax", "aten::nll_loss", "aten::cross_entropy", "aten::log_softmax", "aten::logsumexp"),
}


def operator_group(name: str) -> str:
    return next((group for group, prefixes in OPERATOR_GROUPS.items() if name.startswith(prefixes)), "other")


def profile_step(forward_backward, module, optimizer, input_ids: torch.Tensor, autocast: bool,
                 repeats: int = 3) -> dict[str, float]:
    """Seconds of operator self time per group in a step, each group's median over `repeats` profiled
    steps (one alone varied by up to 0.6 s in a group): forward and backward by operator, everything
    inside the optimizer's step as "optimizer" (the profiler's own cost included alike)."""
    from torch.profiler import ProfilerActivity, profile

    runs: list[dict[str, float]] = []
    for _ in range(repeats):
        seconds: dict[str, float] = defaultdict(float)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            forward_backward(module, input_ids, autocast)
        for event in prof.key_averages():
            seconds[operator_group(event.key)] += event.self_cpu_time_total / 1e6
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            optimizer_step(optimizer)
        seconds["optimizer"] = sum(event.self_cpu_time_total for event in prof.key_averages()) / 1e6
        runs.append(seconds)
    groups = {group for run in runs for group in run}
    return {group: statistics.median(run.get(group, 0.0) for run in runs) for group in sorted(groups)}


def compare(transformers, args, dtype: torch.dtype, compiled: bool = False, autocast: bool = False) -> dict:
    """Both sides on the same weights and batch in `dtype` (both compiled or neither; with `autocast`,
    float32 weights and bf16 autocast on both), steps alternating; the median step after the warm-up,
    the first step's losses and time, and profiled steps per side."""
    torch.manual_seed(0)
    weights = torch.float32 if autocast else dtype
    model, tokenizer = load_model("smollm2-135m", models_dir=args.models_dir, dtype=weights)
    input_ids = batch_of_solutions(tokenizer, args.raw_data, args.batch, args.length)
    with tempfile.TemporaryDirectory(prefix="wmtp-bench-hf-") as scratch:
        hf_model = transformers.LlamaForCausalLM.from_pretrained(export_hf(model, Path(scratch) / "hf"), dtype=weights)
    model.train()
    hf_model.train()
    if compiled:
        compile_blocks(model)
        hf_model.compile()
    sides = {  # each side with its trainer's AdamW: both fused (train.optim; TrainingArguments' adamw_torch_fused)
        "ours": (ours_forward_backward, model, build_optimizer(model.named_parameters(), lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999))),
        "transformers": (theirs_forward_backward, hf_model, torch.optim.AdamW(hf_model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    first_loss: dict[str, float] = {}
    first_step: dict[str, float] = {}
    for step in range(args.warmup + args.steps):
        for name, (run, module, optimizer) in sides.items():
            start = time.perf_counter()
            loss = run(module, input_ids, autocast)
            optimizer_step(optimizer)
            took = time.perf_counter() - start
            if step >= args.warmup:
                times[name].append(took)
            first_step.setdefault(name, took)
            first_loss.setdefault(name, loss)
    profiles = {name: profile_step(run, module, optimizer, input_ids, autocast)
                for name, (run, module, optimizer) in sides.items()}
    tokens = input_ids.numel()
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "dtype": str(dtype).removeprefix("torch."), "compiled": compiled, "autocast": autocast, "heads": 1, "batch": args.batch, "length": args.length,
        "ours_tok_s": tokens / median["ours"], "transformers_tok_s": tokens / median["transformers"],
        "ratio": median["transformers"] / median["ours"],
        "first_loss_ours": first_loss["ours"], "first_loss_transformers": first_loss["transformers"],
        "first_step_s": first_step,
        "profile_s": profiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--models-dir", type=Path, default=Path("storage/models"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="weights, activations and AdamW state in each")
    parser.add_argument("--compiled", action="store_true", help="also each dtype compiled against compiled")
    parser.add_argument("--autocast", action="store_true", help="also float32 weights under bf16 autocast on both sides")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import transformers

    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    rows = [compare(transformers, args, dtype) for dtype in dtypes]
    if args.autocast:
        rows.append(compare(transformers, args, torch.bfloat16, autocast=True))
    if args.compiled:
        # An empty compiler cache: each side's first step compiles from scratch, as a user's first run does.
        with tempfile.TemporaryDirectory(prefix="wmtp-bench-inductor-") as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            rows += [compare(transformers, args, dtype, compiled=True) for dtype in dtypes]
    print(f"SmolLM2-135M training step, batch {args.batch} x {args.length}, fused AdamW, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    for row in rows:
        mode = ", compiled" if row["compiled"] else ", autocast (float32 weights)" if row["autocast"] else ""
        print(f"  {row['dtype']}{mode}: ours {row['ours_tok_s']:.0f} tok/s, "
              f"transformers {row['transformers_tok_s']:.0f} tok/s: {row['ratio']:.2f}x; first loss "
              f"{row['first_loss_ours']:.5f} vs {row['first_loss_transformers']:.5f}; first step "
              f"{row['first_step_s']['ours']:.1f} vs {row['first_step_s']['transformers']:.1f} s")
        print("  operator self time of one profiled step (s):")
        for group in (*OPERATOR_GROUPS, "optimizer", "other"):
            print(f"    {group:16} ours {row['profile_s']['ours'].get(group, 0):6.2f}  "
                  f"transformers {row['profile_s']['transformers'].get(group, 0):6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "training_vs_transformers", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads", "load_average": os.getloadavg()[0],
            "transformers": transformers.__version__, "torch": torch.__version__, "steps": args.steps, "rows": rows,
            "optimizer": "fused AdamW",
        }
        atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
