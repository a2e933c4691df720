"""`load_model` holds the weights once: its peak RSS, in a fresh process, against the checkpoint's size.

A 386 MB fp32 checkpoint (few wide matrices, as in a 7B model) is written once in Meta's .pth format
and in safetensors by benchmarks/checkpoint_loading_memory.py, whose worker loads it in a new process
per case and reports its resident high-water mark above its state just before loading (VmHWM: a
child's ru_maxrss starts at its parent's peak, so under pytest it would hide the load). The ways of
loading before this one peak at 1.5x (a memory-mapped state dict cast whole) to 2x (a randomly
initialised model plus the state dict) the file; the benchmark prints them side by side.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="VmHWM from /proc, MADV_DONTNEED as on Linux"
)

CASES = [("meta", "float32"), ("native", "float32"), ("meta", "bfloat16"), ("native", "bfloat16")]


@pytest.fixture(scope="module")
def bench(repo_root):
    path = repo_root / "benchmarks" / "checkpoint_loading_memory.py"
    spec = importlib.util.spec_from_file_location("checkpoint_loading_memory", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def measured(bench):
    """Every case's measurement; two worker processes at a time (each is alone in its own RSS)."""
    with tempfile.TemporaryDirectory(prefix="wmtp-load-memory-") as tmp:
        root = Path(tmp)
        bench.write_in_subprocess(root, bench.Shape())
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {
                case: pool.submit(bench.measure, "load_model", case[0], root, case[1]) for case in CASES
            }
            yield {case: future.result() for case, future in futures.items()}


@pytest.mark.parametrize("fmt", ["meta", "native"])
def test_float32_load_holds_one_copy_of_the_weights(measured, fmt):
    m = measured[(fmt, "float32")]
    assert m.file_bytes > 300e6
    assert m.peak_increase_bytes > 0.95 * m.file_bytes  # the weights really are in memory
    assert m.peak_increase_bytes < 1.3 * m.file_bytes, f"{m.peak_increase_bytes / m.file_bytes:.2f}x the file"


@pytest.mark.parametrize("fmt", ["meta", "native"])
def test_bfloat16_load_peaks_near_the_bfloat16_size_plus_one_tensor(measured, fmt):
    m = measured[(fmt, "bfloat16")]
    target = m.file_bytes / 2
    assert m.peak_increase_bytes > 0.95 * target
    bound = target + m.largest_tensor_bytes + 0.05 * m.file_bytes
    assert m.peak_increase_bytes < bound, (
        f"{m.peak_increase_bytes / 2**20:.0f} MB: bf16 weights {target / 2**20:.0f} MB "
        f"+ largest fp32 tensor {m.largest_tensor_bytes / 2**20:.0f} MB"
    )


def test_both_formats_load_the_same_weights(measured):
    for dtype in ("float32", "bfloat16"):
        assert measured[("meta", dtype)].checksum == measured[("native", dtype)].checksum
