"""Every pipeline's loss and metric trajectory, pinned: a refactor of the middle floor must leave them
unchanged to 1e-6.

The fixture `tests/fixtures/pipeline_trajectories.json` holds, for baseline, ref_tuning, critic,
verifiable and rho1 on the micro model with fixed seeds, every step's metrics (timings left out) and
the last validation's. Regenerate it deliberately, when a change is meant to alter behaviour, with
`WMTP_RECORD_TRAJECTORIES=1 pytest tests/integration/test_pipeline_trajectories.py`, and say why in
the commit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from fixtures.pipelines import pipeline_config, write_pair_rollouts

from weighted_mtp.train.run import train

FIXTURE = Path(__file__).parents[1] / "fixtures" / "pipeline_trajectories.json"
TIMINGS = ("tokens_per_s", "step_time_s", "memory/peak_gib")
RUNS = (
    ("baseline", ("training.max_steps=3", "data.n_samples=12", "data.val_split=validation", "training.eval_every=3")),
    ("ref_tuning", ("training.max_steps=2", "data.n_samples=8")),
    ("critic", ("data.dataset=rollouts", "data.sampler=pairs", "training.max_steps=3", "data.val_split=validation",
                "training.eval_every=3")),
    ("verifiable", ("data.dataset=rollouts", "data.sampler=all", "training.max_steps=3")),
    ("rho1", ("training.max_steps=3", "data.n_samples=12", "rho1.top_k_ratio=0.5")),
)


def trajectories(raw: Path, models_dir: Path) -> dict[str, dict]:
    """Run the pipelines in dependency order (critic before verifiable, ref_tuning before rho1)."""
    out = {}
    for recipe, overrides in RUNS:
        config = pipeline_config(recipe, raw, models_dir, *overrides)
        result = train(config)
        out[recipe] = {
            "steps": [{k: v for k, v in step.items() if k not in TIMINGS} for step in result.history],
            "validation": result.val_metrics,
        }
    return out


def test_every_pipeline_follows_its_recorded_trajectory(in_tmp_repo, shared_data):
    raw = write_pair_rollouts(in_tmp_repo / "raw", shared_data)
    measured = trajectories(raw, in_tmp_repo / "models")
    if os.environ.get("WMTP_RECORD_TRAJECTORIES") == "1":
        FIXTURE.write_text(json.dumps(measured, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {FIXTURE}")
    expected = json.loads(FIXTURE.read_text())
    assert measured.keys() == expected.keys()
    for recipe in expected:
        got, want = measured[recipe], expected[recipe]
        assert len(got["steps"]) == len(want["steps"]), recipe
        for step, (row, ref) in enumerate(zip(got["steps"], want["steps"]), start=1):
            assert row.keys() == ref.keys(), (recipe, step)
            for key, value in ref.items():
                assert math.isclose(row[key], value, rel_tol=1e-6, abs_tol=1e-6) or (
                    math.isnan(value) and math.isnan(row[key])), (recipe, step, key, row[key], value)
        assert got["validation"].keys() == want["validation"].keys(), recipe
        for key, value in want["validation"].items():
            assert math.isclose(got["validation"][key], value, rel_tol=1e-6, abs_tol=1e-6), (recipe, key)
