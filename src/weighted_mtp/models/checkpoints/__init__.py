"""Checkpoint formats. Each format module turns files into (ModelArgs, state dict in Meta's key names).

Formats are tried in `FORMATS` order; the first whose `detect(path)` is true loads the path. To add a
format, write a module with `detect(path) -> bool` and `load(path) -> RawCheckpoint` and list it there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weighted_mtp.errors import CheckpointError
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer


@dataclass
class RawCheckpoint:
    """What a format reader produces: the architecture, the weights under our key names, a tokenizer file."""

    args: ModelArgs
    state_dict: dict[str, Tensor]
    tokenizer_path: Path | None
    source: Path
    format: str


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path], RawCheckpoint]


def formats() -> list[CheckpointFormat]:
    from weighted_mtp.models.checkpoints import gguf, hf, meta, native

    return [
        CheckpointFormat("meta", meta.detect, meta.load),
        CheckpointFormat("native", native.detect, native.load),
        CheckpointFormat("hf", hf.detect, hf.load),
        CheckpointFormat("gguf", gguf.detect, gguf.load),
    ]


def read_checkpoint(path: Path) -> RawCheckpoint:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    for fmt in formats():
        if fmt.detect(path):
            return fmt.load(path)
    raise CheckpointError(
        f"{path}: not a model checkpoint (expected a Meta dir with params.json, an HF or native dir with "
        "config.json, or a .gguf file)"
    )


def build_model(
    raw: RawCheckpoint, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MTPTransformer:
    """Instantiate without allocating random weights, then take the checkpoint's tensors as they are."""
    with torch.device("meta"):
        model = MTPTransformer(raw.args)
    expected = model.state_dict()
    state = dict(raw.state_dict)
    if raw.args.tie_embeddings:
        state.pop("output.weight", None)
        expected.pop("output.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [
            f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}"
            if unexpected
            else "",
        ]
        raise CheckpointError(
            f"{raw.source}: tensors do not match the architecture: {'; '.join(p for p in parts if p)}"
        )
    for name, tensor in state.items():
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{raw.source}: tensor {name} has shape {tuple(tensor.shape)}, expected {want}"
            )
    model.load_state_dict(
        {name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()},
        strict=False,
        assign=True,
    )
    if raw.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model


def read_json(path: Path) -> dict:
    import json

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def require(config: dict, key: str, path: Path):
    if key not in config:
        raise CheckpointError(f"{path}: missing field {key!r}")
    return config[key]
