"""One GPU, a few minutes: bf16 FSDP2 training of a 1B-class MTP model, and the loss at LLaMA-7B shape.

Ready for the moment a device is lent (issues "scale out" and "faster than the peers"): one call runs

1. the ceilings: a large bf16 matrix product (TFLOP/s) and a device-to-device copy (GB/s);
2. training steps of a 1.1B-parameter LLaMA-style trunk with 4 MTP heads (TinyLlama's shape: width
   2048, 22 blocks, 32 query / 4 key-value heads, SwiGLU 5632, vocabulary 32000) through the project's
   own pieces: `shard_model` (FSDP2, a world of one, bf16 parameters, fp32 reduction), the
   memory-efficient loss (`mtp_forward_backward`), AdamW; with and without `torch.compile` of each
   block (`compile_blocks`, what `model.compile: true` applies). Reported: median step time,
   tokens/s, peak memory, and model FLOPs utilisation against the measured matrix-product rate and
   against the datasheet's dense bf16 rate;
3. `benchmarks/mtp_loss_memory.py --shape llama-7b --dtype bfloat16`: peak memory and step time of
   n = 1, 2, 4 heads, naive loss against the memory-efficient one.

It writes `benchmarks/results/gpu_training.json` (and prints a table); `benchmarks/report.py` puts it
in docs/BENCHMARKS.md. `--quick` runs the same code on tiny shapes on the CPU (gloo) for the tests.

    python benchmarks/gpu_training.py                 # on the GPU machine, about 5 minutes
    python benchmarks/gpu_training.py --quick --out /tmp/gpu.json

Model FLOPs per token (forward; the step is 3x): 2 x the weights of every matrix product a token goes
through (each trunk block, each head's block, and the unembedding once per head) plus causal
attention's 2 x 2 x d x s / 2 per block (scores and the weighted sum over s/2 positions on average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from weighted_mtp.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM
SHAPES = {
    "1b": dict(dim=2048, n_layers=22 + 3, n_heads=32, n_kv_heads=4, vocab_size=32000, ffn_hidden_dim=5632,
               n_future_tokens=4, tie_embeddings=False),
    "quick": dict(dim=64, n_layers=2 + 3, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_hidden_dim=128,
                  n_future_tokens=4, tie_embeddings=False),
}


def model_flops_per_token(args, seq: int) -> float:
    """Forward FLOPs per token of the MTP model (matrix products and attention), as in the docstring."""
    d, kv, f = args.dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    block = 2 * (2 * d * d + 2 * d * kv + 3 * d * f)
    attention = 2 * 2 * d * seq / 2
    blocks = args.n_layers  # trunk blocks and head blocks alike
    return blocks * (block + attention) + args.n_future_tokens * 2 * d * args.vocab_size


def ceilings(device: torch.device, quick: bool) -> dict[str, float]:
    """The measured bf16 matrix-product rate and device-to-device copy bandwidth."""
    n = 256 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_s = timed(lambda: a @ b, device, repeat=5 if quick else 50)
    src = torch.randn((2**20 if quick else 2**30) // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, repeat=5 if quick else 50)
    return {"matmul_tflops": 2 * n**3 / matmul_s / 1e12, "copy_gb_s": 2 * src.numel() * 2 / copy_s / 1e9}


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of `fn` after a warm-up, synchronising the device around each call."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training(shape: str, *, compiled: bool, batch: int, seq: int, steps: int, device: torch.device) -> dict:
    """Steps of bf16 FSDP2 training (a world of one) with the project's loss; median step time."""
    from weighted_mtp.losses import mtp_forward_backward
    from weighted_mtp.models.transformer import ModelArgs, MTPTransformer
    from weighted_mtp.train import distributed as D
    from weighted_mtp.train.parallelize import apply_activation_checkpointing, compile_blocks, shard_model

    args = ModelArgs(**SHAPES[shape])
    with torch.device("meta"):
        model = MTPTransformer(args)
    model.to_empty(device=device)
    model.init_weights(seed=0, std=0.02)
    parameters = model.num_parameters()
    if shape != "quick":
        apply_activation_checkpointing(model)
    if compiled:
        compile_blocks(model)  # as `model.compile: true` does: after checkpointing, before sharding
    env = D.DistEnv(rank=0, world_size=1, device=device, strategy="fsdp")
    shard_model(model, [], env, param_dtype="bfloat16", reduce_dtype="float32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=generator).to(device)

    def step() -> float:
        out = mtp_forward_backward(model, tokens, tokens, chunk_size=4096, loss_scale=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    first_loss = step()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(step, device, repeat=steps)
    flops = 3 * model_flops_per_token(args, seq) * batch * seq
    return {
        "shape": shape, "parameters": parameters, "compiled": compiled, "batch": batch, "seq": seq,
        "step_s": step_s, "tokens_per_s": batch * seq / step_s, "model_tflops": flops / step_s / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "first_loss": first_loss,
    }


def loss_benchmark(quick: bool) -> str:
    """The MTP loss benchmark at LLaMA-7B shape in bf16 (its own processes); its printed table."""
    shape = ["--shape", "micro", "--dtype", "float32"] if quick else ["--shape", "llama-7b", "--dtype", "bfloat16"]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mtp_loss_memory.py"), *shape],
                          capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        return f"failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: checks that the script runs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_training.json")
    args = parser.parse_args()
    quick = args.quick
    device = torch.device("cpu" if quick else "cuda")
    if not quick and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on the GPU machine, or pass --quick")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.distributed.init_process_group("gloo" if quick else "nccl", rank=0, world_size=1)
    if not quick:
        torch.cuda.set_device(0)
    name = "CPU" if quick else torch.cuda.get_device_name(0)
    datasheet = next((rate for key, rate in DATASHEET_BF16_TFLOPS.items() if key in name), None)
    shape, batch, seq, steps = ("quick", 2, 32, 2) if quick else ("1b", args.batch, args.seq, args.steps)
    record = {"benchmark": "gpu_training", "device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "machine": platform.platform(), "datasheet_bf16_tflops": datasheet, **ceilings(device, quick)}
    record["training"] = [training(shape, compiled=compiled, batch=batch, seq=seq, steps=steps, device=device)
                          for compiled in ((False,) if quick else (False, True))]
    for row in record["training"]:
        row["mfu_of_measured"] = row["model_tflops"] / record["matmul_tflops"]
        row["mfu_of_datasheet"] = row["model_tflops"] / datasheet if datasheet else None
    record["loss_benchmark"] = loss_benchmark(quick)
    torch.distributed.destroy_process_group()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"{name}: matmul {record['matmul_tflops']:.1f} TFLOP/s, copy {record['copy_gb_s']:.0f} GB/s")
    print("| compiled | params | step (s) | tokens/s | model TFLOP/s | MFU (measured) | MFU (datasheet) | peak GiB |")
    for row in record["training"]:
        datasheet_mfu = f"{row['mfu_of_datasheet']:.1%}" if row["mfu_of_datasheet"] is not None else "-"
        peak = f"{row['peak_memory_gib']:.1f}" if row["peak_memory_gib"] is not None else "-"
        print(f"| {row['compiled']} | {row['parameters'] / 1e9:.2f}B | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} "
              f"| {row['model_tflops']:.1f} | {row['mfu_of_measured']:.1%} | {datasheet_mfu} | {peak} |")
    print(record["loss_benchmark"][-3000:])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
