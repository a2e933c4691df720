"""Checkpoints: round trip of every piece of state, keep-last-K, and a crash in the middle of a save."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from weighted_mtp.config.schema import Config
from weighted_mtp.errors import CheckpointError
from weighted_mtp.losses import mtp_forward_backward
from weighted_mtp.models.transformer import build_micro_model
from weighted_mtp.train.checkpoint import (
    COMPLETE,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from weighted_mtp.train.distributed import DistEnv
from weighted_mtp.train.optim import build_optimizer

ENV = DistEnv()


def make(seed: int = 0):
    model = build_micro_model(101, n_future_tokens=2, seed=seed)
    modules = torch.nn.ModuleDict({"model": model})
    optimizer = build_optimizer(modules.named_parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    return modules, optimizer


def train_step(modules, optimizer, seed: int) -> float:
    tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(seed))
    # dropout-free model: the RNG draw stands in for anything random in a real step
    noise = torch.rand(()).item()
    out = mtp_forward_backward(modules["model"], tokens, tokens.clone(), chunk_size=8)
    optimizer.step()
    optimizer.zero_grad()
    return out.loss.item() + noise


def save(directory: Path, step: int, modules, optimizer, **kwargs) -> Path:
    return save_checkpoint(
        directory,
        step,
        modules=modules,
        optimizer=optimizer,
        trainer_state={"step": step, **kwargs},
        loader_state={"batches_done": step},
        config=Config(),
        env=ENV,
    )


def test_round_trip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    modules, optimizer = make()
    for s in range(2):
        train_step(modules, optimizer, s)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    path = save(tmp_path, 2, modules, optimizer, note="x")
    expected = [train_step(modules, optimizer, s) for s in (2, 3)]
    expected_draws = (random.random(), np.random.rand())

    fresh, fresh_opt = make(seed=1)  # different weights, empty optimizer state
    trainer_state, rank_state = load_checkpoint(path, modules=fresh, optimizer=fresh_opt, env=ENV)
    from weighted_mtp.train.checkpoint import set_rng_state

    set_rng_state(rank_state["rng"])
    assert trainer_state == {"step": 2, "note": "x"}
    assert rank_state["loader"] == {"batches_done": 2}
    assert [train_step(fresh, fresh_opt, s) for s in (2, 3)] == expected
    assert (random.random(), np.random.rand()) == expected_draws
    meta = json.loads((path / COMPLETE).read_text())
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["format"] == "full"
    assert (path / "config.yaml").is_file()


def test_keep_last_k_and_latest(tmp_path: Path) -> None:
    modules, optimizer = make()
    (tmp_path / ".step_00000099.tmp").mkdir(parents=True)  # leftover of a crashed save
    (tmp_path / checkpoint_name(100)).mkdir()  # no marker: incomplete, never "latest"
    for step in range(1, 6):
        save(tmp_path, step, modules, optimizer)
        prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(5)
    assert not (tmp_path / ".step_00000099.tmp").exists()


def test_checkpoint_of_another_configuration_is_refused(tmp_path: Path) -> None:
    modules, optimizer = make()
    path = save(tmp_path, 1, modules, optimizer)
    other, _other_opt = make()
    for param in other["model"].extra_heads.parameters():
        param.requires_grad_(False)
    with pytest.raises(CheckpointError, match="trainable parameters do not match"):
        load_checkpoint(path, modules=other, optimizer=None, env=ENV)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "nowhere", modules=modules, optimizer=None, env=ENV)


CRASH_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {test_dir!r})
    from test_checkpoint import make, save, train_step

    class KillWhilePickled:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)

    modules, optimizer = make()
    train_step(modules, optimizer, 0)
    save(Path({directory!r}), 2, modules, optimizer)
    train_step(modules, optimizer, 1)
    # the weights and optimizer are written, then the process dies while writing the trainer state
    save(Path({directory!r}), 4, modules, optimizer, bomb=KillWhilePickled())
    """
)


def test_kill_during_save_leaves_previous_latest_intact(tmp_path: Path) -> None:
    script = CRASH_MID_SAVE.format(test_dir=str(Path(__file__).parent), directory=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    partial = tmp_path / ".step_00000004.tmp"
    assert (partial / "model.safetensors").is_file()  # the save really was under way
    assert not (partial / COMPLETE).exists()
    assert not (tmp_path / checkpoint_name(4)).exists()
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(2)

    modules, optimizer = make(seed=3)
    trainer_state, _ = load_checkpoint(
        tmp_path / checkpoint_name(2), modules=modules, optimizer=optimizer, env=ENV
    )
    assert trainer_state["step"] == 2
    reference, ref_opt = make()
    train_step(reference, ref_opt, 0)
    for (name, a), b in zip(reference.state_dict().items(), modules.state_dict().values()):
        assert torch.equal(a, b), name
    prune_checkpoints(tmp_path, keep_last=2)
    assert not partial.exists()
