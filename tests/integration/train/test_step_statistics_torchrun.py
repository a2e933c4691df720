"""Statistics over the whole step with two real ranks: `torchrun --nproc_per_node=2` (gloo), each rank
with two micro-batches, gives the critic's z-score and mean-1 and Rho-1's top-k threshold and softmax
denominator of the whole batch in one piece, and the same gradients; so does one process accumulating
the four micro-batches."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit"))
import test_global_normalisation as setups  # noqa: E402

WORKER = Path(__file__).resolve().parents[2] / "fixtures" / "step_statistics_worker.py"
NAMES = ("verifiable_step_statistics", "verifiable_step_statistics_delta", "rho1_step_top_k", "rho1_step_soft_head1")


def whole_batch(name: str) -> tuple[dict, dict, float]:
    model, modules, objective = setups.SETUPS[name]()
    loss = objective.forward_backward(model, setups.make_batch(11), loss_scale=1.0)["loss"]
    return setups.grads(modules), dataclasses.asdict(objective.step_statistics), loss


def four_micro_batches(name: str) -> tuple[dict, dict]:
    model, modules, objective = setups.SETUPS[name]()
    setups.step(objective, model, setups.pieces(setups.make_batch(11), (1, 2, 2, 1)), global_counts=True)
    return setups.grads(modules), dataclasses.asdict(objective.step_statistics)


def assert_same_statistics(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key  # from fp32 models


def test_two_ranks_and_four_micro_batches_give_the_whole_batchs_statistics_and_gradients(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
         str(tmp_path), *NAMES],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in NAMES:
        expected_grads, expected_statistics, expected_loss = whole_batch(name)
        ranks = torch.load(tmp_path / f"{name}.pt")
        assert_same_statistics(ranks["statistics"], expected_statistics)
        setups.assert_same_grads(ranks["grads"], expected_grads)
        assert ranks["loss"] == pytest.approx(expected_loss, rel=1e-5)
        accumulated_grads, accumulated_statistics = four_micro_batches(name)
        assert_same_statistics(accumulated_statistics, expected_statistics)
        setups.assert_same_grads(accumulated_grads, expected_grads)
