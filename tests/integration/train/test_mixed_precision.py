"""`dtype: bfloat16` on the CPU trains as on a GPU: float32 weights and optimizer state, forward and
backward under bf16 autocast (bf16 weights would lose AdamW's small updates below their 8-bit
mantissa). `wmtp train` says so, trains to the float32 run's losses within bf16 precision, and exports
float32 weights."""

from __future__ import annotations

from conftest import REFERENCE, assert_same_losses
from safetensors import safe_open


def test_bf16_on_the_cpu_trains_float32_weights_under_autocast(micro_workspace, reference_losses) -> None:
    ws = micro_workspace
    ws.run("bf16_autocast", *REFERENCE, "dtype=bfloat16")
    log = ws.log_tail("bf16_autocast")
    assert "mixed precision: float32 weights and optimizer state, bfloat16 products (autocast on cpu)" in log
    losses = ws.losses("bf16_autocast")
    assert losses != reference_losses  # the products did run in bf16
    assert_same_losses(losses, reference_losses, 5e-3)  # measured: at most 3.3e-4 on losses of about 10.7
    with safe_open(str(ws.runs / "bf16_autocast" / "final" / "model.safetensors"), "pt") as handle:
        assert {str(handle.get_slice(name).get_dtype()) for name in handle.keys()} == {"F32"}  # noqa: SIM118
