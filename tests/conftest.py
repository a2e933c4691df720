"""Shared fixtures: offline data and model locations, and a fresh working directory per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
    """Run in a temporary directory holding a copy of configs/, so runs write under tmp_path/storage."""
    import shutil

    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path
