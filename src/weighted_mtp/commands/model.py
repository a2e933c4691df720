"""`wmtp model fetch|info|export`: resolve named models, describe checkpoints, convert them."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from weighted_mtp.errors import CheckpointError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="fetch named models, inspect and export checkpoints")
    actions = parser.add_subparsers(dest="model_command", metavar="ACTION", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--models-dir",
            type=Path,
            default=Path("storage/models"),
            help="where named models are resolved (default: %(default)s)",
        )
        sub.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])

    fetch = actions.add_parser("fetch", help="resolve a named model into the models directory")
    fetch.add_argument("name", help="smollm2-135m (micro shares its tokenizer)")
    common(fetch)
    fetch.set_defaults(func=run_fetch)

    info = actions.add_parser(
        "info", help="architecture, parameters and heads of a named model or checkpoint"
    )
    info.add_argument(
        "model", help="a named model or a path: Meta dir, HF dir, .gguf file, native checkpoint"
    )
    info.add_argument("--json", action="store_true", help="print JSON")
    common(info)
    info.set_defaults(func=run_info)

    export = actions.add_parser("export", help="write a model as a Hugging Face or native checkpoint")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--to-hf",
        action="store_true",
        help="LlamaForCausalLM directory of head 1; extra heads in mtp_heads.safetensors",
    )
    target.add_argument("--to-native", action="store_true", help="safetensors + config.json, every head")
    target.add_argument(
        "--adapter",
        action="store_true",
        help="the PEFT adapter of a LoRA run (source: <run>/final), for peft on the HF export of the base model",
    )
    export.add_argument("source", help="a named model or checkpoint path")
    export.add_argument("destination", type=Path)
    export.add_argument("--n-future-tokens", type=int, help="grow/shrink to this many heads first")
    export.add_argument("--extra-heads-init", choices=["copy", "random"], default="copy")
    common(export)
    export.set_defaults(func=run_export)


def run_fetch(args: argparse.Namespace) -> int:
    from weighted_mtp.models.loading import resolve_smollm2

    if args.name not in ("smollm2-135m", "micro"):
        raise CheckpointError(
            f"{args.name}: only smollm2-135m (and micro, which uses its tokenizer) can be fetched"
        )
    print(resolve_smollm2(args.models_dir))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from weighted_mtp.models.checkpoints import build_model
    from weighted_mtp.models.loading import read_named_or_path
    from weighted_mtp.models.tokenizer import Tokenizer

    raw = read_named_or_path(args.model, args.models_dir)
    model = build_model(raw)
    a = raw.args
    tokenizer = Tokenizer.from_file(raw.tokenizer_path) if raw.tokenizer_path else None
    info = {
        "source": str(raw.source),
        "format": raw.format,
        "parameters": model.num_parameters(),
        "heads": a.n_future_tokens,
        "trunk_blocks": len(model.layers) - 1,
        "blocks": a.n_layers,
        "dim": a.dim,
        "attention_heads": a.n_heads,
        "kv_heads": a.n_kv_heads,
        "ffn_hidden_dim": a.ffn_hidden_dim,
        "vocab_size": a.vocab_size,
        "rope_theta": a.rope_theta,
        "max_seq_len": a.max_seq_len,
        "tied_embeddings": a.tie_embeddings,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokenizer": str(raw.tokenizer_path) if raw.tokenizer_path else None,
    }
    if tokenizer is not None:
        info.update(
            tokenizer_vocab=tokenizer.vocab_size,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            chat_template=tokenizer.has_chat_template,
        )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            shown = f"{value / 1e6:.2f}M" if key == "parameters" else value
            print(f"{key:<{width}}  {shown}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from weighted_mtp.models.checkpoints import hf, native
    from weighted_mtp.models.loading import load_model

    if args.adapter:
        adapter = Path(args.source) / hf.ADAPTER_DIR
        if not (adapter / "adapter_config.json").is_file():
            raise CheckpointError(f"{args.source}: no PEFT adapter (only a LoRA run's final/ export has {hf.ADAPTER_DIR}/)")
        if args.destination.exists():
            raise CheckpointError(f"{args.destination}: already exists; nothing was written")
        shutil.copytree(adapter, args.destination)
        print(args.destination)
        return 0

    model, tokenizer = load_model(
        args.source,
        n_future_tokens=args.n_future_tokens,
        extra_heads_init=args.extra_heads_init,
        models_dir=args.models_dir,
    )
    if args.to_hf:
        hf.export_hf(model, args.destination, tokenizer=tokenizer)
    else:
        native.save(model, args.destination, tokenizer=tokenizer)
    print(args.destination)
    return 0
