"""scripts/train.sbatch outside SLURM: shellcheck passes, and with `srun` and `scontrol` stood in by
two small scripts (SLURM cannot run here) it starts a real two-process torchrun training, and the
time-limit signal requeues the job."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "train.sbatch"


def test_the_slurm_script_passes_shellcheck():
    linter = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if linter is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[dev]' installs it)")
    done = subprocess.run([linter, str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def slurm_stand_ins(directory: Path) -> dict[str, str]:
    """`srun OPTIONS COMMAND...` runs COMMAND; `scontrol show hostnames` prints this host;
    `scontrol requeue ID` writes ID to requeued.txt. Returns the job's environment."""
    directory.mkdir()
    (directory / "srun").write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')
    (directory / "scontrol").write_text(
        '#!/bin/sh\nif [ "$1" = show ]; then echo localhost; fi\n'
        f'if [ "$1" = requeue ]; then echo "$2" >> {directory / "requeued.txt"}; fi\n'
    )
    for name in ("srun", "scontrol"):
        (directory / name).chmod(0o755)
    return {
        **os.environ, "PATH": f"{directory}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "2",
        "OMP_NUM_THREADS": "1",
    }


def test_the_script_launches_torchrun_training_and_requeues_near_the_time_limit(micro_workspace, tmp_path):
    ws = micro_workspace
    env = slurm_stand_ins(tmp_path / "slurm")
    args = ws.cli_args("slurm", "training.max_steps=2", "training.save_every=1", "data.n_samples=4",
                       "distributed.strategy=fsdp", "distributed.timeout_s=60")
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=ws.root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(ws.losses("slurm")) == [1, 2]
    assert "rank 1/2" in done.stderr  # two processes on the node

    long_run = ws.cli_args("slurm-long", "training.max_steps=500", "data.n_samples=2000", "distributed.strategy=fsdp")
    job = subprocess.Popen(["bash", str(SCRIPT), *long_run], cwd=ws.root, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (ws.runs / "slurm-long" / "metrics.jsonl").exists():
            assert job.poll() is None and time.monotonic() < deadline, "the long run did not start"
            time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)  # what SLURM sends five minutes before the time limit
        job.wait(timeout=60)
        assert (tmp_path / "slurm" / "requeued.txt").read_text().split() == ["4242"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # what SLURM does to a requeued job's processes
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
