"""Training checkpoints that survive a crash at any moment.

A checkpoint is a directory `step_XXXXXXXX/` under the run's `checkpoints/`:

    model.safetensors   trainable parameters, full (format "full"; rank 0 writes it), or
    sharded/            model and optimizer as torch.distributed.checkpoint shards (format "sharded")
    optimizer.pt        full optimizer state (format "full")
    trainer.pt          step, epoch, scheduler, counters, early-stopping state
    rank_<r>.pt         per-rank RNG states (python, numpy, torch, cuda) and data loader position
    config.yaml         the resolved config
    checkpoint.json     step, world size, format; written last: without it there is no checkpoint

It is built as `.step_XXXXXXXX.tmp/` and renamed into place, so a crash mid-save leaves the previous
checkpoint as the latest. Only trainable parameters are stored (a LoRA run stores its adapters and
whatever is fully trained): frozen weights come from the base model the config names.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from weighted_mtp.config import save_resolved_config
from weighted_mtp.config.schema import Config
from weighted_mtp.errors import CheckpointError
from weighted_mtp.io import atomic_write_json
from weighted_mtp.train.distributed import DistEnv, barrier

log = logging.getLogger(__name__)

COMPLETE = "checkpoint.json"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporary and unmarked directories are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1][1] if checkpoints else None


# ----------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- state dicts


def _options(full: bool, **kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=full, **kwargs)


def trainable_state_dict(modules: nn.Module, *, full: bool = True) -> dict[str, torch.Tensor]:
    """Trainable parameters (and buffers) by name; under FSDP gathered to full tensors on every rank."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(modules, options=_options(full, ignore_frozen_params=True))


def distinct_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[key] = tensor
    return out


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(
    directory: Path,
    step: int,
    *,
    modules: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    loader_state: dict[str, Any] | None,
    config: Config,
    env: DistEnv,
    fmt: str = "full",
) -> Path:
    """Write a checkpoint (every rank calls this) and return its final path.

    `modules` holds everything trained (the model and the objective's extra modules) so that one
    name space covers every parameter the optimizer updates.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    directory = Path(directory)
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(env)

    if fmt == "sharded":
        import torch.distributed.checkpoint as dcp

        state = {
            "model": trainable_state_dict(modules, full=False),
            "optim": get_optimizer_state_dict(modules, optimizer, options=_options(False)),
        }
        dcp.save(state, checkpoint_id=tmp / "sharded")
    else:
        from safetensors.torch import save_file

        model_state = trainable_state_dict(modules, full=True)
        optim_state = get_optimizer_state_dict(modules, optimizer, options=_options(True))
        if env.is_main:
            save_file(distinct_tensors(model_state), tmp / "model.safetensors")
            torch.save(optim_state, tmp / "optimizer.pt")
    torch.save({"rng": rng_state(), "loader": loader_state}, tmp / f"rank_{env.rank}.pt")
    if env.is_main:
        torch.save(trainer_state, tmp / "trainer.pt")
        save_resolved_config(config, tmp)
    barrier(env)

    if env.is_main:
        atomic_write_json(
            tmp / COMPLETE, {"step": step, "world_size": env.world_size, "format": fmt, "time": time.time()}
        )
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (the end of a run that just saved)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    barrier(env)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(directory: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of crashed saves."""
    directory = Path(directory)
    removed = []
    for _, path in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for leftover in directory.glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    return removed


def load_checkpoint(
    path: Path,
    *,
    modules: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    env: DistEnv,
    untrained_allowed: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights and optimizer in place; return (trainer state, this rank's state).
    `untrained_allowed`: parameters may lack optimizer state (they had not trained yet when saved:
    a trunk still frozen while the heads warmed up); AdamW then starts them afresh, as it would have."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    marker = path / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
    meta = json.loads(marker.read_text())
    if (path / "sharded").is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = {"model": trainable_state_dict(modules, full=False)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(modules, optimizer, options=_options(False))
        dcp.load(state, checkpoint_id=path / "sharded")
        set_model_state_dict(modules, state["model"], options=_options(False, strict=False))
        if optimizer is not None:
            set_optimizer_state_dict(modules, optimizer, state["optim"], options=_options(False, strict=not untrained_allowed))
    else:
        model_state = _read(path / "model.safetensors")
        _check_keys(path, model_state, trainable_state_dict(modules, full=False))
        set_model_state_dict(modules, model_state, options=_options(True, strict=False))
        if optimizer is not None:
            set_optimizer_state_dict(modules, optimizer, _read(path / "optimizer.pt"),
                                     options=_options(True, strict=not untrained_allowed))
    if meta["world_size"] == env.world_size:
        return _read(path / "trainer.pt"), _read(path / f"rank_{env.rank}.pt")
    # saved by another number of ranks: the weights and optimizer were resharded above; every rank
    # continues from the global data position (rank 0's loader state holds it) with rank 0's RNG
    log.info("%s: saved by %d rank(s), resumed on %d: resharded", path, meta["world_size"], env.world_size)
    return _read(path / "trainer.pt"), _read(path / "rank_0.pt")


def _read(file: Path) -> Any:
    """One file of a checkpoint; a damaged one (truncated, overwritten) is a one-line error."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # safetensors, pickle and zip each raise their own types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{file}: unreadable ({first}); the checkpoint is damaged: delete {file.parent} to resume from the one before"
        ) from None


def _check_keys(path: Path, saved: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    """A checkpoint of a differently configured run (other LoRA targets, other freezing) is refused."""
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(
            f"{path}: its trainable parameters do not match this run's ({detail}); "
            "was it saved with other training.freeze / training.lora settings?"
        )
