"""Rho-1 (Lin et al. 2024): train on the tokens whose loss most exceeds a reference model's.

excess[p] = CE_model[p] - CE_reference[p] for each valid target (the reference is a model tuned on
high-quality data; a high excess marks a token that is learnable but not yet learnt). Both CEs
come from `losses.head_token_ce` on each model's trunk output, before the weighted loss.

selection="top_k": the top `ratio` of the valid targets of the micro-batch (all rows together) by
excess get weight N/n_keep, the rest 0, where n_keep = round(ratio * N) (at least 1). The
renormalisation makes the mean weight over valid targets 1, so the loss L = sum(w*ce)/N is the
mean CE over the selected tokens — the paper's objective — and keeps the uniform baseline's
scale. Ties are broken by position (row-major: earlier rows, then earlier positions, win).

selection="soft": w = N * softmax(excess / temperature) over the valid targets (mean 1).

statistics="step" (the default) takes N, the selection and the softmax over every micro-batch and
rank of the optimizer step, so accumulation and the number of ranks do not change the weights
(`step_statistics`): top-k keeps the targets whose excess is at least the step's n_keep-th largest,
found by a binary search on the values' order-preserving integer keys with one all-reduce of counts
per bit (exact; tokens tied at the threshold are all kept, and the weight N / selected keeps mean 1);
soft divides by the step's sum of exp((excess - max) / temperature).

per_head=True selects for each head by that head's excess. per_head=False selects tokens by head
1's excess and every head reuses that choice for the same target token (head k at position p
reads head 1's weight at p+k-1), so only head 1's CE is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from weighted_mtp.losses import head_token_ce
from weighted_mtp.weighting.base import head_target_mask, spread_over_heads, weight_stats

if TYPE_CHECKING:
    from weighted_mtp.config.schema import Config


@torch.no_grad()
def reference_token_ce(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    *,
    attention_mask: Tensor | None = None,
    n_heads: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """[B,T,n] CE of the model's head k at position p for target labels[p+k]; 0 where no target."""
    n_heads = model.n_future_tokens if n_heads is None else n_heads
    if n_heads > model.n_future_tokens:
        raise ValueError(f"asked for {n_heads} heads of a reference model that has {model.n_future_tokens}")
    trunk = model.trunk_forward(input_ids, attention_mask=attention_mask)
    return head_token_ce(
        model, trunk, labels, attention_mask=attention_mask, n_heads=n_heads, chunk_size=chunk_size
    ).float()


