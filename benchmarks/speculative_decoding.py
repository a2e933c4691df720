"""Plain greedy vs self-speculative greedy decoding: tokens/s side by side, acceptance per head.

Speculation only pays with heads that predict well, and only where running the model over a few
tokens costs about what one token does (matrix products bound by reading the weights, not by
per-op dispatch). So by default the script first trains such a model on code: a byte-level BPE
(2048 tokens) fitted to all MBPP train solutions, and a LLaMA-style model (8 trunk blocks + 6 heads,
dim 384, 26M parameters: 7 MB of weights per block, 99 MB in all, more than the L3 cache) trained
with `mtp_forward_backward` on the first 16 MBPP train programs, whole programs from their first
token, until it has memorised them (600 steps, ~7 minutes on 2 idle cores; saved under --work-dir,
reuse it with --checkpoint). `--heads 4` trains Meta's 4 heads instead; `--trunk-layers 16` a deeper
trunk (docs/generation.md has what each measured and why the default has 6 heads).

Both decoders then continue the same prompts (the first `def` line of MBPP programs) with batch
size 1, alternating prompt by prompt so the load of a shared machine hits both alike, and the script
checks that they produced the same tokens. Three prompt sets: programs the model was trained on (its
heads know them: the regime of predictable code) and held-out MBPP validation and test programs
(what a small model trained on 16 programs does on new problems). By default it drafts with 4 heads
and with all the model has, one row each.

    .venv/bin/python benchmarks/speculative_decoding.py                       # train, then decode
    .venv/bin/python benchmarks/speculative_decoding.py --checkpoint storage/bench/speculative/model \
        --draft-heads 2,3,4,5,6                                               # one row per number of heads
    .venv/bin/python benchmarks/speculative_decoding.py --heads 4 --work-dir storage/bench/speculative-h4
    .venv/bin/python benchmarks/speculative_decoding.py --checkpoint storage/runs/x/checkpoints/final

Tokens/s counts the generated tokens (prompt processing included in the time) over the wall time;
each decode runs `--repeats` times and the fastest counts, since a shared machine only adds time.
"Step cost" is the time of one speculative step (one model call) over one plain step, so
speed-up = tokens per forward / step cost.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from weighted_mtp.eval.generation import SpeculativeStats, generate_ids, speculative_generate_ids
from weighted_mtp.losses import IGNORE_INDEX, mtp_forward_backward
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer


def read_programs(raw_data: Path, split: str) -> list[str]:
    path = raw_data / "mbpp" / f"{split}.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: not found (set --raw-data to the directory holding mbpp/)")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["code"].replace("\r\n", "\n") for line in handle if line.strip()]


def first_line_prompt(tokenizer: Tokenizer, program: str) -> list[int]:
    """The program's tokens up to the end of its first `def` line: the prompt to continue.

    Cut from the whole program's tokens, not encoded alone, so the prompt ends on the token boundary
    the model saw in context (encoding "def f(x):\n" alone would end in a lone "\n" token where the
    program has "\n\t", which puts a model that memorised the program off its track).
    """
    lines = program.split("\n")
    def_line = next((i for i, line in enumerate(lines) if line.lstrip().startswith("def ")), 0)
    prompt_chars = len("\n".join(lines[: def_line + 1])) + 1
    ids = tokenizer.encode(program)
    for end in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:end])) >= prompt_chars:
            return ids[:end]
    return ids


def fit_tokenizer(programs: list[str], directory: Path, vocab_size: int) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(programs, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    backend.save(str(directory / "tokenizer.json"))
    return Tokenizer.from_file(directory / "tokenizer.json")


def train_model(programs: list[str], tokenizer: Tokenizer, args: argparse.Namespace) -> MTPTransformer:
    model_args = ModelArgs(
        dim=args.dim,
        n_layers=args.trunk_layers + args.heads,
        n_heads=max(1, args.dim // 64),
        n_kv_heads=max(1, args.dim // 128),
        vocab_size=tokenizer.vocab_size,
        ffn_hidden_dim=3 * args.dim,
        rope_theta=10000.0,
        n_future_tokens=args.heads,
        tie_embeddings=True,
    )
    model = MTPTransformer(model_args)
    model.init_weights(args.seed)
    # Whole programs from their first token, as decoding sees them (random fixed-length windows leave
    # the heads unsure of any position past the window length, where long programs then diverge).
    examples = [torch.tensor([*tokenizer.encode(p), tokenizer.eos_id][: args.seq_len]) for p in programs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed)
    print(
        f"training {model.num_parameters() / 1e6:.1f}M parameters ({args.trunk_layers} trunk blocks, "
        f"{args.heads} heads, dim {args.dim}) on {len(examples)} programs "
        f"({sum(len(e) for e in examples)} tokens), {args.steps} steps",
        flush=True,
    )
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        chosen = torch.randint(0, len(examples), (args.batch_size,), generator=generator).tolist()
        longest = max(len(examples[i]) for i in chosen)
        batch = torch.full((len(chosen), longest), tokenizer.eos_id)
        labels = torch.full((len(chosen), longest), IGNORE_INDEX)
        for row, i in enumerate(chosen):  # right padding: causal attention keeps it out of the real tokens
            batch[row, : len(examples[i])] = labels[row, : len(examples[i])] = examples[i]
        optimizer.zero_grad(set_to_none=True)
        out = mtp_forward_backward(model, batch, labels)
        optimizer.step()
        schedule.step()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            accuracy = " ".join(f"{a:.2f}" for a in out.head_accuracy.tolist())
            print(
                f"  step {step + 1:4d}  loss {out.loss.item():.3f}  head accuracy {accuracy}  "
                f"({time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    return model.eval()


def best_time(decode, repeats: int):
    """The fastest of `repeats` runs (a shared machine only ever adds time) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = decode()
        times.append(time.perf_counter() - start)
    return min(times), result


