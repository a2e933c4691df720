"""`wmtp generate` in a real process: a prompt in, the completion on stdout, the speed on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def wmtp(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weighted_mtp", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_generate_uses_the_chat_template_and_decodes_the_same_greedy_tokens_speculatively(in_tmp_repo: Path):
    common = ("--model", "micro", "--max-new-tokens", "6", f"paths.models={in_tmp_repo / 'models'}", "device=cpu")
    plain = wmtp(in_tmp_repo, "generate", "--prompt", "Write add(a, b).", *common)
    assert plain.returncode == 0, plain.stderr
    assert "tokens in" in plain.stderr and "tok/s" in plain.stderr
    raw = wmtp(in_tmp_repo, "generate", "--prompt", "def add(a, b):", "--raw", *common)
    speculative = wmtp(in_tmp_repo, "generate", "--prompt", "def add(a, b):", "--raw", "--speculative", *common)
    assert raw.returncode == speculative.returncode == 0, speculative.stderr
    assert raw.stdout == speculative.stdout  # speculative decoding gives plain greedy's tokens
    assert "one head" in speculative.stderr and "tokens per forward" in speculative.stderr


def test_generate_samples_speculatively_with_a_temperature(in_tmp_repo: Path):
    common = ("--model", "micro", "--max-new-tokens", "6", f"paths.models={in_tmp_repo / 'models'}", "device=cpu",
              "--prompt", "def add(a, b):", "--raw", "--speculative", "--temperature", "0.8")
    first, again = wmtp(in_tmp_repo, "generate", *common), wmtp(in_tmp_repo, "generate", *common)
    assert first.returncode == 0, first.stderr
    assert first.stdout == again.stdout  # seeded by the config's seed
    assert "tokens per forward" in first.stderr
