"""Where the model's time goes: attention mask paths in training, and the KV cache in decoding.

1. Forward + backward of one batch through the trunk and every head block (hidden states only: the
   unembedding's cost belongs to the loss benchmark) with no mask,
   with a right-padding mask (detected, so SDPA keeps its fused causal path) and with a left-padding
   mask (an explicit boolean mask, K/V heads expanded for GQA).
2. Greedy decoding of --new-tokens tokens after a --prompt-length prompt: with the KV cache (one
   token per step) against recomputing the whole sequence every step.

    .venv/bin/python benchmarks/model_forward.py [--model micro|smollm2-135m] [--batch 4 --length 512]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from weighted_mtp.models.loading import load_model


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="micro")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models-dir", type=Path, default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        model, _ = load_model(
            args.model, n_future_tokens=args.heads, models_dir=args.models_dir or Path(scratch)
        )
    model.to(device)
    vocab = model.args.vocab_size
    print(f"{args.model}: {model.num_parameters() / 1e6:.1f}M parameters, {args.heads} heads, {device}")

    tokens = torch.randint(0, vocab, (args.batch, args.length), device=device)
    right = torch.ones_like(tokens)
    right[:, -args.length // 4 :] = 0
    left = right.flip(1)

    def step(mask: torch.Tensor | None) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            h_trunk = model.trunk_forward(tokens, attention_mask=mask)
            heads = [
                model.head_forward(k, h_trunk, attention_mask=mask) for k in range(model.n_future_tokens)
            ]
            torch.stack(heads).square().mean().backward()

        return run

    model.train()
    base = best_of(args.repeats, step(None))
    print(f"\nforward+backward of the blocks, batch {args.batch} x {args.length}, all heads")
    print(f"  {'no mask':<22} {base * 1e3:9.1f} ms  1.00x")
    for name, mask in (("right-padding mask", right), ("left-padding mask", left)):
        seconds = best_of(args.repeats, step(mask))
        print(f"  {name:<22} {seconds * 1e3:9.1f} ms  {seconds / base:.2f}x")

    model.eval()
    prompt = torch.randint(0, vocab, (1, args.prompt_length), device=device)

    @torch.no_grad()
    def decode_cached() -> None:
        cache = model.new_cache(1, args.prompt_length + args.new_tokens)
        logits = model(prompt, cache=cache).logits[:, -1, 0]
        for position in range(args.prompt_length, args.prompt_length + args.new_tokens - 1):
            logits = model(logits.argmax(-1, keepdim=True), start_pos=position, cache=cache).logits[:, -1, 0]

    @torch.no_grad()
    def decode_recompute() -> None:
        sequence = prompt
        for _ in range(args.new_tokens):
            next_token = model(sequence).logits[:, -1, 0].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)

    cached = best_of(args.repeats, decode_cached)
    recompute = best_of(args.repeats, decode_recompute)
    print(f"\ngreedy decoding, prompt {args.prompt_length}, {args.new_tokens} new tokens")
    print(f"  {'KV cache':<22} {args.new_tokens / cached:9.1f} tok/s  1.00x")
    print(
        f"  {'recompute every step':<22} {args.new_tokens / recompute:9.1f} tok/s  {cached / recompute:.2f}x"
    )


if __name__ == "__main__":
    main()
