"""What a pipeline gives the trainer: how to compute a micro-batch's loss and gradients.

The trainer owns the loop (accumulation, clipping, optimizer, checkpoints, logging); an `Objective`
owns the loss. It runs its own backward because the memory-efficient MTP loss does
(`mtp_forward_backward`), and returns plain metrics, "loss" among them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from weighted_mtp.data import Batch
from weighted_mtp.losses import MTPLossOutput, mtp_evaluate, mtp_forward_backward


@runtime_checkable
class Objective(Protocol):
    def forward_backward(
        self, model: nn.Module, batch: Batch, *, loss_scale: float
    ) -> dict[str, float | Tensor]:
        """Forward, backward (gradients scaled by `loss_scale`), and this micro-batch's metrics."""
        ...

    def evaluate(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Validation metrics without gradients."""
        ...

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules besides the model that the optimizer updates and checkpoints save (a value head)."""
        ...

    # Optional: `evaluation_summary() -> dict[str, float]`, metrics of a whole validation pass that
    # are not means over batches (e.g. a critic's AUC); the trainer logs them beside the means.
    # Optional: `on_step_end(step: int)`, called after every optimizer step (step counts from 1).
    # Optional: `state_dict() -> dict` / `load_state_dict(state)`, state besides the trained modules
    # (e.g. a frozen value snapshot) that checkpoints save and a resumed run restores.


def loss_metrics(out: MTPLossOutput) -> dict[str, float]:
    """The loss, and per head: weighted loss, plain cross-entropy and top-1 accuracy."""
    metrics = out.metrics()
    return {key: value for key, value in metrics.items() if not key.endswith("/tokens")}


class BaselineObjective:
    """Uniformly weighted MTP: every response token counts the same for every head."""

    def __init__(self, *, chunk_size: int = 1024, head_weights: Sequence[float] | None = None) -> None:
        self.chunk_size = chunk_size
        self.head_weights = list(head_weights) if head_weights is not None else None

    def forward_backward(
        self, model: nn.Module, batch: Batch, *, loss_scale: float
    ) -> dict[str, float | Tensor]:
        out = mtp_forward_backward(
            model,
            batch.input_ids,
            batch.labels,
            attention_mask=batch.attention_mask,
            head_weights=self.head_weights,
            chunk_size=self.chunk_size,
            loss_scale=loss_scale,
        )
        return loss_metrics(out)

    def evaluate(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        out = mtp_evaluate(
            model,
            batch.input_ids,
            batch.labels,
            attention_mask=batch.attention_mask,
            head_weights=self.head_weights,
            chunk_size=self.chunk_size,
        )
        return loss_metrics(out)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {}
