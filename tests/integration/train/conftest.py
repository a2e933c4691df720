"""A workspace for real training runs of the micro model: configs, the tokenizer and MBPP prepared once.

Runs are kept tiny (32-token sequences, a handful of steps) so that a whole run, subprocess start
included, takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]

# The run every real-process test reproduces: micro-batches of one sequence, two of them per step
# (the global batch of two ranks x 1), 4 steps an epoch, 6 steps, a checkpoint every 2.
REFERENCE = (
    "training.max_steps=6",
    "training.save_every=2",
    "training.keep_last=3",
    "data.n_samples=8",
    "training.batch_size=1",
    "training.grad_accum_steps=2",
    "distributed.timeout_s=60",
)


@dataclass
class MicroWorkspace:
    root: Path
    raw_data: Path

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def overrides(self, name: str, *extra: str) -> list[str]:
        return [
            f"paths.raw_data={self.raw_data}",
            f"paths.models={self.root / 'models'}",
            f"paths.datasets={self.root / 'datasets'}",
            f"paths.runs={self.runs}",
            f"experiment.name={name}",
            "device=cpu",
            "tracking.enabled=false",
            "model.n_future_tokens=2",
            "data.max_length=32",
            "data.val_split=null",
            "training.eval_every=null",
            "logging.every_n_steps=1",
            *extra,
        ]

    def cli_args(self, name: str, *extra: str) -> list[str]:
        config = self.root / "configs"
        return [
            "--config", str(config / "defaults.yaml"), "--recipe", "baseline", "--preset", "local-light",
            "--use-micro-model", *self.overrides(name, *extra),
        ]  # fmt: skip

    def config(self, name: str, *extra: str):
        from weighted_mtp.config import load_config

        return load_config(
            defaults=self.root / "configs" / "defaults.yaml",
            recipe="baseline",
            preset="local-light",
            overrides=self.overrides(name, *extra),
            use_micro_model=True,
        ).config

    def env(self) -> dict[str, str]:
        """Subprocess environment: one intra-op thread, so ranks and runs compute alike."""
        return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def popen(
        self, name: str, *extra: str, log_name: str = "run", launcher: tuple[str, ...] = ()
    ) -> subprocess.Popen:
        """Start `wmtp train` (under `launcher`, e.g. torchrun) with its output in <name>.<log_name>.log."""
        command = [
            *(launcher or (sys.executable,)),
            "-m",
            "weighted_mtp",
            "train",
            *self.cli_args(name, *extra),
        ]
        with open(self.runs.parent / f"{name}.{log_name}.log", "ab") as log:  # the child keeps its own copy
            return subprocess.Popen(
                command, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=self.env()
            )

    def run(self, name: str, *extra: str, timeout: float = 300) -> None:
        proc = self.popen(name, *extra)
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, self.log_tail(name)

    def log_tail(self, name: str, log_name: str = "run") -> str:
        path = self.runs.parent / f"{name}.{log_name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def losses(self, name: str) -> dict[int, float]:
        """Each step's training loss; a resumed run appends, so the last record of a step wins."""
        out = {}
        with open(self.runs / name / "metrics.jsonl", encoding="utf-8") as handle:
            for line in handle:
                record = json.loads(line)
                if "loss" in record:
                    out[record["step"]] = record["loss"]
        return out


@pytest.fixture(scope="session")
def micro_workspace(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> MicroWorkspace:
    from weighted_mtp.data.loader import open_or_prepare
    from weighted_mtp.models.loading import load_tokenizer

    root = tmp_path_factory.mktemp("train")
    shutil.copytree(REPO_ROOT / "configs", root / "configs")
    (root / "runs").mkdir()
    tokenizer = load_tokenizer("micro", models_dir=root / "models")
    open_or_prepare("mbpp", "train", tokenizer, raw_dir=shared_data, datasets_dir=root / "datasets")
    open_or_prepare("mbpp", "validation", tokenizer, raw_dir=shared_data, datasets_dir=root / "datasets")
    return MicroWorkspace(root, shared_data)


@pytest.fixture(scope="session")
def reference_losses(micro_workspace: MicroWorkspace) -> dict[int, float]:
    """Per-step losses of one uninterrupted single-process run of REFERENCE."""
    micro_workspace.run("reference", *REFERENCE)
    losses = micro_workspace.losses("reference")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return losses


def assert_same_losses(losses: dict[int, float], reference: dict[int, float], tolerance: float) -> None:
    assert sorted(losses) == sorted(reference)
    for step, loss in reference.items():
        assert abs(losses[step] - loss) <= tolerance, f"step {step}: {losses[step]} vs {loss}"
