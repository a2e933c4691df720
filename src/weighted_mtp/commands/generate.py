"""`wmtp generate`: try a model by hand: one prompt in, its completion out.

The prompt is wrapped in the model's chat template when it has one (`--raw` sends it as it is), and
generation uses the same decoding as evaluation (greedy by default; `--speculative` drafts with the
model's own MTP heads, greedily or, with `--temperature`, by speculative sampling that keeps the
model's distribution, and prints how many tokens each forward gave).
"""

from __future__ import annotations

import argparse
import sys
import time

from weighted_mtp.commands.common import add_config_arguments, resolve
from weighted_mtp.errors import ConfigError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate a completion for one prompt (chat template if any)")
    add_config_arguments(parser)
    parser.add_argument("--model", required=True, help="a named model, a checkpoint directory or a .gguf file")
    parser.add_argument("--prompt", required=True, help="the user message (or, with --raw, the exact text)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--speculative", action="store_true",
                        help="draft with the model's MTP heads (greedy, or sampling that keeps the model's distribution)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from weighted_mtp.eval.generation import generate, speculative_generate_ids, speculative_sample_ids
    from weighted_mtp.models.loading import load_model_for_generation

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ConfigError(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature}, {args.top_p}")
    config = resolve(args).config
    model, tokenizer, device, dtype = load_model_for_generation(config, args.model)
    chat = not args.raw and tokenizer.has_chat_template
    text = (
        tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
        if chat
        else args.prompt
    )
    if args.speculative and model.n_future_tokens == 1:
        print("warning: the model has one head: nothing to draft with, one token per forward", file=sys.stderr)
    start = time.perf_counter()
    if args.speculative:
        ids = tokenizer.encode(text, add_bos=not chat)
        if args.temperature > 0:
            result, stats = speculative_sample_ids(
                model, ids, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                stop_ids=tokenizer.stop_ids, seed=config.seed,
            )
        else:
            result, stats = speculative_generate_ids(
                model, ids, max_new_tokens=args.max_new_tokens, stop_ids=tokenizer.stop_ids
            )
        completion, n_tokens = tokenizer.decode(list(result.token_ids)), len(result.token_ids)
        extra = f", {stats.tokens_per_forward:.2f} tokens per forward"
    else:
        (sample,), = generate(
            model, tokenizer, [text], temperature=args.temperature, top_p=args.top_p,
            max_new_tokens=args.max_new_tokens, add_bos=not chat, seed=config.seed,
        )
        completion, n_tokens, extra = sample.text, len(sample.token_ids), ""
    seconds = time.perf_counter() - start
    print(completion)
    print(f"{n_tokens} tokens in {seconds:.1f} s ({n_tokens / max(seconds, 1e-9):.1f} tok/s, {dtype} on {device}{extra})",
          file=sys.stderr)  # fmt: skip
    return 0