def top_k_weights(scores: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """[B,T]: N/n_keep on the n_keep = round(ratio*N) highest-scoring valid positions, else 0."""
    mask = mask.bool()
    dtype = torch.promote_types(scores.dtype, torch.float32)  # float64 in, float64 out
    weights = torch.zeros(scores.shape, dtype=dtype, device=scores.device)
    count = int(mask.sum())
    if count == 0:
        return weights
    n_keep = min(count, max(1, int(ratio * count + 0.5)))
    order = torch.sort(scores[mask].to(dtype), descending=True, stable=True).indices
    valid_weights = torch.zeros(count, dtype=dtype, device=scores.device)
    valid_weights[order[:n_keep]] = count / n_keep
    weights[mask] = valid_weights
    return weights


def soft_weights(scores: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """[B,T]: N * softmax(score / temperature) over the N valid positions, else 0."""
    mask = mask.bool()
    dtype = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.zeros(scores.shape, dtype=dtype, device=scores.device)
    count = int(mask.sum())
    if count:
        weights[mask] = count * torch.softmax(scores[mask].to(dtype) / temperature, dim=0)
    return weights


def ordered_keys(values: Tensor) -> Tensor:
    """int64 keys in the order of the float64 values: x < y exactly when key(x) < key(y)."""
    bits = values.double().contiguous().view(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


def value_of_key(key: int) -> float:
    bits = key ^ 0x7FFFFFFFFFFFFFFF if key < 0 else key
    return float(torch.tensor([bits], dtype=torch.int64).view(torch.float64))


def largest_at_rank(
    values: list[list[Tensor]], ranks: list[int], reduce_sum: Callable[[dict[str, float]], dict[str, float]]
) -> list[float]:
    """For each group g (a head), the ranks[g]-th largest of its values (1: the largest), over the
    pieces in values[g] and over every process `reduce_sum` adds up: the largest v with
    count(x >= v) >= rank. Binary search over int64 keys, 64 rounds of one reduce_sum each."""
    keys = [[ordered_keys(piece) for piece in group] for group in values]
    low, high = [-(2**63)] * len(values), [2**63 - 1] * len(values)
    while any(lo < hi for lo, hi in zip(low, high)):
        middle = [(lo + hi + 1) // 2 for lo, hi in zip(low, high)]
        counts = reduce_sum({
            str(g): float(sum(int((piece >= middle[g]).sum()) for piece in group)) for g, group in enumerate(keys)
        })  # fmt: skip
        for g in range(len(values)):
            if low[g] < high[g]:
                if counts[str(g)] >= ranks[g]:
                    low[g] = middle[g]
                else:
                    high[g] = middle[g] - 1
    return [value_of_key(lo) for lo in low]


@dataclass(frozen=True)
class Rho1StepStatistics:
    """Per scored head, over the whole step: the number of valid targets N; for top-k the threshold
    and how many targets reach it; for soft the largest excess and sum of exp((x - max) / T)."""

    counts: list[float]
    thresholds: list[float] | None = None
    selected: list[float] | None = None
    maxima: list[float] | None = None
    exp_sums: list[float] | None = None


@dataclass(frozen=True)
class Rho1Weighting:
    """How Rho-1 turns excess losses into token weights (`rho1.*` in the config)."""

    selection: Literal["top_k", "soft"] = "top_k"
    ratio: float = 0.6
    temperature: float = 1.0
    per_head: bool = True
    statistics: Literal["step", "micro_batch"] = "step"

    def __post_init__(self) -> None:
        if self.selection not in ("top_k", "soft"):
            raise ValueError(f"unknown rho1 selection {self.selection!r} (expected top_k or soft)")

    @classmethod
    def from_config(cls, config: Config) -> Rho1Weighting:
        section = config.rho1
        return cls(
            selection=section.selection,
            ratio=section.top_k_ratio,
            temperature=section.temperature,
            per_head=section.per_head,
            statistics=section.statistics,
        )

    def scored_heads(self, n_heads: int) -> int:
        """How many heads' excess loss the selection reads: every head with per_head, else head 1."""
        return n_heads if self.per_head else 1

    def excess(self, model_ce: Tensor, reference_ce: Tensor, labels: Tensor, *, n_heads: int) -> tuple[Tensor, Tensor]:
        """[B,T,h] excess loss (0 off target) and its [B,T,h] mask of valid targets from both models'
        [B,T,>=h] per-token CE, h = `scored_heads(n_heads)`."""
        heads = self.scored_heads(n_heads)
        if model_ce.shape[-1] < heads or reference_ce.shape[-1] < heads:
            raise ValueError(
                f"rho1 with per_head={self.per_head} needs the CE of {heads} head(s), got "
                f"{model_ce.shape[-1]} (model) and {reference_ce.shape[-1]} (reference)"
            )
        mask = head_target_mask(labels, n_heads).to(model_ce.device)[..., :heads]
        dtype = torch.promote_types(torch.promote_types(model_ce.dtype, reference_ce.dtype), torch.float32)
        excess = model_ce[..., :heads].to(dtype) - reference_ce[..., :heads].to(dtype).to(model_ce.device)
        return torch.where(mask, excess, 0.0), mask

    def step_statistics(
        self, excess: list[tuple[Tensor, Tensor]], reduce_sum: Callable[[dict[str, float]], dict[str, float]]
    ) -> Rho1StepStatistics:
        """The statistics of a step's excess losses ((excess, mask) [B,T,h] per micro-batch on this
        rank), over every rank that `reduce_sum` adds up."""
        heads = excess[0][0].shape[-1]
        valid = [[e[..., k0][m[..., k0]].double() for e, m in excess] for k0 in range(heads)]
        totals = reduce_sum({str(k0): float(sum(v.numel() for v in valid[k0])) for k0 in range(heads)})
        counts = [totals[str(k0)] for k0 in range(heads)]
        if self.selection == "top_k":
            keep = [min(n, max(1, int(self.ratio * n + 0.5))) for n in counts]
            thresholds = largest_at_rank(valid, keep, reduce_sum)
            reached = reduce_sum({str(k0): float(sum(int((v >= thresholds[k0]).sum()) for v in valid[k0]))
                                  for k0 in range(heads)})
            return Rho1StepStatistics(counts, thresholds=thresholds, selected=[reached[str(k0)] for k0 in range(heads)])
        maxima = largest_at_rank(valid, [1] * heads, reduce_sum)
        sums = reduce_sum({str(k0): float(sum(torch.exp((v - maxima[k0]) / self.temperature).sum() for v in valid[k0]))
                           for k0 in range(heads)})
        return Rho1StepStatistics(counts, maxima=maxima, exp_sums=[sums[str(k0)] for k0 in range(heads)])

    def weights(
        self, model_ce: Tensor, reference_ce: Tensor, labels: Tensor, *, n_heads: int,
        statistics: Rho1StepStatistics | None = None,
    ) -> tuple[Tensor, Tensor]:
        """[B,T,n] token weights and [B,T,h] excess loss (0 off target) from both models' [B,T,>=h]
        per-token CE, h = `scored_heads(n_heads)`; over the whole step with its `statistics`, else
        over this batch alone."""
        excess, scored_mask = self.excess(model_ce, reference_ce, labels, n_heads=n_heads)
        return self.weights_from_excess(excess, scored_mask, labels, n_heads=n_heads, statistics=statistics), excess

    def weights_from_excess(
        self, excess: Tensor, scored_mask: Tensor, labels: Tensor, *, n_heads: int,
        statistics: Rho1StepStatistics | None = None,
    ) -> Tensor:
        heads = excess.shape[-1]
        mask = head_target_mask(labels, n_heads).to(excess.device)
        weights = torch.zeros(mask.shape, dtype=excess.dtype, device=excess.device)
        for k0 in range(heads):
            valid = scored_mask[..., k0]
            if statistics is not None and self.selection == "top_k":
                chosen = valid & (excess[..., k0].double() >= statistics.thresholds[k0])
                weights[..., k0] = chosen.to(weights.dtype) * (statistics.counts[k0] / max(statistics.selected[k0], 1.0))
            elif statistics is not None:
                shifted = torch.exp((excess[..., k0].double() - statistics.maxima[k0]) / self.temperature)
                weights[..., k0] = torch.where(valid, statistics.counts[k0] * shifted / statistics.exp_sums[k0], 0.0)
            elif self.selection == "top_k":
                weights[..., k0] = top_k_weights(excess[..., k0], valid, self.ratio)
            else:
                weights[..., k0] = soft_weights(excess[..., k0], valid, self.temperature)
        if not self.per_head:  # every head weighs a target token as head 1 chose it
            weights = torch.where(mask, spread_over_heads(weights[..., 0], n_heads), 0.0)
        return weights

    def stats(self, weights: Tensor, excess: Tensor, mask: Tensor) -> dict[str, float]:
        """Weight statistics over the valid targets (`mask` [B,T,n]), the fraction selected and
        head 1's mean excess loss."""
        stats = weight_stats(weights, mask)
        valid = weights.detach()[mask.bool()]
        if valid.numel():
            stats["selected"] = float((valid > 0).float().mean())
        head1_mask = mask[..., 0].bool()
        if head1_mask.any():
            stats["excess_head1"] = float(excess[..., 0][head1_mask].mean())
        return stats
