"""Real `torchrun --nproc_per_node=2` runs on CPU (gloo): FSDP2 and replicated data parallel.

Two ranks with one sequence each must train like one process accumulating the same two sequences;
a rank killed mid-run must end the whole job promptly with a failure status, and the run then
resumes from its sharded checkpoint with the same losses.
"""

from __future__ import annotations

import json
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
# restarted workers would otherwise read the previous attempt's addresses from the store torchrun
# shares with them (pytorch/pytorch#135712); docs/training.md gives the same setting
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


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


def test_fsdp_out_of_memory_on_one_rank_stops_the_job_and_the_restart_halves_the_micro_batch_on_every_rank(
    micro_workspace,
) -> None:
    """Rank 1 runs out of memory at step 3 (injected); torchrun restarts the job once; every rank
    resumes from the step-2 checkpoint with the batch cut in two micro-batches (accumulation under
    FSDP), and each step's loss is the uninterrupted run's (a step's loss does not depend on how its
    batch is split)."""
    ws = micro_workspace
    fsdp = ("training.max_steps=6", "training.save_every=2", "data.n_samples=16", "training.batch_size=2",
            "training.grad_accum_steps=1", "distributed.timeout_s=60", "distributed.strategy=fsdp",
            "distributed.checkpoint_format=sharded")
    proc = torchrun(ws, "fsdp-whole", *fsdp, log_name="run")
    assert proc.wait(timeout=300) == 0, ws.log_tail("fsdp-whole")
    script = Path(__file__).resolve().parents[2] / "fixtures" / "oom_on_one_rank.py"
    command = [*TORCHRUN, "--max-restarts=1", str(script), *ws.cli_args("fsdp-oom", *fsdp)]
    with open(ws.runs.parent / "fsdp-oom.run.log", "wb") as log:
        status = subprocess.run(command, cwd=ws.root, stdout=log, stderr=subprocess.STDOUT, env=ws.env() | RESTARTABLE,
                                timeout=300).returncode
    output = (ws.runs.parent / "fsdp-oom.run.log").read_text(errors="replace")
    assert status == 0, output[-4000:]
    assert "out of GPU memory under FSDP at step 3" in output and "resuming from" in output
    assert json.loads((ws.runs / "fsdp-oom" / "micro_splits.json").read_text()) == {"step": 3, "micro_splits": 2}
    assert_same_losses(ws.losses("fsdp-oom"), ws.losses("fsdp-whole"), 1e-5)


def keep_only_the_first_checkpoint(ws, name: str) -> None:
    """As if the run had stopped right after its step-2 checkpoint."""
    import shutil

    for step in (4, 6):
        shutil.rmtree(ws.runs / name / "checkpoints" / checkpoint_name(step))
    shutil.rmtree(ws.runs / name / "final")


@pytest.mark.parametrize("saved_by,resumed_by", [(2, 1), (1, 2)])
def test_a_sharded_checkpoint_resumes_on_another_number_of_ranks(micro_workspace, reference_losses, saved_by,
                                                                  resumed_by) -> None:
    """Weights and optimizer are resharded by torch.distributed.checkpoint, and the data continues from
    the global position; the global batch stays two sequences (one per rank, or two accumulated), so
    every step's loss is the uninterrupted run's."""
    ws = micro_workspace
    name = f"reshard-{saved_by}to{resumed_by}"
    runs = {1: (*REFERENCE, "distributed.checkpoint_format=sharded"),
            2: (*RANKS_OF_ONE, "distributed.strategy=fsdp", "distributed.checkpoint_format=sharded")}

    def run(ranks: int, log_name: str) -> None:
        proc = torchrun(ws, name, *runs[ranks], log_name=log_name) if ranks == 2 else ws.popen(name, *runs[1],
                                                                                                log_name=log_name)
        assert proc.wait(timeout=300) == 0, ws.log_tail(name, log_name)

    run(saved_by, "saved")
    keep_only_the_first_checkpoint(ws, name)
    run(resumed_by, "resumed")
    assert f"saved by {saved_by} rank(s), resumed on {resumed_by}: resharded" in ws.log_tail(name, "resumed")
    assert_same_losses(ws.losses(name), reference_losses, 1e-4)


def test_rho1_with_its_reference_sharded_trains_like_one_process(micro_workspace) -> None:
    """Under FSDP the Rho-1 reference is sharded like the model (frozen, forward only): two ranks of one
    sequence give one process's losses with the two sequences accumulated (the selection is the step's).
    Both are the micro model, whose unembedding is tied to its embedding: they start on the meta device
    and the tie holds through sharding and filling."""
    ws = micro_workspace
    rho1 = ("experiment.pipeline=rho1", "weighting.scheme=rho1", "rho1.reference_model=micro", "rho1.per_head=false",
            "training.max_steps=3", "training.save_every=null", "data.n_samples=8", "distributed.timeout_s=60")
    ws.run("rho1-one", *rho1, "training.batch_size=1", "training.grad_accum_steps=2")
    proc = torchrun(ws, "rho1-two", *rho1, "training.batch_size=1", "training.grad_accum_steps=1",
                    "distributed.strategy=fsdp")
    assert proc.wait(timeout=300) == 0, ws.log_tail("rho1-two")
    log = (ws.runs.parent / "rho1-two.run.log").read_text()
    assert "reference: sharded over 2 ranks" in log
    assert "head(s), on the meta device until sharded" in log  # the model's line
    assert "rho1 reference: micro (1 head(s)), on the meta device until sharded" in log
    assert_same_losses(ws.losses("rho1-two"), ws.losses("rho1-one"), 1e-4)
