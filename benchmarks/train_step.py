"""Training-step speed of the Trainer under its main options, side by side.

Each configuration runs the real baseline training (MBPP, the Trainer, AdamW, clipping, checkpoint
at the end) in a fresh process for `--steps` steps and reports the median step time after the first
(warm-up) step, tokens per second, the number of trainable parameters, and how long the final
checkpoint took to write, with ratios to full fine-tuning.

    .venv/bin/python benchmarks/train_step.py                          # the micro model
    .venv/bin/python benchmarks/train_step.py --model smollm2-135m --max-length 256 --steps 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGURATIONS = {
    "full": [],
    "lora r=16": ["training.lora.enabled=true", "training.lora.r=16", "training.lora.alpha=32"],
    "frozen trunk": ["training.freeze.trunk=frozen"],
    "activation ckpt": ["model.activation_checkpointing=true"],
    "accum x2, batch/2": ["training.grad_accum_steps=2", "training.batch_size=1"],
}


def measure(model: str, max_length: int, steps: int, overrides: list[str], runs: Path) -> dict[str, float]:
    """One configuration in this process (called in a child)."""
    from weighted_mtp.config import load_config
    from weighted_mtp.data import build_loader
    from weighted_mtp.models.loading import load_model_from_config
    from weighted_mtp.objectives import BaselineObjective
    from weighted_mtp.train.trainer import Trainer

    config = load_config(
        recipe="baseline",
        overrides=[
            f"model.name={model}", "model.n_future_tokens=2", f"data.max_length={max_length}",
            "data.n_samples=64", "training.batch_size=2", f"training.max_steps={steps}", "training.save_every=null",
            "training.eval_every=null", "data.val_split=null", "tracking.enabled=false", "device=cpu",
            f"paths.runs={runs}", "logging.progress_bar=never", *overrides,
        ],
    ).config  # fmt: skip
    model_, tokenizer = load_model_from_config(config)
    loader = build_loader(config, tokenizer, split="train")
    trainer = Trainer(config, model_, BaselineObjective(chunk_size=config.training.loss_chunk_size), loader,
                      export_model=False)  # fmt: skip
    trainable = sum(p.numel() for p in trainer.trainable)
    result = trainer.fit()
    steady = result.history[1:]
    started = time.perf_counter()
    trainer._save()
    return {
        "step_s": statistics.median(m["step_time_s"] for m in steady),
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in steady),
        "trainable_m": trainable / 1e6,
        "save_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="micro")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        overrides = json.loads(args.child)
        with tempfile.TemporaryDirectory() as runs:
            print(json.dumps(measure(args.model, args.max_length, args.steps, overrides, Path(runs))))
        return

    print(f"model {args.model}, 2 heads, 2 x {args.max_length} tokens per step, {args.steps} steps, CPU")
    header = f"{'configuration':20s} {'step s':>8s} {'x full':>7s} {'tok/s':>8s} {'trainable M':>12s} {'save s':>7s}"
    print(header)
    print("-" * len(header))
    baseline = None
    for name, overrides in CONFIGURATIONS.items():
        command = [sys.executable, __file__, "--model", args.model, "--max-length", str(args.max_length),
                   "--steps", str(args.steps), "--child", json.dumps(overrides)]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{name:20s} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        baseline = baseline or row["step_s"]
        print(
            f"{name:20s} {row['step_s']:8.3f} {row['step_s'] / baseline:7.2f} {row['tokens_per_s']:8.0f} "
            f"{row['trainable_m']:12.2f} {row['save_s']:7.2f}"
        )


if __name__ == "__main__":
    main()
