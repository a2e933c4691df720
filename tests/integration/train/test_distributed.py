"""Real `torchrun --nproc_per_node=2` runs on CPU (gloo): FSDP2 and replicated data parallel.

Two ranks with one sequence each must train like one process accumulating the same two sequences;
a rank killed mid-run must end the whole job promptly with a failure status, and the run then
resumes from its sharded checkpoint with the same losses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REFERENCE, assert_same_losses

from weighted_mtp.train.checkpoint import COMPLETE, checkpoint_name

# each rank: micro-batches of one, no accumulation: the same global batch as the reference
RANKS_OF_ONE = (*REFERENCE, "training.grad_accum_steps=1")


TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def torchrun(ws, name: str, *extra: str, log_name: str = "run") -> subprocess.Popen:
    return ws.popen(name, *extra, log_name=log_name, launcher=TORCHRUN)


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def worker_of_rank(agent_pid: int, rank: int) -> int:
    for pid in children(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no worker with RANK={rank} under torchrun (pid {agent_pid})")


def test_ddp_matches_single_process(micro_workspace, reference_losses) -> None:
    ws = micro_workspace
    proc = torchrun(ws, "ddp", *RANKS_OF_ONE, "distributed.strategy=ddp")
    assert proc.wait(timeout=300) == 0, ws.log_tail("ddp")
    assert_same_losses(ws.losses("ddp"), reference_losses, 1e-4)


def test_fsdp_dead_rank_fails_fast_then_resumes_from_sharded_checkpoint(
    micro_workspace, reference_losses
) -> None:
    ws = micro_workspace
    fsdp = (*RANKS_OF_ONE, "distributed.strategy=fsdp", "distributed.checkpoint_format=sharded",
            "model.activation_checkpointing=true")  # checkpointing composes with fully_shard: same losses
    proc = torchrun(ws, "fsdp", *fsdp, log_name="killed")
    done_2 = ws.runs / "fsdp" / "checkpoints" / checkpoint_name(2) / COMPLETE
    deadline = time.monotonic() + 240
    while not done_2.exists():
        assert proc.poll() is None, ws.log_tail("fsdp", "killed")
        assert time.monotonic() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.01)
    os.kill(worker_of_rank(proc.pid, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        status = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after rank 1 died")
    assert status != 0
    assert time.monotonic() - killed_at < 90
    assert (ws.runs / "fsdp" / "checkpoints" / checkpoint_name(2) / "sharded").is_dir()

    proc = torchrun(ws, "fsdp", *fsdp, log_name="resumed")
    assert proc.wait(timeout=300) == 0, ws.log_tail("fsdp", "resumed")
    assert "resuming from" in ws.log_tail("fsdp", "resumed")
    assert_same_losses(ws.losses("fsdp"), reference_losses, 1e-4)
