"""What an experiment gives the trainer: how a micro-batch becomes a loss, gradients and metrics.

The trainer owns the loop (accumulation, clipping, optimizer, checkpoints, logging); an `Objective`
owns the loss. It runs its own backward because the memory-efficient MTP loss does
(`mtp_forward_backward`), and returns plain metrics, "loss" among them.

A step's loss is that of its whole global batch, however the batch is split into micro-batches and
ranks: every loss is a sum over its terms (a head's target tokens, a value head's steps) divided by
the number of terms in the whole step. The objective says how many terms each of its losses has in
a micro-batch (`token_counts`); the trainer adds these up over the step's micro-batches and ranks
and hands the totals back (`counts`), so each micro-batch contributes its share of the step's loss,
and the shares add up to the loss of the global batch in one piece.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from weighted_mtp.data import Batch
from weighted_mtp.losses import MTPLossOutput, head_target_counts
from weighted_mtp.models.checkpoints import TensorSource
from weighted_mtp.weighting import head_target_mask

Counts = dict[str, float]


@dataclass
class TokenWeights:
    """What an objective makes of a batch's target tokens, shown by `wmtp inspect weights`."""

    weights: Tensor | None  # [B,T,n] the loss weight of head k's target labels[p+k] at p; None: no LM loss
    details: dict[str, Tensor] = field(default_factory=dict)  # [B,T] per position: a value, an advantage


@dataclass
class FrozenModel:
    """A model an objective only runs forward (Rho-1's reference). With `pending_weights` it is still
    on the meta device (a sharded start-up): once sharded, each rank fills its shards from them."""

    module: nn.Module
    pending_weights: dict[str, TensorSource] | None = None


class Objective:
    """One experiment's loss. A subclass writes `token_counts` and `step`; the other methods are
    hooks with a default that does nothing, which the trainer calls on every objective."""

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        """How many terms each loss averages over in this micro-batch, e.g. {"head1": 97, ...}."""
        raise NotImplementedError

    def step(self, model: nn.Module, batch: Batch, counts: Counts, *, loss_scale: float | None) -> dict[str, float]:
        """This micro-batch's share of the step's loss and metrics: each loss's sum divided by its
        count in `counts` (the step's totals of `token_counts`). With `loss_scale`, also its
        backward (gradients scaled by it); with None, validation: no gradients. Every metric is a
        share too: the step's value is their sum over micro-batches and ranks."""
        raise NotImplementedError

    def forward_backward(
        self, model: nn.Module, batch: Batch, *, loss_scale: float, global_counts: Counts | None = None
    ) -> dict[str, float]:
        """`step` with gradients on one micro-batch (the dry run, tests); without `global_counts`,
        the micro-batch is the whole step (its own means and statistics). The trainer calls
        `prepare_step` and `step` itself."""
        if global_counts is None:
            self.prepare_step(model, [batch], local_sums)
        return self.step(model, batch, global_counts or self.token_counts(model, batch), loss_scale=loss_scale)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: Batch, *, global_counts: Counts | None = None) -> dict[str, float]:
        """Validation: with the totals of `token_counts` over the whole validation pass, the sum of
        the returned shares over batches and ranks is each metric's term-weighted value."""
        return self.step(model, batch, global_counts or self.token_counts(model, batch), loss_scale=None)

    @torch.no_grad()
    def token_weights(self, model: nn.Module, batch: Batch) -> TokenWeights:
        """Each target token's loss weight on this batch alone (no step statistics, no gradient):
        1 on every target, the baseline's."""
        return TokenWeights(head_target_mask(batch.labels, model.n_future_tokens).float())

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Modules besides the model that the optimizer updates and checkpoints save (a value head)."""
        return {}

    def frozen_modules(self) -> dict[str, FrozenModel]:
        """Models the objective only runs forward (Rho-1's reference): the trainer shards them like the
        model under FSDP, so no rank holds a whole copy on its device."""
        return {}

    def prepare_step(
        self, model: nn.Module, batches: list[Batch], reduce_sum: Callable[[dict[str, float]], dict[str, float]]
    ) -> None:
        """Called before a training step's micro-batches with all of them (this rank's) and a function
        that sums a dict of floats over the ranks: statistics the objective needs over the whole step
        (the critic weights' z-score and mean 1)."""

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step (`step` counts from 1)."""

    def evaluation_summary(self) -> dict[str, float]:
        """Metrics of a whole validation pass that are not sums of shares (a critic's AUC)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State besides the trained modules (a frozen value snapshot) that checkpoints save."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()` when a run resumes."""


WEIGHT_BIN_EDGES = [2.0 ** (e / 4) for e in range(-16, 17)]  # 1/16 .. 16, four bins per doubling


def weight_histogram_counts(weights: Tensor, labels: Tensor, rewards: Tensor) -> dict[str, float]:
    """Counts of head 1's weights over its targets, by label ("passing" reward > 0.5, else "failing")
    and bin: "<label>/0" for weight 0, "<label>/<i>" for bin i of `WEIGHT_BIN_EDGES` (below the
    first edge in bin 1, above the last in the last bin). Plain sums, so ranks can add them up."""
    mask = head_target_mask(labels, 1)[..., 0]
    head1 = weights[..., 0].detach().double().contiguous()
    passing = (rewards > 0.5)[:, None].expand_as(mask).to(mask.device)
    edges = torch.tensor(WEIGHT_BIN_EDGES, dtype=torch.float64, device=head1.device)
    bins = torch.bucketize(head1, edges[1:-1]) + 1  # 1 .. len(edges) - 1
    out: dict[str, float] = {}
    for label, rows in (("passing", passing), ("failing", ~passing)):
        chosen = mask & rows
        out[f"{label}/0"] = float((chosen & (head1 == 0)).sum())
        positive = chosen & (head1 > 0)
        counts = torch.bincount(bins[positive], minlength=len(WEIGHT_BIN_EDGES))
        out.update({f"{label}/{i}": float(counts[i]) for i in range(1, len(WEIGHT_BIN_EDGES))})
    return out


def head_counts(counts: Counts, n_heads: int) -> list[float]:
    """The heads' entries of `counts` in head order: the `target_counts` of the MTP loss."""
    return [counts[f"head{k + 1}"] for k in range(n_heads)]


def local_sums(sums: dict[str, float]) -> dict[str, float]:
    """`reduce_sum` for a single process: the sums are already the totals."""
    return sums


def target_counts(labels: Tensor, n_heads: int) -> Counts:
    """{"head1": N_1, ..., "headn": N_n}: each head's target tokens, what its loss is divided by."""
    return {f"head{k + 1}": count for k, count in enumerate(head_target_counts(labels, n_heads).tolist())}


def share(local: float, total: float) -> float:
    """This micro-batch's fraction of the step's terms: turns a statistic of the micro-batch into
    its share of the step's term-weighted mean (0 for a micro-batch without terms)."""
    return local / max(total, 1.0)


def scaled(metrics: dict[str, float], fraction: float) -> dict[str, float]:
    return {key: value * fraction for key, value in metrics.items()}


def prefixed(prefix: str, stats: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}/{key}": value for key, value in stats.items() if key != "tokens"}


def loss_metrics(out: MTPLossOutput) -> dict[str, float]:
    """The loss, and per head: weighted loss, plain cross-entropy and top-1 accuracy."""
    return {key: value for key, value in out.metrics().items() if not key.endswith("/tokens")}
