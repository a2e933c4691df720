"""`kill -9` at any moment, then resume: the losses are those of a run that was never interrupted."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from weighted_mtp.train.checkpoint import COMPLETE, checkpoint_name, latest_checkpoint

# 6 batches an epoch, 8 steps: the run crosses an epoch boundary, and kills land in both epochs
COMMON = ("training.max_steps=8", "training.save_every=2", "training.keep_last=3", "data.n_samples=12")


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0, interval: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before the moment to kill it")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the moment to kill the run")
        time.sleep(interval)


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_resume_after_kill_gives_the_uninterrupted_losses(micro_workspace) -> None:
    ws = micro_workspace
    ws.run("uninterrupted", *COMMON)
    reference = ws.losses("uninterrupted")
    assert sorted(reference) == list(range(1, 9))

    checkpoints: Path = ws.runs / "interrupted" / "checkpoints"

    # 1. killed while step 4's checkpoint is being written (its temporary directory exists)
    proc = ws.popen("interrupted", *COMMON, log_name="first")
    tmp_4 = checkpoints / f".{checkpoint_name(4)}.tmp"
    wait_for(tmp_4.exists, proc)
    kill_9(proc)
    assert tmp_4.exists() and not (checkpoints / checkpoint_name(4)).exists()
    assert latest_checkpoint(checkpoints) == checkpoints / checkpoint_name(2)

    # 2. resumed, then killed right after step 6's checkpoint is complete
    proc = ws.popen("interrupted", *COMMON, log_name="second")
    done_6 = checkpoints / checkpoint_name(6) / COMPLETE
    wait_for(done_6.exists, proc)
    kill_9(proc)
    assert "resuming from" in ws.log_tail("interrupted", "second")

    # 3. resumed to the end
    ws.run("interrupted", *COMMON)
    assert "resuming from" in ws.log_tail("interrupted")

    resumed = ws.losses("interrupted")
    assert sorted(resumed) == sorted(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6, rel=0), f"step {step}"
    assert (ws.runs / "interrupted" / "final" / "model.safetensors").is_file()
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == [checkpoint_name(s) for s in (4, 6, 8)]  # keep_last=3, no temporary leftovers
