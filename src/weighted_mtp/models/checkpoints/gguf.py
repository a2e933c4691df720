"""GGUF files (llama architecture), dequantised to float32 with the `gguf` library.

The container is parsed here (a few lines of `struct`: the library's reader builds Python objects for
every vocabulary string and takes seconds); blocks are dequantised by `gguf.quants.dequantize`.

llama.cpp's converter permutes HF's wq/wk back to Meta's interleaved rotary layout before writing,
so GGUF tensors already have our layout: no permutation here (transformers' own GGUF loader has to
permute them to HF's). The tokenizer comes from the same file's metadata. Each tensor is dequantised
when the model is built, one at a time, and cast to the model's dtype straight away.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from weighted_mtp.errors import CheckpointError
from weighted_mtp.models.checkpoints import RawCheckpoint, TensorSource
from weighted_mtp.models.transformer import ModelArgs

BLOCK_NAMES = {
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
TOP_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
IGNORED = ("rope_freqs.weight",)


# GGUF value types -> struct format of one scalar
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    qtype: int
    shape: tuple[int, ...]  # numpy order (rows first), the reverse of GGUF's dims
    data: np.ndarray  # raw bytes, [..., bytes per row]


@dataclass
class GGUFFile:
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buffer: memoryview, source: Path) -> None:
        self.buffer, self.offset, self.source = buffer, 0, source

    def scalar(self, fmt: str) -> Any:
        try:
            (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        except struct.error:
            raise CheckpointError(f"{self.source}: truncated GGUF file") from None
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        raw = bytes(self.buffer[self.offset : self.offset + length])
        if len(raw) != length:
            raise CheckpointError(f"{self.source}: truncated GGUF file")
        self.offset += length
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _NUMPY:
                dtype = np.dtype(_NUMPY[item_kind])
                values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.offset)
                self.offset += dtype.itemsize * count
                return values.tolist()
            return [self.value(item_kind) for _ in range(count)]
        raise CheckpointError(f"{self.source}: unknown GGUF value type {kind}")


def read_gguf(path: Path, *, tensors: bool = True) -> GGUFFile:
    """Metadata, and (memory-mapped, still quantised) tensors when asked."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as handle:
            mapped = np.memmap(handle, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    cursor = _Cursor(memoryview(mapped), path)
    if bytes(mapped[:4]) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
    cursor.offset = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2, 3 are)")
    n_tensors, n_fields = cursor.scalar("<Q"), cursor.scalar("<Q")
    metadata = {}
    for _ in range(n_fields):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    if not tensors:
        return GGUFFile(metadata, [])
    infos = []
    for _ in range(n_tensors):
        name = cursor.string()
        dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
        infos.append((name, cursor.scalar("<I"), dims, cursor.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-cursor.offset // alignment) * alignment
    found = []
    for name, qtype, dims, offset in infos:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (KeyError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has unknown quantisation type {qtype}") from None
        shape = tuple(reversed(dims))
        row_bytes = dims[0] // block * block_bytes
        n_bytes = row_bytes * int(np.prod(dims[1:], dtype=np.int64))
        begin = data_start + offset
        if begin + n_bytes > len(mapped):
            raise CheckpointError(f"{path}: truncated GGUF file (tensor {name})")
        raw = mapped[begin : begin + n_bytes].reshape(*shape[:-1], row_bytes)
        found.append(GGUFTensor(name, qtype, shape, raw))
    return GGUFFile(metadata, found)


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def our_name(gguf_name: str, source: Path) -> str:
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_NAMES:
        return f"layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}"
    raise CheckpointError(f"{source}: unexpected tensor {gguf_name!r} for a llama GGUF")


def read_dequantised(tensor: GGUFTensor, source: Path, dtype: torch.dtype) -> Tensor:
    """One tensor dequantised to float32 (in memory of its own, not the file's), then cast."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, GGMLQuantizationType(tensor.qtype))
    except NotImplementedError as exc:
        raise CheckpointError(f"{source}: tensor {tensor.name}: {exc}") from None
    values = np.asarray(values, dtype=np.float32).reshape(tensor.shape)
    if np.may_share_memory(values, tensor.data):  # F32 tensors dequantise to a view of the file
        values = values.copy()
    return torch.from_numpy(values).to(dtype)


def load(path: Path) -> RawCheckpoint:
    gguf_file = read_gguf(path)
    meta = gguf_file.metadata
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported (llama is)")

    def require(key: str):
        if f"llama.{key}" not in meta:
            raise CheckpointError(f"{path}: GGUF metadata has no llama.{key}")
        return meta[f"llama.{key}"]

    state = {
        our_name(tensor.name, path): TensorSource(tensor.shape, partial(read_dequantised, tensor, path))
        for tensor in gguf_file.tensors
        if tensor.name not in IGNORED
    }

    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = meta.get("llama.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab_size is None:
        raise CheckpointError(f"{path}: GGUF metadata gives no vocabulary size")
    if meta.get("llama.rope.scaling.type") not in (None, "none"):
        raise CheckpointError(
            f"{path}: GGUF rope scaling {meta['llama.rope.scaling.type']!r} is not supported"
        )
    try:
        args = ModelArgs(
            dim=require("embedding_length"),
            n_layers=require("block_count"),
            n_heads=require("attention.head_count"),
            n_kv_heads=meta.get("llama.attention.head_count_kv"),
            vocab_size=int(vocab_size),
            ffn_hidden_dim=require("feed_forward_length"),
            norm_eps=float(require("attention.layer_norm_rms_epsilon")),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
            max_seq_len=int(meta.get("llama.context_length", 2048)),
            tie_embeddings="output.weight" not in state,
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return RawCheckpoint(args, state, path if tokens is not None else None, path, "gguf")