def benchmark(
    model,
    tokenizer: Tokenizer,
    encoded: list[list[int]],
    max_new_tokens: int,
    repeats: int,
    draft_heads: list[int],
) -> list[dict]:
    """Plain greedy and speculative greedy with each number of heads in `draft_heads`, prompt by prompt."""
    # warm-up (allocator, kernels)
    generate_ids(model, [encoded[0]], max_new_tokens=8)
    speculative_generate_ids(model, encoded[0], max_new_tokens=8)
    plain_time, plain_tokens = 0.0, 0
    times = dict.fromkeys(draft_heads, 0.0)
    stats = {n: SpeculativeStats(n) for n in draft_heads}
    mismatches = dict.fromkeys(draft_heads, 0)
    for prompt in encoded:
        seconds, [plain] = best_time(
            lambda p=prompt: generate_ids(
                model, [p], max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids
            ),
            repeats,
        )
        plain_time += seconds
        plain_tokens += len(plain.token_ids)
        for n in draft_heads:
            seconds, (fast, prompt_stats) = best_time(
                lambda p=prompt, n=n: speculative_generate_ids(
                    model, p, max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids, n_heads=n
                ),
                repeats,
            )
            times[n] += seconds
            mismatches[n] += fast.token_ids != plain.token_ids
            stats[n].add(prompt_stats)
    plain_tok_s = plain_tokens / plain_time
    plain_step_ms = 1e3 * plain_time / plain_tokens  # one forward per token
    rows = []
    for n in draft_heads:
        tok_s = stats[n].new_tokens / times[n]
        step_ms = 1e3 * times[n] / stats[n].forwards
        rows.append(
            {
                "heads": n,
                "prompts": len(encoded),
                "tokens": plain_tokens,
                "mismatches": mismatches[n],
                "plain_tok_s": plain_tok_s,
                "speculative_tok_s": tok_s,
                "speedup": tok_s / plain_tok_s,
                "tokens_per_forward": stats[n].tokens_per_forward,
                "acceptance": stats[n].acceptance_rates,
                "plain_step_ms": plain_step_ms,
                "speculative_step_ms": step_ms,
                "step_cost": step_ms / plain_step_ms,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", help="decode with this model (load_model path or name) instead of training"
    )
    parser.add_argument(
        "--raw-data",
        type=Path,
        default=Path(__file__).resolve().parents[1].parent / "shared" / "data",
        help="the paths.raw_data directory holding mbpp/ (default: %(default)s)",
    )
    parser.add_argument("--heads", type=int, default=6, help="MTP heads (n_future_tokens, default 6)")
    parser.add_argument(
        "--trunk-layers", type=int, default=8, help="trunk blocks under the heads (default 8)"
    )
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--vocab-size", type=int, default=2048, help="BPE fitted to all MBPP train solutions")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=4, help="programs per training step")
    parser.add_argument("--seq-len", type=int, default=256, help="programs are cut to this many tokens")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--train-programs", type=int, default=16, help="train on the first N MBPP train programs (0: all)"
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per set")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument(
        "--repeats", type=int, default=3, help="time each decode this many times, keep the fastest"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for decoding (default 1)")
    parser.add_argument("--train-threads", type=int, default=2, help="torch CPU threads for training")
    parser.add_argument(
        "--draft-heads",
        default="",
        help="comma-separated numbers of heads to draft with, one row each "
        "(default: 4 and all the model has)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("storage/bench/speculative"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    all_train_programs = read_programs(args.raw_data, "train")
    train_programs = all_train_programs[: args.train_programs or None]
    if args.checkpoint:
        from weighted_mtp.models.loading import load_model

        model, tokenizer = load_model(args.checkpoint, n_future_tokens=args.heads)
        model.eval()
    else:
        from weighted_mtp.models.checkpoints.native import save

        tokenizer = fit_tokenizer(all_train_programs, args.work_dir / "tokenizer", args.vocab_size)
        torch.set_num_threads(args.train_threads)
        model = train_model(train_programs, tokenizer, args)
        torch.set_num_threads(args.threads)
        save(model, args.work_dir / "model", tokenizer=tokenizer)
        print(f"saved to {args.work_dir / 'model'} (rerun with --checkpoint to skip training)")

    print(
        f"\ngreedy decoding, batch size 1, up to {args.max_new_tokens} new tokens, "
        f"{torch.get_num_threads()} thread(s), {model.n_future_tokens} heads, fastest of {args.repeats}"
    )
    header = (
        f"{'prompts':<24} {'heads':>5} {'plain tok/s':>11} {'spec tok/s':>10} {'speed-up':>8} {'tok/fwd':>7} "
        f"{'step cost':>9}  acceptance (heads 2..n)"
    )
    print(header)
    print("-" * len(header))
    sets = {
        "trained-on (MBPP train)": train_programs,
        "held-out (MBPP valid.)": read_programs(args.raw_data, "validation"),
        "held-out (MBPP test)": read_programs(args.raw_data, "test"),
    }
    draft_heads = (
        [int(n) for n in args.draft_heads.split(",")]
        if args.draft_heads
        else sorted({min(4, model.n_future_tokens), model.n_future_tokens})
    )
    results = {}
    for name, programs in sets.items():
        prompts = [first_line_prompt(tokenizer, p) for p in programs[: args.prompts]]
        results[name] = benchmark(model, tokenizer, prompts, args.max_new_tokens, args.repeats, draft_heads)
        for r in results[name]:
            acceptance = " ".join(f"{a:.2f}" for a in r["acceptance"])
            print(
                f"{name:<24} {r['heads']:>5} {r['plain_tok_s']:>11.1f} {r['speculative_tok_s']:>10.1f} "
                f"{r['speedup']:>7.2f}x {r['tokens_per_forward']:>7.2f} {r['step_cost']:>8.2f}x  {acceptance:<15} "
                f"({r['tokens']} tokens, {r['mismatches']} of {r['prompts']} outputs differ from plain greedy)",
                flush=True,
            )
    print(
        "\nstep cost: a speculative step's time over a plain step's (plain: "
        f"{results[name][0]['plain_step_ms']:.2f} ms); speed-up = tokens per forward / step cost"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
