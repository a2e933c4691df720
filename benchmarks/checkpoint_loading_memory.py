"""Peak host memory of loading a checkpoint: `load_model` vs the two ways of loading before it.

Writes one model (default: 3 blocks, the extra head included, dim 1024, SwiGLU 8192, vocabulary 4096:
96M parameters, 386 MB in fp32; few wide matrices, as in a 7B model) as a Meta directory (`consolidated.00.pth` + `params.json`) and as a
native directory (`model.safetensors` + `config.json`), then loads each in a fresh Python process per
(method, format, dtype) and reads that process's peak resident set (VmHWM) above its state just
before loading (after a warm-up load of a tiny checkpoint the same way, so imports are not counted):

- naive:      `MTPTransformer(args)` initialised at random, cast to dtype, then `load_state_dict` from
              the whole state dict (`torch.load` / `safetensors.load_file`): the textbook way, 2 copies;
- previous:   what `build_model` did before: the model on the meta device, the whole state dict
              memory-mapped, every tensor cast (`.to(dtype)`) and assigned. fp32 parameters alias the
              file mapping; a cast keeps the mapped file resident beside the cast copy;
- load_model: today's loader: each tensor read, cast and assigned before the next is read.

Every loaded parameter is read once (as a forward pass would) before the peak is taken, and the
parameters' sum is compared across methods. Targets: load_model <= 1.3x the file in fp32, and about
the bf16 size plus one fp32 tensor when casting to bf16. Usage:
    python benchmarks/checkpoint_loading_memory.py [--dim 1024 --ffn 8192 --blocks 3 --vocab 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("meta", "native")
METHODS = ("naive", "previous", "load_model")
DTYPES = ("float32", "bfloat16")
TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class Shape:
    dim: int = 1024
    ffn: int = 8192
    blocks: int = 3  # trunk + head 1 + the extra head
    vocab: int = 4096


@dataclass(frozen=True)
class Measurement:
    method: str
    fmt: str
    dtype: str
    file_bytes: int
    largest_tensor_bytes: int  # in the file's dtype (fp32)
    peak_increase_bytes: int
    checksum: float


# ----------------------------------------------------------------------------- writing (own process)


def model_args(shape: Shape):
    from weighted_mtp.models.transformer import ModelArgs

    return ModelArgs(
        dim=shape.dim,
        n_layers=shape.blocks,
        n_heads=max(1, shape.dim // 128),
        n_kv_heads=None,
        vocab_size=shape.vocab,
        ffn_hidden_dim=shape.ffn,
        n_future_tokens=2,
    )


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level vocabulary: `load_model` needs a tokenizer no larger than the embedding."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, min(vocab_size, 100))}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / TOKENIZER))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))


def write_checkpoints(directory: Path, shape: Shape, seed: int = 0) -> None:
    """directory/{meta,native} for `shape`, directory/warmup/{meta,native} for a tiny model."""
    import torch

    from weighted_mtp.models.checkpoints import native
    from weighted_mtp.models.transformer import MTPTransformer

    for root, this_shape in ((directory, shape), (directory / "warmup", Shape(64, 128, 2, 128))):
        args = model_args(this_shape)
        model = MTPTransformer(args)
        model.init_weights(seed)
        (root / "meta").mkdir(parents=True)
        torch.save(model.state_dict(), root / "meta" / "consolidated.00.pth")
        params = {
            "dim": args.dim,
            "n_layers": args.n_layers,
            "n_heads": args.n_heads,
            "vocab_size": args.vocab_size,
            "n_future_tokens": args.n_future_tokens,
            "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
        }
        (root / "meta" / "params.json").write_text(json.dumps(params))
        (root / "native").mkdir()
        native.write_checkpoint(model, root / "native")
        write_tokenizer(root, args.vocab_size)
        del model


def write_in_subprocess(directory: Path, shape: Shape) -> None:
    """In a child process, so the writer's copy of the model never adds to the caller's memory."""
    command = [sys.executable, __file__, "--write", str(directory), *shape_flags(shape)]
    subprocess.run(command, check=True, capture_output=True, text=True)


# ----------------------------------------------------------------------------- loading (one process each)


def load(method: str, fmt: str, root: Path, dtype):
    import torch

    from weighted_mtp.models.checkpoints import read_checkpoint
    from weighted_mtp.models.loading import load_model
    from weighted_mtp.models.transformer import MTPTransformer

    path = root / fmt
    if method == "load_model":
        return load_model(path, dtype=dtype, tokenizer=root / TOKENIZER)[0]
    args = read_checkpoint(path).args  # reads params.json / config.json only
    if fmt == "meta":
        mmap = method == "previous"
        state = torch.load(path / "consolidated.00.pth", map_location="cpu", mmap=mmap, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(path / "model.safetensors")
    if method == "naive":
        model = MTPTransformer(args).to(dtype)
        model.load_state_dict(state)
        return model
    with torch.device("meta"):
        model = MTPTransformer(args)
    model.load_state_dict({name: t.to(dtype) for name, t in state.items()}, assign=True)
    return model


def peak_resident_bytes() -> int:
    """This process's resident high-water mark: VmHWM where there is /proc, not ru_maxrss, which after
    fork + exec starts at the parent's peak and would hide the load whenever the parent (a pytest run)
    is larger than the model."""
    status = Path("/proc/self/status")
    if status.exists():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS


def measure_here(method: str, fmt: str, root: Path, dtype_name: str) -> dict:
    import torch

    dtype = getattr(torch, dtype_name)
    load(method, fmt, root / "warmup", dtype)
    before = peak_resident_bytes()
    model = load(method, fmt, root, dtype)
    with torch.no_grad():  # touch every weight, as the first forward pass would
        sums = [param.sum() for param in model.parameters()]
    return {
        "peak_increase_bytes": peak_resident_bytes() - before,
        "largest_tensor_bytes": 4 * max(p.numel() for p in model.parameters()),
        "checksum": sum(float(s) for s in sums),
    }


def measure(method: str, fmt: str, root: Path, dtype: str) -> Measurement:
    """Load in a fresh process: the high-water mark only ever grows, so each measurement needs its own."""
    command = [sys.executable, __file__, "--measure", method, fmt, str(root), dtype]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    child = json.loads(result.stdout.strip().splitlines()[-1])
    file_bytes = sum(f.stat().st_size for f in (root / fmt).iterdir())
    return Measurement(method, fmt, dtype, file_bytes, **child)


# ----------------------------------------------------------------------------- driver


def shape_flags(shape: Shape) -> list[str]:
    return [
        "--dim",
        str(shape.dim),
        "--ffn",
        str(shape.ffn),
        "--blocks",
        str(shape.blocks),
        "--vocab",
        str(shape.vocab),
    ]


def print_table(results: list[Measurement]) -> None:
    mb = 2**20
    print(
        f"{'format':<8}{'dtype':<10}{'method':<12}{'file MiB':>9}{'peak +MiB':>10}{'x file':>8}{'x target':>10}"
    )
    for r in results:
        target = r.file_bytes * (0.5 if r.dtype == "bfloat16" else 1.0)
        print(
            f"{r.fmt:<8}{r.dtype:<10}{r.method:<12}{r.file_bytes / mb:>9.0f}{r.peak_increase_bytes / mb:>10.0f}"
            f"{r.peak_increase_bytes / r.file_bytes:>8.2f}{r.peak_increase_bytes / target:>10.2f}"
        )
    print("x target: peak over the weights' size in the loaded dtype (the least any loader can hold)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=Shape.dim)
    parser.add_argument("--ffn", type=int, default=Shape.ffn)
    parser.add_argument(
        "--blocks", type=int, default=Shape.blocks, help="all blocks, the extra head included"
    )
    parser.add_argument("--vocab", type=int, default=Shape.vocab)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # child: write the checkpoints
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)  # child: METHOD FORMAT ROOT DTYPE
    args = parser.parse_args()
    shape = Shape(args.dim, args.ffn, args.blocks, args.vocab)
    if args.write:
        write_checkpoints(args.write, shape)
        return 0
    if args.measure:
        method, fmt, root, dtype = args.measure
        print(json.dumps(measure_here(method, fmt, Path(root), dtype)))
        return 0
    with tempfile.TemporaryDirectory(prefix="wmtp-load-bench-") as tmp:
        write_in_subprocess(Path(tmp), shape)
        results = [
            measure(method, fmt, Path(tmp), dtype)
            for fmt in args.formats
            for dtype in args.dtypes
            for method in METHODS
        ]
    print_table(results)
    for fmt in args.formats:
        for dtype in args.dtypes:
            sums = {r.checksum for r in results if r.fmt == fmt and r.dtype == dtype}
            if len(sums) != 1:
                print(f"{fmt} {dtype}: the methods loaded different weights: {sorted(sums)}")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
