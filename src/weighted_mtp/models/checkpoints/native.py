"""The project's own checkpoints: `model.safetensors` + `config.json` (`"format": "weighted_mtp"`).

Keys are ours (Meta's names, interleaved rotary), every head included; the tokenizer is saved beside
the weights so a checkpoint directory is self-contained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from weighted_mtp.errors import CheckpointError
from weighted_mtp.io import atomic_directory, atomic_write_json
from weighted_mtp.models.checkpoints import RawCheckpoint, read_json, safetensors_sources
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer

FORMAT = "weighted_mtp"
WEIGHTS = "model.safetensors"


def _model_args_dict(config: dict) -> dict | None:
    """Ours: {"format": "weighted_mtp", "model_args": {...}}; a bare ModelArgs dict is accepted too."""
    if config.get("format") == FORMAT:
        return config.get("model_args")
    return config if {"dim", "n_layers", "ffn_hidden_dim"} <= set(config) else None


def detect(path: Path) -> bool:
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    try:
        return _model_args_dict(read_json(path / "config.json")) is not None
    except CheckpointError:
        return False


def write_checkpoint(
    model: MTPTransformer, directory: Path, *, tokenizer=None, extra: dict[str, Any] | None = None
) -> None:
    """Write into an existing directory (the caller makes it atomic)."""
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    if model.args.tie_embeddings:
        state.pop("output.weight")  # the same storage as tok_embeddings; safetensors refuses shared tensors
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "model_args": model.args.to_dict(),
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
    }
    if extra:
        config["extra"] = extra
    atomic_write_json(directory / "config.json", config)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save(
    model: MTPTransformer, directory: Path, *, tokenizer=None, extra: dict[str, Any] | None = None
) -> Path:
    """Save atomically: the directory appears complete or not at all."""
    with atomic_directory(directory) as tmp:
        write_checkpoint(model, tmp, tokenizer=tokenizer, extra=extra)
    return directory


def load(path: Path) -> RawCheckpoint:
    config_path = path / "config.json"
    args_dict = _model_args_dict(read_json(config_path))
    if args_dict is None:
        raise CheckpointError(f"{config_path}: no model_args (not a weighted_mtp checkpoint)")
    try:
        args = ModelArgs.from_dict(dict(args_dict))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: invalid model_args: {exc}") from None
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: file not found")
    state = safetensors_sources(weights)
    tokenizer = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()), None)
    return RawCheckpoint(args, state, tokenizer, path, "native")
