"""Peak memory and step time of one MTP training step, naive loss vs memory-efficient loss.

For the same model shape and batch it runs forward + backward with n = 1, 2, 4 heads, once with
`mtp_loss_naive` (all heads' logits materialised, autograd through everything) and once with
`mtp_forward_backward` (head by head, chunked cross-entropy), and prints the peak memory and the
median step time of each, with ratios to n = 1 of the same loss. Heads are added on top of the trunk
as when expanding an NTP model (n_layers = trunk + head 1 + n - 1 extra heads), so the n = 4 model
has 3 more blocks and 3 more unembedding passes; the "flops" column is the ratio of the forward
FLOPs (matmuls only), the floor any implementation's step time ratio sits near.

    .venv/bin/python benchmarks/mtp_loss_memory.py                       # CPU: SmolLM2 width, 8 layers
    .venv/bin/python benchmarks/mtp_loss_memory.py --shape smollm2-135m  # full depth (CUDA default)
    .venv/bin/python benchmarks/mtp_loss_memory.py --shape llama-7b --dtype bfloat16   # CUDA

How peak memory is measured. Every configuration runs in a fresh subprocess (nothing cached by an
earlier configuration can hide or inflate its peak), does one warm-up step, drops the gradients, and
then measures one step:
- CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`: the allocator's exact
  peak of live tensors (parameters and gradients included).
- CPU: torch has no allocator statistics for CPU, and sampling RSS misses short peaks. The kernel
  keeps an exact high-water mark of the resident set (VmHWM in /proc/self/status) that can be reset
  by writing 5 to /proc/self/clear_refs, so the peak of this step is read without sampling. Two
  things make RSS track live tensors: the subprocess runs with MALLOC_MMAP_THRESHOLD_ fixed at
  64 KiB, so every tensor larger than that gets its own mmap that is returned to the kernel when
  freed (glibc's default threshold grows up to 32 MiB and keeps freed blocks in its heap); and the
  reported figure is VmHWM minus the RSS of the process after `import torch`, i.e. the parameters,
  gradients and activations, without the runtime's code and libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from weighted_mtp.io import atomic_write_text

SHAPES = {
    # SmolLM2-135M: vocabulary 49152, width 576: the unembedding costs as much as ~8 blocks.
    "smollm2-135m": dict(dim=576, trunk_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_hidden_dim=1536),
    # The same width and vocabulary with a shorter trunk, so that six CPU configurations take minutes.
    "smollm2-8l": dict(dim=576, trunk_layers=8, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_hidden_dim=1536),
    # LLaMA-7B / Meta's 7B MTP model: heads are cheap next to a 32-block trunk.
    "llama-7b": dict(dim=4096, trunk_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, ffn_hidden_dim=11008),
    # LLaMA-7B's proportions at 1/8 width, FFN and vocabulary (head_dim 128, 32-block trunk): a head
    # (block + unembedding) costs the same fraction of the trunk as at 7B, and it fits a CPU.
    "llama-7b-eighth": dict(dim=512, trunk_layers=32, n_heads=4, n_kv_heads=4, vocab_size=4000, ffn_hidden_dim=1376),
    # Seconds-long, for the script's own smoke test.
    "micro": dict(dim=64, trunk_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, ffn_hidden_dim=128),
}
HEAD_COUNTS = (1, 2, 4)
LOSSES = ("naive", "efficient")


@dataclass
class Result:
    loss: str
    n: int
    peak_bytes: int
    step_s: float
    flops: float


# --------------------------------------------------------------------------- worker (one configuration)


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def forward_flops_per_token(shape: dict, n: int, seq: int) -> float:
    """Matmul FLOPs of one forward pass per token: blocks (projections, attention, SwiGLU) + unembeddings."""
    dim, head_dim = shape["dim"], shape["dim"] // shape["n_heads"]
    kv = shape["n_kv_heads"] * head_dim
    block = 2 * (2 * dim * dim + 2 * dim * kv + 3 * dim * shape["ffn_hidden_dim"]) + 2 * 2 * seq / 2 * dim
    return (shape["trunk_layers"] + n) * block + n * 2 * dim * shape["vocab_size"]


def run_worker(args: argparse.Namespace) -> None:
    from weighted_mtp.losses import mtp_forward_backward, mtp_loss_naive
    from weighted_mtp.models.transformer import ModelArgs, MTPTransformer
    from weighted_mtp.train.parallelize import apply_activation_checkpointing

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline_kib = _rss_kib("VmRSS")
    torch.manual_seed(0)
    shape = dict(SHAPES[args.shape])
    trunk_layers = shape.pop("trunk_layers")
    model_args = ModelArgs(
        **shape, n_layers=trunk_layers + args.n, n_future_tokens=args.n, tie_embeddings=not args.shape.startswith("llama-7b")
    )
    with device:
        model = MTPTransformer(model_args).to(getattr(torch, args.dtype))
    model.train()
    if args.activation_checkpointing:
        apply_activation_checkpointing(model)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model_args.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    labels = input_ids.clone()
    labels[:, : args.seq // 8] = -100  # a prompt, as in fine-tuning

    def step() -> None:
        model.zero_grad(set_to_none=True)
        if args.loss == "naive":
            loss, _ = mtp_loss_naive(model, input_ids, labels)
            loss.backward()
        else:
            mtp_forward_backward(model, input_ids, labels, chunk_size=args.chunk_size)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: lazy initialisation, kernel selection
    model.zero_grad(set_to_none=True)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step()
        synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        step()
        peak = (_rss_kib("VmHWM") - baseline_kib) * 1024
    times = []
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    shape["trunk_layers"] = trunk_layers
    flops = forward_flops_per_token(shape, args.n, args.seq)
    print(json.dumps(dict(loss=args.loss, n=args.n, peak_bytes=peak, step_s=statistics.median(times), flops=flops)))


# --------------------------------------------------------------------------- driver


def run_configuration(args: argparse.Namespace, loss: str, n: int) -> Result:
    command = [
        sys.executable, __file__, "--worker", "--loss", loss, "--n", str(n), "--shape", args.shape,
        "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype, "--device", args.device,
        "--repeats", str(args.repeats), "--chunk-size", str(args.chunk_size), "--threads", str(args.threads),
    ]
    if args.activation_checkpointing:
        command.append("--activation-checkpointing")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{loss} n={n} failed:\n{completed.stderr[-3000:]}")
    return Result(**json.loads(completed.stdout.strip().splitlines()[-1]))


def print_table(results: list[Result]) -> None:
    base = {r.loss: r for r in results if r.n == 1}
    header = f"{'loss':<10} {'n':>2} {'peak MiB':>9} {'x n=1':>6} {'step s':>8} {'x n=1':>6} {'flops x':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        b = base[r.loss]
        print(
            f"{r.loss:<10} {r.n:>2} {r.peak_bytes / 2**20:>9.1f} {r.peak_bytes / b.peak_bytes:>6.2f} "
            f"{r.step_s:>8.3f} {r.step_s / b.step_s:>6.2f} {r.flops / b.flops:>7.2f}"
        )
    if len(base) < len(LOSSES):
        return
    for n in HEAD_COUNTS:
        naive = next(r for r in results if r.loss == "naive" and r.n == n)
        efficient = next(r for r in results if r.loss == "efficient" and r.n == n)
        print(
            f"n={n}: efficient / naive: peak {efficient.peak_bytes / naive.peak_bytes:.2f}x, "
            f"step time {efficient.step_s / naive.step_s:.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: smollm2-8l on CPU, smollm2-135m on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None, help="default: 1 on CPU, 8 on CUDA")
    parser.add_argument("--seq", type=int, default=None, help="default: 512 on CPU, 2048 on CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (median)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads per configuration; 0 keeps torch's default (1 gives stable ratios on a shared machine)",
    )
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES), help="which losses to measure")
    parser.add_argument("--json", type=Path, help="also write the figures here (benchmarks/report.py renders them)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("smollm2-135m" if on_cuda else "smollm2-8l")
    args.batch = args.batch or (8 if on_cuda else 1)
    args.seq = args.seq or (2048 if on_cuda else 512)
    if args.worker:
        run_worker(args)
        return

    print(
        f"shape {args.shape}, batch {args.batch} x {args.seq} tokens, {args.dtype} on {args.device}, "
        f"chunk {args.chunk_size}, {args.threads or torch.get_num_threads()} CPU thread(s), activation checkpointing {'on' if args.activation_checkpointing else 'off'}"
    )
    results = []
    for loss in args.losses:
        for n in HEAD_COUNTS:
            results.append(run_configuration(args, loss, n))
            print(f"  {loss} n={n}: done", file=sys.stderr, flush=True)
    print_table(results)
    if args.json:
        write_record(args, results, args.json)


def write_record(args: argparse.Namespace, results: list[Result], path: Path) -> None:
    import os
    import platform
    import time
    from dataclasses import asdict

    record = {"benchmark": "mtp_loss_memory", "shape": args.shape, "batch": args.batch, "seq": args.seq,
              "dtype": args.dtype, "device": args.device, "threads": args.threads, "chunk_size": args.chunk_size,
              "results": [asdict(r) for r in results], "torch": torch.__version__, "machine": platform.platform(),
              "load_average": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
