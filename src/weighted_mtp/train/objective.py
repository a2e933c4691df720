"""What a pipeline gives the trainer: how to compute a micro-batch's loss and gradients.

The trainer owns the loop (accumulation, clipping, optimizer, checkpoints, logging); an `Objective`
owns the loss. It runs its own backward because the memory-efficient MTP loss does
(`mtp_forward_backward`), and returns plain metrics, "loss" among them.

A step's loss is that of its whole global batch, however the batch is split into micro-batches and
ranks: every loss is a sum over its terms (a head's target tokens, a value head's steps) divided by
the number of terms in the whole step. The objective says how many terms each of its losses has in
a micro-batch (`token_counts`); the trainer adds these up over the step's micro-batches and ranks
and hands the totals back (`global_counts`), so each micro-batch contributes its share of the step's
loss, and the shares add up to the loss of the global batch in one piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from weighted_mtp.data import Batch
from weighted_mtp.losses import MTPLossOutput, head_target_counts, mtp_evaluate, mtp_forward_backward

Counts = dict[str, float]


@runtime_checkable
class Objective(Protocol):
    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        """How many terms each loss averages over in this micro-batch, e.g. {"head1": 97, ...}."""
        ...

    def forward_backward(
        self, model: nn.Module, batch: Batch, *, loss_scale: float, global_counts: Counts | None = None
    ) -> dict[str, float | Tensor]:
        """Forward, backward (gradients scaled by `loss_scale`) and metrics of this micro-batch's
        share of the step's loss: each loss's sum divided by its count in `global_counts` (the
        step's totals of `token_counts`; None: this micro-batch's own, i.e. its own means). Every
        metric is a share too: the step's value is their sum over micro-batches and ranks."""
        ...

    def evaluate(
        self, model: nn.Module, batch: Batch, *, global_counts: Counts | None = None
    ) -> dict[str, float]:
        """Validation metrics without gradients, shares like `forward_backward`'s: with the totals
        of `token_counts` over the whole validation pass, their sum over batches and ranks is each
        metric's term-weighted value over the validation set."""
        ...

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules besides the model that the optimizer updates and checkpoints save (a value head)."""
        ...

    # Optional: `evaluation_summary() -> dict[str, float]`, metrics of a whole validation pass that
    # are not sums of shares (e.g. a critic's AUC); the trainer logs them beside the others.
    # Optional: `on_step_end(step: int)`, called after every optimizer step (step counts from 1).
    # Optional: `state_dict() -> dict` / `load_state_dict(state)`, state besides the trained modules
    # (e.g. a frozen value snapshot) that checkpoints save and a resumed run restores.


def loss_metrics(out: MTPLossOutput) -> dict[str, float]:
    """The loss, and per head: weighted loss, plain cross-entropy and top-1 accuracy."""
    metrics = out.metrics()
    return {key: value for key, value in metrics.items() if not key.endswith("/tokens")}


def target_counts(labels: Tensor, n_heads: int) -> Counts:
    """{"head1": N_1, ..., "headn": N_n}: each head's target tokens, what its loss is divided by."""
    return {f"head{k + 1}": count for k, count in enumerate(head_target_counts(labels, n_heads).tolist())}


def head_counts(counts: Counts, n_heads: int) -> list[float]:
    """The heads' entries of `counts` in head order (`target_counts` of `mtp_forward_backward`)."""
    return [counts[f"head{k + 1}"] for k in range(n_heads)]


def share(local: float, total: float) -> float:
    """This micro-batch's fraction of the step's terms: turns a statistic of the micro-batch into
    its share of the step's term-weighted mean (0 for a micro-batch without terms)."""
    return local / max(total, 1.0)


def scaled(metrics: dict[str, float], fraction: float) -> dict[str, float]:
    return {key: value * fraction for key, value in metrics.items()}


class BaselineObjective:
    """Uniformly weighted MTP: every response token counts the same for every head."""

    def __init__(self, *, chunk_size: int = 1024, head_weights: Sequence[float] | None = None) -> None:
        self.chunk_size = chunk_size
        self.head_weights = list(head_weights) if head_weights is not None else None

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        return target_counts(batch.labels, model.n_future_tokens)

    def _run(self, loss_fn, model: nn.Module, batch: Batch, global_counts: Counts | None, **loss_kwargs):
        """`mtp_forward_backward` or `mtp_evaluate` on the batch, normalised by the step's counts."""
        counts = global_counts or self.token_counts(model, batch)
        out = loss_fn(
            model,
            batch.input_ids,
            batch.labels,
            attention_mask=batch.attention_mask,
            head_weights=self.head_weights,
            chunk_size=self.chunk_size,
            target_counts=head_counts(counts, model.n_future_tokens),
            **loss_kwargs,
        )
        return loss_metrics(out)

    def forward_backward(
        self, model: nn.Module, batch: Batch, *, loss_scale: float, global_counts: Counts | None = None
    ) -> dict[str, float | Tensor]:
        return self._run(mtp_forward_backward, model, batch, global_counts, loss_scale=loss_scale)

    def evaluate(
        self, model: nn.Module, batch: Batch, *, global_counts: Counts | None = None
    ) -> dict[str, float]:
        return self._run(mtp_evaluate, model, batch, global_counts)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {}
