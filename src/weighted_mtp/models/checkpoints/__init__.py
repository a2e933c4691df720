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
import dataclasses
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from weighted_mtp.errors import CheckpointError
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer, TransformerBlock


@dataclass(frozen=True)
class TensorSource:
    """One checkpoint tensor, described but not read yet.

    `read(dtype)` returns it in `dtype`, in memory of its own: never a view of a file mapping, so the
    model does not depend on the file afterwards and the reader may drop the file's pages as it goes.
    """

    shape: tuple[int, ...]
    read: Callable[[torch.dtype], Tensor]
    read_rows: Callable[[torch.dtype, int, int], Tensor] | None = None  # rows [start, stop) alone, if it can

    def rows(self, dtype: torch.dtype, start: int, stop: int) -> Tensor:
        """Rows [start, stop) of the tensor in `dtype` (a rank's shard): read alone where the reader
        can, else cut from the whole tensor."""
        if self.read_rows is not None:
            return self.read_rows(dtype, start, stop)
        return self.read(dtype)[start:stop].clone()

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

    def row_reader(name: str) -> Callable[[torch.dtype, int, int], Tensor]:
        def read_rows(dtype: torch.dtype, start: int, stop: int) -> Tensor:
            try:
                return handle.get_slice(name)[start:stop].to(dtype)
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{path}: cannot read tensor {name} ({exc})") from None

        return read_rows

    return {name: TensorSource(shapes[name], reader(name), row_reader(name)) for name in names}


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


def head_prefixes(args: ModelArgs) -> list[str]:
    """The parameter-name prefix of each head, head 1 (the trunk's last block) first."""
    trunk_blocks = args.n_layers - args.n_future_tokens + 1
    return [f"layers.{trunk_blocks - 1}.", *(f"extra_heads.{i}." for i in range(args.n_future_tokens - 1))]


def random_source(shape: tuple[int, ...], generator: torch.Generator, std: float) -> TensorSource:
    """N(0, std^2) values drawn from `generator` as it is now (it is advanced past them), drawn again
    from the same state whenever read."""
    state = generator.get_state()
    torch.randn(shape, generator=generator)  # what the next tensor draws comes after these

    def read(dtype: torch.dtype) -> Tensor:
        return (torch.randn(shape, generator=torch.Generator().set_state(state)) * std).to(dtype)

    return TensorSource(shape, read)


def with_heads(
    raw: RawCheckpoint, n_future_tokens: int, *, init: str = "copy", seed: int = 0
) -> RawCheckpoint:
    """The checkpoint grown or shrunk to `n_future_tokens` heads, still unread. A new head's tensors are
    the last head's ("copy"), or its matrices are drawn from N(0, 0.02^2) by a generator seeded with
    `seed`, head after head in parameter order, and its norms copied ("random"); fewer heads keep the
    first ones. Both the whole and the sharded start-up read heads from here, so they agree."""
    if n_future_tokens < 1:
        raise ValueError("n_future_tokens must be at least 1")
    if init not in ("copy", "random"):
        raise ValueError(f"unknown extra_heads_init {init!r} (copy, random)")
    args, current = raw.args, raw.args.n_future_tokens
    if n_future_tokens == current:
        return raw
    grown = dataclasses.replace(args, n_layers=args.n_layers + n_future_tokens - current, n_future_tokens=n_future_tokens)
    state = {name: source for name, source in raw.state_dict.items()
             if not name.startswith(tuple(f"extra_heads.{i}." for i in range(n_future_tokens - 1, current - 1)))}
    template = head_prefixes(args)[-1]
    with torch.device("meta"):
        names = [name for name, _ in TransformerBlock(args).named_parameters()]
    generator = torch.Generator().manual_seed(seed)
    for i in range(current - 1, n_future_tokens - 1):
        for name in names:
            copied = raw.state_dict[template + name]
            if init == "copy" or name.endswith("norm.weight"):
                state[f"extra_heads.{i}.{name}"] = copied
            else:
                state[f"extra_heads.{i}.{name}"] = random_source(copied.shape, generator, 0.02)
    return dataclasses.replace(raw, args=grown, state_dict=state)


def add_heads(model: MTPTransformer, n_future_tokens: int, *, init: str = "copy", seed: int = 0) -> MTPTransformer:
    """A model in memory with `n_future_tokens` heads (see `with_heads`), in its dtype and device."""
    reference = model.tok_embeddings.weight
    state = {name: TensorSource(tuple(t.shape), lambda dtype, t=t: t.detach().to(dtype).clone())
             for name, t in model.state_dict().items()}  # the new model shares nothing with the old
    raw = RawCheckpoint(dataclasses.replace(model.args), state, None, Path("<in memory>"), "memory")
    return build_model(with_heads(raw, n_future_tokens, init=init, seed=seed), device=reference.device,
                       dtype=reference.dtype)


def model_skeleton(raw: RawCheckpoint) -> tuple[MTPTransformer, dict[str, TensorSource]]:
    """The model on the meta device (nothing allocated) and, for each of its parameters, the tensor
    that fills it (a tied unembedding reads the embedding's); checked against each other first."""
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
    return model, state


def build_model(
    raw: RawCheckpoint, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> MTPTransformer:
    """Build on the meta device (nothing allocated), then read each tensor straight into its parameter.

    Every tensor is read, cast to `dtype` and moved to `device` before the next one is read, so the
    weights exist once, in `dtype`; `assign=True` makes the read tensors the parameters themselves.
    """
    model, state = model_skeleton(raw)
    weights: dict[str, Tensor] = {}
    storages = set()
    for name, source in state.items():  # the readers' order: the order of the bytes in the files
        tensor = source.read(dtype).to(device)
        if tensor.untyped_storage().data_ptr() in storages:  # a copied head read from memory: its own copy
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        weights[name] = tensor
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
