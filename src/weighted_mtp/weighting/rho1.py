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

per_head=True selects for each head by that head's excess. per_head=False selects tokens by head
1's excess and every head reuses that choice for the same target token (head k at position p
reads head 1's weight at p+k-1), so only head 1's CE is computed.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Rho1Weighting:
    """How Rho-1 turns excess losses into token weights (`rho1.*` in the config)."""

    selection: Literal["top_k", "soft"] = "top_k"
    ratio: float = 0.6
    temperature: float = 1.0
    per_head: bool = True

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
        )

    def scored_heads(self, n_heads: int) -> int:
        """How many heads' excess loss the selection reads: every head with per_head, else head 1."""
        return n_heads if self.per_head else 1

    def weights(self, model_ce: Tensor, reference_ce: Tensor, labels: Tensor, *, n_heads: int) -> tuple[Tensor, Tensor]:
        """[B,T,n] token weights and [B,T,h] excess loss (0 off target) from both models' [B,T,>=h]
        per-token CE, h = `scored_heads(n_heads)`."""
        heads = self.scored_heads(n_heads)
        if model_ce.shape[-1] < heads or reference_ce.shape[-1] < heads:
            raise ValueError(
                f"rho1 with per_head={self.per_head} needs the CE of {heads} head(s), got "
                f"{model_ce.shape[-1]} (model) and {reference_ce.shape[-1]} (reference)"
            )
        mask = head_target_mask(labels, n_heads).to(model_ce.device)
        dtype = torch.promote_types(torch.promote_types(model_ce.dtype, reference_ce.dtype), torch.float32)
        excess = model_ce[..., :heads].to(dtype) - reference_ce[..., :heads].to(dtype).to(model_ce.device)
        weights = torch.zeros(mask.shape, dtype=dtype, device=model_ce.device)
        for k0 in range(heads):
            if self.selection == "top_k":
                weights[..., k0] = top_k_weights(excess[..., k0], mask[..., k0], self.ratio)
            else:
                weights[..., k0] = soft_weights(excess[..., k0], mask[..., k0], self.temperature)
        if not self.per_head:  # every head weighs a target token as head 1 chose it
            weights = torch.where(mask, spread_over_heads(weights[..., 0], n_heads), 0.0)
        return weights, torch.where(mask[..., :heads], excess, 0.0)

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
