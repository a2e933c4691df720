"""A training step against transformers: forward, backward and AdamW on the same weights and batch.

SmolLM2-135M with one head, loaded by the project and exported as a Hugging Face directory that
`transformers.LlamaForCausalLM` loads (the same weights). Both sides train on the same batch of MBPP
train solutions (`--batch` rows of `--length` tokens) with `torch.optim.AdamW` (foreach): ours with the
memory-efficient loss (`mtp_forward_backward`, n = 1), transformers with `model(input_ids, labels=...)`
and `loss.backward()`. Steps alternate side by side; the median step after `--warmup` counts. The first
step's losses are compared (same weights, same data: they should agree to float precision).

    .venv/bin/python benchmarks/training_vs_transformers.py [--batch 4 --length 256 --steps 6]
    .venv/bin/python benchmarks/training_vs_transformers.py --json benchmarks/results/training_vs_transformers.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from weighted_mtp.losses import mtp_forward_backward
from weighted_mtp.models.checkpoints.hf import export_hf
from weighted_mtp.models.loading import load_model


def batch_of_solutions(tokenizer, raw_data: Path, rows: int, length: int) -> torch.Tensor:
    """`rows` x `length` token ids cut from MBPP train solutions laid end to end."""
    text = "\n\n".join(json.loads(line)["code"] for line in (raw_data / "mbpp" / "train.jsonl").read_text().splitlines())
    ids = tokenizer.encode(text, add_bos=False)[: rows * length]
    return torch.tensor(ids).view(rows, length)


def ours_step(model, optimizer, input_ids: torch.Tensor) -> float:
    out = mtp_forward_backward(model, input_ids, input_ids)  # labels aligned with the inputs: head 1 predicts t+1
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(out.loss)


def theirs_step(model, optimizer, input_ids: torch.Tensor) -> float:
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--models-dir", type=Path, default=Path("storage/models"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import transformers

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", models_dir=args.models_dir, dtype=torch.float32)
    input_ids = batch_of_solutions(tokenizer, args.raw_data, args.batch, args.length)
    with tempfile.TemporaryDirectory(prefix="wmtp-bench-hf-") as scratch:
        hf_model = transformers.LlamaForCausalLM.from_pretrained(export_hf(model, Path(scratch) / "hf"), dtype=torch.float32)
    model.train()
    hf_model.train()
    sides = {
        "ours": (ours_step, model, torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)),
        "transformers": (theirs_step, hf_model, torch.optim.AdamW(hf_model.parameters(), lr=1e-5, foreach=True)),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    first_loss: dict[str, float] = {}
    for step in range(args.warmup + args.steps):
        for name, (run, module, optimizer) in sides.items():
            start = time.perf_counter()
            loss = run(module, optimizer, input_ids)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
            first_loss.setdefault(name, loss)
    tokens = input_ids.numel()
    median = {name: statistics.median(values) for name, values in times.items()}
    row = {
        "dtype": "float32", "heads": 1, "batch": args.batch, "length": args.length,
        "ours_tok_s": tokens / median["ours"], "transformers_tok_s": tokens / median["transformers"],
        "ratio": median["transformers"] / median["ours"],
        "first_loss_ours": first_loss["ours"], "first_loss_transformers": first_loss["transformers"],
    }
    print(f"SmolLM2-135M training step, batch {args.batch} x {args.length}, AdamW, fp32, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"  ours {row['ours_tok_s']:.0f} tok/s, transformers {row['transformers_tok_s']:.0f} tok/s: {row['ratio']:.2f}x; "
          f"first loss {row['first_loss_ours']:.5f} vs {row['first_loss_transformers']:.5f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "benchmark": "training_vs_transformers", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads", "load_average": os.getloadavg()[0],
            "transformers": transformers.__version__, "torch": torch.__version__, "steps": args.steps, "rows": [row],
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
