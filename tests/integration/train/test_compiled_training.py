"""`model.compile=true` through `wmtp train`: compiled blocks train to the losses of the eager run, with
activation checkpointing in one process and under FSDP2 with two real ranks, and the exported model
has the same tensor names."""

from __future__ import annotations

from conftest import REFERENCE, assert_same_losses
from safetensors import safe_open
from test_distributed import RANKS_OF_ONE, torchrun


def tensor_names(path) -> list[str]:
    with safe_open(str(path), "pt") as handle:
        return sorted(handle.keys())


def test_compiled_blocks_train_to_the_eager_losses(micro_workspace, reference_losses) -> None:
    ws = micro_workspace
    ws.run("compiled", *REFERENCE, "model.compile=true", "model.activation_checkpointing=true")
    assert "torch.compile: 5 transformer blocks" in ws.log_tail("compiled")
    assert_same_losses(ws.losses("compiled"), reference_losses, 1e-4)
    final = "final/model.safetensors"
    assert tensor_names(ws.runs / "compiled" / final) == tensor_names(ws.runs / "reference" / final)


def test_compiled_blocks_compose_with_fsdp_under_torchrun(micro_workspace, reference_losses) -> None:
    """Compile, then `fully_shard` each block (torchtitan's order), two real ranks: the same losses."""
    ws = micro_workspace
    proc = torchrun(ws, "compiled_fsdp", *RANKS_OF_ONE, "distributed.strategy=fsdp", "model.compile=true")
    assert proc.wait(timeout=300) == 0, ws.log_tail("compiled_fsdp")
    assert_same_losses(ws.losses("compiled_fsdp"), reference_losses, 1e-4)
