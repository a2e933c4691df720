"""`kill -9` at any moment, then resume: the losses are those of a run that was never interrupted."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import REFERENCE, assert_same_losses

from weighted_mtp.train.checkpoint import COMPLETE, checkpoint_name, latest_checkpoint


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


def test_resume_after_kill_gives_the_uninterrupted_losses(micro_workspace, reference_losses) -> None:
    ws = micro_workspace
    checkpoints = ws.runs / "interrupted" / "checkpoints"

    # 1. killed while step 4's checkpoint is being written (its temporary directory exists)
    proc = ws.popen("interrupted", *REFERENCE, log_name="first")
    tmp_4 = checkpoints / f".{checkpoint_name(4)}.tmp"
    wait_for(tmp_4.exists, proc)
    kill_9(proc)
    assert tmp_4.exists() and not (checkpoints / checkpoint_name(4)).exists()
    assert latest_checkpoint(checkpoints) == checkpoints / checkpoint_name(2)

    # 2. resumed from step 2 (in the second epoch's data), killed right after step 4's checkpoint
    proc = ws.popen("interrupted", *REFERENCE, log_name="second")
    wait_for((checkpoints / checkpoint_name(4) / COMPLETE).exists, proc)
    kill_9(proc)
    assert "resuming from" in ws.log_tail("interrupted", "second")

    # 3. resumed to the end
    ws.run("interrupted", *REFERENCE)
    assert "resuming from" in ws.log_tail("interrupted")

    assert_same_losses(ws.losses("interrupted"), reference_losses, 1e-6)
    rows = [json.loads(line) for line in (ws.runs / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [row["step"] for row in rows if "loss" in row]
    assert loss_steps == list(range(1, len(loss_steps) + 1))  # replayed steps are not written twice
    assert (ws.runs / "interrupted" / "final" / "model.safetensors").is_file()
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == [checkpoint_name(s) for s in (2, 4, 6)]  # keep_last=3, no temporary leftovers
