"""Self-speculative decoding with SmolLM2's own heads, self-distilled as Medusa-1 trains its heads.

SmolLM2-135M has one head; heads 2..4 are added as copies of it, so at first they predict the next
token where their targets are two to four tokens ahead, and their drafts are rarely accepted. Medusa-1
trains such heads on the model's own outputs with the model frozen. Three steps, each composed from the
library's own paths and kept under --work-dir (a step whose output exists is not run again):

1. distillation data: the base model's greedy completions of MBPP train prompts (`wmtp rollout`'s
   path with `rollout.temperature=0`, one sample per problem, no gold solutions), written where the
   `rollouts` dataset reads;
2. heads: the model with 4 heads, trunk and unembedding frozen, the head blocks trained on those
   completions (`wmtp train`'s path, baseline pipeline, full-rank heads, no LoRA);
3. measurement: on held-out prompts (MBPP test, HumanEval), batch 1, plain greedy and self-speculative
   greedy decoding of the distilled model prompt by prompt (`eval.generation.compare_speculative`):
   acceptance per head, tokens per forward, speed-up, and how many outputs differ (none, when
   correct). The untrained copied heads are measured the same way, as the baseline of the training.

Writes `--out` (rendered by `benchmarks/report.py` into docs/BENCHMARKS.md). Target: speed-up of at
least 1.5x over plain greedy decoding on the held-out prompts.

    .venv/bin/python benchmarks/self_distilled_speculation.py            # about 40 minutes on 2 idle cores
    .venv/bin/python benchmarks/self_distilled_speculation.py --quick    # the micro model, seconds
    .venv/bin/python benchmarks/self_distilled_speculation.py --prepare-only   # steps 1-2 (a busy machine will do)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from weighted_mtp.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.5


def config_for(args: argparse.Namespace, *overrides: str):
    from weighted_mtp.config import load_config

    work = args.work_dir.resolve()
    return load_config(
        defaults=str(ROOT / "configs" / "defaults.yaml"), recipe="baseline", preset="cpu-smollm2",
        use_micro_model=args.quick,
        overrides=[f"paths.raw_data={args.raw_data}", f"paths.models={args.models}", f"paths.runs={work / 'runs'}",
                   f"paths.rollouts={work / 'rollouts'}", f"paths.datasets={work / 'datasets'}",
                   "tracking.enabled=false", f"seed={args.seed}", *overrides],
    ).config


def distillation_data(args: argparse.Namespace) -> dict:
    """The base model's greedy completions of MBPP train prompts, labelled by their tests (a finished
    rollout is not made again, an unfinished one resumes)."""
    from weighted_mtp.eval.rollout import run_rollouts

    config = config_for(args, "rollout.temperature=0", f"rollout.max_new_tokens={args.max_new_tokens}")
    summary = run_rollouts(config, split="train", n_samples=1, limit=args.train_problems, include_gold=False)
    return summary.to_dict()


def train_heads(args: argparse.Namespace) -> tuple[Path, dict]:
    """Heads 2..4 (copies of head 1) and head 1's block trained on the completions, all else frozen;
    a finished training (its summary beside the run) is not run again."""
    from weighted_mtp.io import atomic_write_json
    from weighted_mtp.train.run import train

    summary_path = args.work_dir / "training.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        return Path(summary["model_dir"]), summary

    config = config_for(
        args, "experiment.name=self_distilled_heads", f"model.n_future_tokens={args.heads}",
        "model.extra_heads_init=copy", "training.lora.enabled=false", "training.freeze.trunk=frozen",
        "training.freeze.heads=train", "training.freeze.unembedding=frozen", "data.dataset=rollouts",
        "data.sampler=all", "data.split=train", "data.val_split=null", "data.n_samples=null",
        f"training.max_steps={args.steps}", f"training.lr={args.lr}", "training.eval_every=null",
        "training.save_every=null", f"training.batch_size={args.batch_size}", "training.grad_accum_steps=1",
    )
    result = train(config, fresh=True)
    first, last = result.history[0], result.history[-1]
    summary = {"model_dir": str(result.model_dir), "steps": result.steps,
               "head_ce_first_last": {key.split("/")[0]: [first[key], last[key]] for key in first if key.endswith("/ce")}}
    atomic_write_json(summary_path, summary)
    return result.model_dir, summary


def held_out_prompts(args: argparse.Namespace, tokenizer, template: str) -> dict[str, list[list[int]]]:
    from weighted_mtp.data.templates import prompt_adds_bos
    from weighted_mtp.eval.benchmarks import get_benchmark

    prompts = {}
    for name, split in (("mbpp", "test"), ("humaneval", "test")):
        benchmark = get_benchmark(name)
        problems = benchmark.load(args.raw_data, split, args.prompts)
        prompts[f"{name} {split}"] = [
            tokenizer.encode(benchmark.prompt(problem, template, tokenizer), add_bos=prompt_adds_bos(template))
            for problem in problems
        ]
    return prompts


def measure(args: argparse.Namespace, model_name: str, heads: int) -> tuple[str, dict[str, dict]]:
    from weighted_mtp.eval.generation import compare_speculative
    from weighted_mtp.models.loading import generation_dtype, load_model, resolve_device

    config = config_for(args)
    device = resolve_device(config.device)
    dtype = generation_dtype(config, device)
    model, tokenizer = load_model(model_name, n_future_tokens=heads, models_dir=config.paths.models, device=device,
                                  dtype=getattr(torch, dtype), seed=args.seed)
    model.eval()
    rows = {}
    for prompt_set, prompts in held_out_prompts(args, tokenizer, config.data.prompt_template).items():
        comparison = compare_speculative(model, prompts, max_new_tokens=args.max_new_tokens,
                                         stop_ids=tokenizer.stop_ids)
        rows[prompt_set] = comparison.to_dict()
    return dtype, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the micro model, a few problems and steps (tests)")
    parser.add_argument("--train-problems", type=int, help="MBPP train problems to distil on (default: all 374)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=150, help="about 3 epochs of the 374 completions at batch 8")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompts", type=int, default=20, help="held-out prompts per benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="make the data and train the heads, then stop (measure later, on an idle machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--models", type=Path, default=ROOT / "storage" / "models")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "storage" / "bench" / "self-distilled")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "self_distilled_speculation.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.quick:
        args.train_problems, args.steps, args.batch_size, args.prompts, args.max_new_tokens = 4, 2, 2, 2, 8
    if args.threads:
        torch.set_num_threads(args.threads)

    began = time.perf_counter()
    data = distillation_data(args)
    trained_dir, training = train_heads(args)
    if args.prepare_only:
        print(f"heads trained: {trained_dir}; run again without --prepare-only to measure")
        return
    base = "micro" if args.quick else "smollm2-135m"
    dtype, copied = measure(args, base, args.heads)
    _, distilled = measure(args, str(trained_dir), args.heads)
    record = {
        "benchmark": "self_distilled_speculation", "quick": args.quick, "heads": args.heads, "dtype": dtype,
        "max_new_tokens": args.max_new_tokens, "distillation": {
            "problems": data["n_problems"], "generated_tokens": data["generated_tokens"],
            "correct": data["correct"].get("model", 0)},
        "training": {**training, "lr": args.lr, "batch_size": args.batch_size},
        "copied_heads": copied, "distilled_heads": distilled, "target_speedup": TARGET,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.platform(),
        "load_average": os.getloadavg()[0], "wall_s": time.perf_counter() - began, "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"distilled on {data['n_problems']} MBPP train completions ({data['generated_tokens']} tokens), "
          f"{training['steps']} steps; {dtype}, batch 1, {args.max_new_tokens} new tokens at most")
    for name, rows in (("copied heads", copied), ("distilled heads", distilled)):
        for prompt_set, row in rows.items():
            acceptance = " / ".join(f"{100 * a:.0f}%" for a in row["acceptance_per_head"])
            print(f"{name:16} {prompt_set:15} acceptance {acceptance:18} {row['tokens_per_forward']:.2f} tokens/forward "
                  f"{row['speedup']:.2f}x  outputs differing {row['outputs_differing']}/{row['prompts']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
