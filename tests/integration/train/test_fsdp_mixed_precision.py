"""FSDP2 with bf16 parameters computes what one process computes with the model cast to bf16: under
`torchrun --nproc_per_node=2` (gloo) the trunk's and every head's output are bitwise those of the
unsharded bf16 copy, and every block receives its rotary (cos, sin) tables in fp32, not rounded to
bf16 by the mixed-precision cast of a block's inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).resolve().parents[2] / "fixtures" / "mixed_precision_worker.py"


def test_sharded_bf16_blocks_compute_what_one_bf16_process_computes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
         str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "outputs.pt")
    assert result["rotations"] == ["torch.float32"]
    assert len(result["sharded"]) == 3  # the trunk and two heads
    for sharded, whole in zip(result["sharded"], result["whole"], strict=True):
        assert sharded.dtype == whole.dtype == torch.bfloat16
        assert torch.equal(sharded, whole)
