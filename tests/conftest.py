"""Shared fixtures: offline data and model locations, and a fresh working directory per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests use tiny models: one thread is faster than two fighting over a shared 2-core machine, and
# subprocesses (torchrun ranks, CLI runs) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("WMTP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline benchmark copies (MBPP, HumanEval) that CI provides beside the clone."""
    path = shared_data_dir()
    if not (path / "mbpp").is_dir():
        pytest.skip(f"offline benchmark data not found at {path} (set WMTP_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def in_tmp_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temporary checkout holding a copy of configs/, with the offline data at ../shared as in
    CI, so the default config works unchanged and runs write under <returned path>/storage."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "configs", repo / "configs")
    shared = shared_data_dir().parent
    if shared.is_dir():
        (tmp_path / "shared").symlink_to(shared, target_is_directory=True)
    monkeypatch.chdir(repo)
    return repo
