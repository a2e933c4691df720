"""Plain greedy vs self-speculative greedy decoding: tokens/s side by side, acceptance per head.

Speculation only pays with heads that predict well, so by default the script first trains a small
MTP model on code: a byte-level BPE (1024 tokens) fitted to MBPP solutions, and a LLaMA-style
model (8 trunk blocks + n heads, dim 128) trained on them with `mtp_forward_backward` for a few
thousand steps, until it has memorised them (saved under --work-dir for reruns). Or give `--checkpoint` (anything `load_model` reads) to decode with that model.

Both decoders then continue the same prompts (the first line of MBPP programs) with batch size 1,
alternating prompt by prompt so the load of a shared machine hits both alike, and the script checks
that they produced the same tokens. Prompts come from two sets: programs the model was trained on
(its heads know them: high acceptance, the regime of predictable code) and held-out MBPP test
programs (what a barely trained small model does on new problems).

    .venv/bin/python benchmarks/speculative_decoding.py                       # train, then decode
    .venv/bin/python benchmarks/speculative_decoding.py --steps 600 --heads 4
    .venv/bin/python benchmarks/speculative_decoding.py --checkpoint storage/runs/x/checkpoints/final

Tokens/s counts the generated tokens (prompt processing included in the time) over the wall time;
each decode runs `--repeats` times and the fastest counts, since a shared machine only adds time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from weighted_mtp.eval.generation import generate_ids
from weighted_mtp.eval.speculative import SpeculativeStats, speculative_generate_ids
from weighted_mtp.losses import mtp_forward_backward
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer


def read_programs(raw_data: Path, split: str) -> list[str]:
    path = raw_data / "mbpp" / f"{split}.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: not found (set --raw-data to the directory holding mbpp/)")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["code"].replace("\r\n", "\n") for line in handle if line.strip()]


def first_line_prompt(program: str) -> str:
    """The program up to the end of its first `def` line: the prompt to continue."""
    lines = program.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith("def "):
            return "\n".join(lines[: i + 1]) + "\n"
    return lines[0] + "\n"


def fit_tokenizer(programs: list[str], directory: Path, vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(programs, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    return Tokenizer.from_file(directory / "tokenizer.json")


def train_model(programs: list[str], tokenizer: Tokenizer, args: argparse.Namespace) -> MTPTransformer:
    model_args = ModelArgs(dim=args.dim, n_layers=args.trunk_layers + args.heads, n_heads=args.dim // 32,
                           n_kv_heads=max(1, args.dim // 64), vocab_size=tokenizer.vocab_size,
                           ffn_hidden_dim=3 * args.dim, rope_theta=10000.0, n_future_tokens=args.heads,
                           tie_embeddings=True)
    model = MTPTransformer(model_args)
    model.init_weights(args.seed)
    stream = torch.tensor([t for p in programs for t in [*tokenizer.encode(p), tokenizer.eos_id]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed)
    print(f"training {model.num_parameters() / 1e6:.1f}M parameters ({args.trunk_layers} trunk blocks, "
          f"{args.heads} heads, dim {args.dim}) on {len(stream)} tokens, {args.steps} steps", flush=True)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        offsets = torch.randint(0, len(stream) - args.seq_len, (args.batch_size,), generator=generator)
        batch = torch.stack([stream[o : o + args.seq_len] for o in offsets.tolist()])
        optimizer.zero_grad(set_to_none=True)
        out = mtp_forward_backward(model, batch, batch.clone())
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            accuracy = " ".join(f"{a:.2f}" for a in out.head_accuracy.tolist())
            print(f"  step {step + 1:4d}  loss {out.loss.item():.3f}  head accuracy {accuracy}  "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    return model.eval()


def best_time(decode, repeats: int):
    """The fastest of `repeats` runs (a shared machine only ever adds time) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = decode()
        times.append(time.perf_counter() - start)
    return min(times), result


def benchmark(model, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int, repeats: int) -> dict:
    encoded = [tokenizer.encode(p) for p in prompts]
    # warm-up (allocator, kernels)
    generate_ids(model, [encoded[0]], max_new_tokens=8)
    speculative_generate_ids(model, encoded[0], max_new_tokens=8)
    plain_time = speculative_time = 0.0
    plain_tokens = speculative_tokens = mismatches = 0
    stats = SpeculativeStats(model.n_future_tokens)
    for prompt in encoded:
        seconds, [plain] = best_time(lambda p=prompt: generate_ids(
            model, [p], max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids), repeats)
        plain_time += seconds
        seconds, (fast, prompt_stats) = best_time(lambda p=prompt: speculative_generate_ids(
            model, p, max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids), repeats)
        speculative_time += seconds
        plain_tokens += len(plain.token_ids)
        speculative_tokens += len(fast.token_ids)
        mismatches += fast.token_ids != plain.token_ids
        stats.add(prompt_stats)
    return {
        "prompts": len(prompts), "tokens": plain_tokens, "mismatches": mismatches,
        "plain_tok_s": plain_tokens / plain_time, "speculative_tok_s": speculative_tokens / speculative_time,
        "speedup": (speculative_tokens / speculative_time) / (plain_tokens / plain_time),
        "tokens_per_forward": stats.tokens_per_forward, "acceptance": stats.acceptance_rates,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="decode with this model (load_model path or name) instead of training")
    parser.add_argument("--raw-data", type=Path, default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
                        help="the paths.raw_data directory holding mbpp/ (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="MTP heads (n_future_tokens)")
    parser.add_argument("--trunk-layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train-programs", type=int, default=16,
                        help="train on the first N MBPP train+validation programs (0: all)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per set")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="time each decode this many times, keep the fastest")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("storage/bench/speculative"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_programs = read_programs(args.raw_data, "train") + read_programs(args.raw_data, "validation")
    if args.train_programs:
        train_programs = train_programs[: args.train_programs]
    test_programs = read_programs(args.raw_data, "test")
    if args.checkpoint:
        from weighted_mtp.models.loading import load_model

        model, tokenizer = load_model(args.checkpoint, n_future_tokens=args.heads)
        model.eval()
    else:
        from weighted_mtp.models.checkpoints.native import save

        tokenizer = fit_tokenizer(train_programs, args.work_dir / "tokenizer", args.vocab_size)
        model = train_model(train_programs, tokenizer, args)
        save(model, args.work_dir / "model", tokenizer=tokenizer)
        print(f"saved to {args.work_dir / 'model'} (rerun with --checkpoint to skip training)")

    print(f"\ngreedy decoding, batch size 1, up to {args.max_new_tokens} new tokens, "
          f"{torch.get_num_threads()} thread(s), {model.n_future_tokens} heads")
    header = f"{'prompts':<22} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} {'tok/fwd':>7}  acceptance (heads 2..n)"
    print(header)
    print("-" * len(header))
    sets = {"trained-on programs": train_programs, "held-out (MBPP test)": test_programs}
    for name, programs in sets.items():
        prompts = [first_line_prompt(p) for p in programs[: args.prompts]]
        r = benchmark(model, tokenizer, prompts, args.max_new_tokens, args.repeats)
        acceptance = " ".join(f"{a:.2f}" for a in r["acceptance"])
        print(f"{name:<22} {r['plain_tok_s']:>11.1f} {r['speculative_tok_s']:>10.1f} {r['speedup']:>7.2f}x "
              f"{r['tokens_per_forward']:>7.2f}  {acceptance}   ({r['tokens']} tokens, "
              f"{r['mismatches']} of {r['prompts']} outputs differ from plain greedy)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
