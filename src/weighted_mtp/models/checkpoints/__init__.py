"""Checkpoint formats. Each format module turns files into (ModelArgs, tensors in Meta's key names).

Formats are tried in `FORMATS` order; the first whose `detect(path)` is true loads the path. To add a
format, write a module with `detect(path) -> bool` and `load(path) -> RawCheckpoint` and list it there.

Readers do not read the weights: they describe each tensor (`TensorSource`: its shape and how to read
it), and `build_model` reads them one at a time into a model built on the meta device, casting to the
requested dtype on the way. Peak host memory is one copy of the weights in that dtype plus the tensor
being read (see docs/models.md, "What loading costs in memory").
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weighted_mtp.errors import CheckpointError
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer


@dataclass(frozen=True)
class TensorSource:
    """One checkpoint tensor, described but not read yet.

    `read(dtype)` returns it in `dtype`, in memory of its own: never a view of a file mapping, so the
    model does not depend on the file afterwards and the reader may drop the file's pages as it goes.
    """

    shape: tuple[int, ...]
    read: Callable[[torch.dtype], Tensor]

    @classmethod
    def in_memory(cls, tensor: Tensor) -> TensorSource:
        """A tensor already in memory (e.g. a freshly initialised model's): no copy when dtypes agree."""
        return cls(tuple(tensor.shape), lambda dtype: tensor.detach().to(dtype))

    def then(self, transform: Callable[[Tensor], Tensor]) -> TensorSource:
        """The same tensor with a shape-preserving `transform` applied after reading (and casting)."""
        return TensorSource(self.shape, lambda dtype: transform(self.read(dtype)))


def _libc_madvise() -> Callable[..., int] | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (AttributeError, OSError):  # no C library to ask (e.g. Windows): pages stay until unmapped
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


_MADVISE = _libc_madvise() if hasattr(mmap, "MADV_DONTNEED") else None


def release_file_pages(tensor: Tensor) -> None:
    """Tell the kernel this process is done with the pages of a memory-mapped, never-written tensor.

    `torch.load(mmap=True)` maps a whole .pth file privately; every page read stays in this process's
    resident set until the whole mapping goes, so reading a 28 GB checkpoint tensor by tensor would hold
    28 GB of file pages next to the model. MADV_DONTNEED drops them (a later read would fault them in
    again from the file), so only the tensor in flight is resident. Only whole pages inside the tensor
    are released; neighbours sharing a boundary page keep it.
    """
    if _MADVISE is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _MADVISE(first, last - first, mmap.MADV_DONTNEED)


def safetensors_sources(path: Path) -> dict[str, TensorSource]:
    """The tensors of a .safetensors file, in file order, each read with pread(2) when asked for.

    safetensors' default backend memory-maps the file, and every page read stays resident until the
    handle closes (a second copy of the weights next to the model); pread keeps only the tensor read.
    """
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", backend="pread")
        names = handle.offset_keys()
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None

    def reader(name: str) -> Callable[[torch.dtype], Tensor]:
        def read(dtype: torch.dtype) -> Tensor:
            try:
                return handle.get_tensor(name).to(dtype)
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: cannot read tensor {name} ({exc})") from None

        return read

    return {name: TensorSource(shapes[name], reader(name)) for name in names}


@dataclass
class RawCheckpoint:
    """What a format reader produces: the architecture, the weights under our key names (not read yet),
    a tokenizer file."""

    args: ModelArgs
    state_dict: dict[str, TensorSource]
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
    """Build on the meta device (nothing allocated), then read each tensor straight into its parameter.

    Every tensor is read, cast to `dtype` and moved to `device` before the next one is read, so the
    weights exist once, in `dtype`; `assign=True` makes the read tensors the parameters themselves.
    """
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
    for name, source in state.items():
        want = tuple(expected[name].shape)
        if tuple(source.shape) != want:
            raise CheckpointError(
                f"{raw.source}: tensor {name} has shape {tuple(source.shape)}, expected {want}"
            )
    weights = {}
    for name, source in state.items():  # the readers' order: the order of the bytes in the files
        weights[name] = source.read(dtype).to(device)
    model.load_state_dict(weights, strict=False, assign=True)
    if raw.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"build_model left {', '.join(left_on_meta)} unmaterialised")
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
