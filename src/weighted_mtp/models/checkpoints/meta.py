"""Meta's release format: `params.json` + `consolidated[.NN].pth` model-parallel shards + `tokenizer.model`.

Meta's fairscale layers split each tensor across shards: column-parallel layers (wq, wk, wv, w1, w3,
output) along their output rows (dim 0), row-parallel layers (wo, w2) and the parallel embedding along
dim 1; norms are replicated. Loading concatenates along those dims.

Shards are memory-mapped (`torch.load(mmap=True)`); each tensor is copied out (cast, and concatenated
across shards) when the model is built, and its file pages are dropped right after, so a 28 GB fp32
checkpoint never needs more than its parameters plus one tensor in memory.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import Tensor

from weighted_mtp.errors import CheckpointError
from weighted_mtp.models.checkpoints import (
    RawCheckpoint,
    TensorSource,
    read_json,
    release_file_pages,
    require,
)
from weighted_mtp.models.transformer import ModelArgs

ROW_SPLIT = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "output.weight",
)
COLUMN_SPLIT = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")
IGNORED = ("rope.freqs",)  # precomputed rotary tables some releases include; recomputed from theta


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").is_file()


def shard_dim(name: str) -> int | None:
    """The dim a tensor is split along across model-parallel shards, None when replicated."""
    if name.endswith(ROW_SPLIT):
        return 0
    if name.endswith(COLUMN_SPLIT):
        return 1
    return None


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_merged(parts: list[Tensor], dim: int | None, dtype: torch.dtype) -> Tensor:
    """One tensor in `dtype` from its memory-mapped shard pieces, then the pieces' pages released."""
    if dim is None or len(parts) == 1:
        merged = parts[0].to(dtype=dtype, copy=True)
    else:
        merged = torch.cat([part.to(dtype) for part in parts], dim=dim)
    for part in parts:
        release_file_pages(part)
    return merged


def read_merged_rows(parts: list[Tensor], dim: int | None, dtype: torch.dtype, start: int, stop: int) -> Tensor:
    """Rows [start, stop) of the merged tensor, touching only the pieces' pages that hold them."""
    if dim == 0:  # the pieces are consecutive row blocks
        pieces, offset = [], 0
        for part in parts:
            lo, hi = max(start - offset, 0), min(stop - offset, part.shape[0])
            if lo < hi:
                pieces.append(part[lo:hi])
            offset += part.shape[0]
        return read_merged(pieces or [parts[0][:0]], 0, dtype)
    return read_merged([part[start:stop] for part in parts], dim, dtype)


def merged_source(parts: list[Tensor], dim: int | None) -> TensorSource:
    shape = list(parts[0].shape)
    if dim is not None:
        shape[dim] = sum(part.shape[dim] for part in parts)
    return TensorSource(tuple(shape), lambda dtype: read_merged(parts, dim, dtype),
                        lambda dtype, start, stop: read_merged_rows(parts, dim, dtype, start, stop))


def merge_shards(shards: list[dict[str, Tensor]], paths: list[Path]) -> dict[str, TensorSource]:
    names = list(shards[0])
    for shard, path in zip(shards[1:], paths[1:]):
        if set(shard) != set(names):
            raise CheckpointError(f"{path}: holds different tensors than {paths[0].name}")
    return {
        name: merged_source([shard[name] for shard in shards], shard_dim(name))
        for name in names
        if name not in IGNORED
    }


def load(path: Path) -> RawCheckpoint:
    params_path = path / "params.json"
    params = read_json(params_path)
    shard_paths = sorted(
        path.glob("*.pth")
    )  # consolidated.pth, or consolidated.00.pth, .01 ... (Meta's glob)
    if not shard_paths:
        raise CheckpointError(f"{path}: no consolidated*.pth shard beside params.json")
    shards = []
    for shard_path in shard_paths:
        try:
            shards.append(torch.load(shard_path, map_location="cpu", mmap=True, weights_only=True))
        except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            raise CheckpointError(
                f"{shard_path}: cannot read checkpoint shard ({type(exc).__name__}: {exc})"
            ) from None
    state = merge_shards(shards, shard_paths)

    dim = require(params, "dim", params_path)
    vocab_size = params.get("vocab_size", -1)
    if vocab_size is None or vocab_size <= 0:  # older releases leave it to the tokenizer; the weights know it
        vocab_size = state["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in state else 0
    tie = "output.weight" not in state
    w1 = state.get("layers.0.feed_forward.w1.weight")  # the weights are the truth; params.json the fallback
    hidden = (
        w1.shape[0]
        if w1 is not None
        else ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    )
    try:
        args = ModelArgs(
            dim=dim,
            n_layers=require(params, "n_layers", params_path),
            n_heads=require(params, "n_heads", params_path),
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab_size,
            ffn_hidden_dim=hidden,
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0),
            max_seq_len=params.get("max_seq_len", 2048),
            n_future_tokens=params.get("n_future_tokens", 1),
            tie_embeddings=tie,
            rope_scaling={
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
            if params.get("use_scaled_rope")
            else None,
        )
    except ValueError as exc:
        raise CheckpointError(f"{params_path}: {exc}") from None
    tokenizer = path / "tokenizer.model"
    if not tokenizer.is_file() and (path.parent / "tokenizer.model").is_file():
        tokenizer = path.parent / "tokenizer.model"  # Meta's download layout keeps it one level up
    return RawCheckpoint(args, state, tokenizer if tokenizer.is_file() else None, path, "meta")
