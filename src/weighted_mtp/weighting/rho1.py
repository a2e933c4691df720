"""Rho-1 (Lin et al. 2024): train on the tokens whose loss most exceeds a reference model's.

excess[p] = CE_model[p] - CE_reference[p] for each valid target (the reference is a model tuned on
high-quality data; a high excess marks a token that is learnable but not yet learnt). The model's
CE is only known inside the loss, so the weights are a callable that `mtp_forward_backward` calls
per head with the model's detached per-token CE (see `Rho1TokenWeights`).

selection="top_k": the top `ratio` of the valid targets of the micro-batch (all rows together) by
excess get weight N/n_keep, the rest 0, where n_keep = round(ratio * N) (at least 1). The
renormalisation makes the mean weight over valid targets 1, so the loss L = sum(w*ce)/N is the
mean CE over the selected tokens — the paper's objective — and keeps the uniform baseline's
scale. Ties are broken by position (row-major: earlier rows, then earlier positions, win).

selection="soft": w = N * softmax(excess / temperature) over the valid targets (mean 1).

per_head=True selects for each head by that head's excess. per_head=False selects tokens by head
1's excess and every head reuses that choice for the same target token (head k at position p
reads head 1's weight at p+k-1); this needs head 1 to be weighed first, which is the loss's order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from weighted_mtp.errors import ConfigError
from weighted_mtp.registry import WEIGHTING_SCHEMES
from weighted_mtp.weighting.base import (
    IGNORE_INDEX,
    BatchLike,
    WeightingContext,
    all_head_targets,
    weight_stats,
)

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
    """[B,T,n] float32 CE of the model's head k at position p for target labels[p+k]; 0 where no target.

    Only the valid targets are unembedded, chunk_size rows at a time, so no [B,T,V] logits exist.
    """
    n_heads = model.n_future_tokens if n_heads is None else n_heads
    if n_heads > model.n_future_tokens:
        raise ValueError(f"asked for {n_heads} heads of a reference model that has {model.n_future_tokens}")
    targets = all_head_targets(labels, n_heads)
    trunk = model.trunk_forward(input_ids, attention_mask=attention_mask)
    token_ce = torch.zeros(targets.shape, dtype=torch.float32, device=trunk.device)
    for k0 in range(n_heads):
        valid = targets[..., k0] != IGNORE_INDEX
        if not valid.any():
            continue
        hidden = model.norm(model.head_forward(k0, trunk, attention_mask=attention_mask))[valid]
        targets_k = targets[..., k0][valid]
        per_token = torch.empty(targets_k.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = model.output(hidden[rows]).float()
            per_token[rows] = F.cross_entropy(logits, targets_k[rows], reduction="none")
        token_ce[..., k0][valid] = per_token
    return token_ce


def top_k_weights(scores: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """[B,T]: N/n_keep on the n_keep = round(ratio*N) highest-scoring valid positions, else 0."""
    mask = mask.bool()
    weights = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
    count = int(mask.sum())
    if count == 0:
        return weights
    n_keep = min(count, max(1, int(ratio * count + 0.5)))
    order = torch.sort(scores[mask].float(), descending=True, stable=True).indices
    valid_weights = torch.zeros(count, dtype=torch.float32, device=scores.device)
    valid_weights[order[:n_keep]] = count / n_keep
    weights[mask] = valid_weights
    return weights


def soft_weights(scores: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """[B,T]: N * softmax(score / temperature) over the N valid positions, else 0."""
    mask = mask.bool()
    weights = torch.zeros(scores.shape, dtype=torch.float32, device=scores.device)
    count = int(mask.sum())
    if count:
        weights[mask] = count * torch.softmax(scores[mask].float() / temperature, dim=0)
    return weights


class Rho1TokenWeights:
    """The per-head callable for `mtp_forward_backward`; keeps what it gave out for `stats`."""

    def __init__(
        self,
        reference_ce: Tensor,
        *,
        n_heads: int,
        selection: Literal["top_k", "soft"] = "top_k",
        ratio: float = 0.6,
        temperature: float = 1.0,
        per_head: bool = True,
    ) -> None:
        needed = n_heads if per_head else 1
        if reference_ce.shape[-1] < needed:
            raise ValueError(
                f"rho1 with per_head={per_head} needs reference CE for {needed} head(s), "
                f"got {reference_ce.shape[-1]}"
            )
        if selection not in ("top_k", "soft"):
            raise ValueError(f"unknown rho1 selection {selection!r} (expected top_k or soft)")
        self.reference_ce = reference_ce.detach().float()
        self.n_heads, self.selection, self.ratio = n_heads, selection, ratio
        self.temperature, self.per_head = temperature, per_head
        self.weights_by_head: dict[int, Tensor] = {}
        self.excess_by_head: dict[int, Tensor] = {}

    def _select(self, excess: Tensor, mask: Tensor) -> Tensor:
        if self.selection == "top_k":
            return top_k_weights(excess, mask, self.ratio)
        return soft_weights(excess, mask, self.temperature)

    def __call__(self, k0: int, token_ce: Tensor, target_mask: Tensor) -> Tensor:
        mask = target_mask.bool()
        if self.per_head or k0 == 0:
            excess = token_ce.detach().float() - self.reference_ce[..., k0].to(token_ce.device)
            self.excess_by_head[k0] = torch.where(mask, excess, 0.0)
            weights = self._select(excess, mask)
        else:
            if 0 not in self.weights_by_head:
                raise RuntimeError("rho1 with per_head=False must weigh head 1 (k0=0) before the others")
            head1 = self.weights_by_head[0]
            weights = torch.zeros_like(head1)
            weights[:, : head1.shape[1] - k0] = head1[:, k0:]
            weights = torch.where(mask, weights, 0.0)
        self.weights_by_head[k0] = weights
        return weights

    def as_tensor(self) -> Tensor:
        """[B,T,n] of the weights handed out so far (0 for heads not yet weighed)."""
        shape = (*self.reference_ce.shape[:2], self.n_heads)
        out = torch.zeros(shape, dtype=torch.float32, device=self.reference_ce.device)
        for k0, weights in self.weights_by_head.items():
            out[..., k0] = weights.to(out.device)
        return out


@WEIGHTING_SCHEMES.register("rho1")
class Rho1Weighting:
    """Reads context.reference_ce ([B,T,n], from `reference_ce`); returns a `Rho1TokenWeights`."""

    name = "rho1"

    def __init__(
        self,
        *,
        selection: Literal["top_k", "soft"] = "top_k",
        ratio: float = 0.6,
        temperature: float = 1.0,
        per_head: bool = True,
    ) -> None:
        self.selection, self.ratio, self.temperature, self.per_head = selection, ratio, temperature, per_head

    @classmethod
    def from_config(cls, config: Config) -> Rho1Weighting:
        section = config.rho1
        return cls(
            selection=section.selection,
            ratio=section.top_k_ratio,
            temperature=section.temperature,
            per_head=section.per_head,
        )

    def reference_ce(
        self, reference_model: nn.Module, batch: BatchLike, *, n_heads: int, chunk_size: int = 1024
    ) -> Tensor:
        """The reference CE this scheme needs: every head with per_head, else head 1 only."""
        if self.per_head and reference_model.n_future_tokens < n_heads:
            raise ConfigError(
                f"rho1.per_head is true but the reference model has {reference_model.n_future_tokens} "
                f"head(s) for {n_heads} trained heads; set rho1.per_head: false or use a reference with "
                f"{n_heads} heads"
            )
        return reference_token_ce(
            reference_model,
            batch.input_ids,
            batch.labels,
            attention_mask=getattr(batch, "attention_mask", None),
            n_heads=n_heads if self.per_head else 1,
            chunk_size=chunk_size,
        )

    def weights(self, batch: BatchLike, *, n_heads: int, context: WeightingContext) -> Rho1TokenWeights:
        if context.reference_ce is None:
            raise ValueError("the rho1 weighting needs the reference model's CE in context.reference_ce")
        return Rho1TokenWeights(
            context.reference_ce,
            n_heads=n_heads,
            selection=self.selection,
            ratio=self.ratio,
            temperature=self.temperature,
            per_head=self.per_head,
        )

    def stats(self, weights: Tensor | Rho1TokenWeights, mask: Tensor) -> dict[str, float]:
        if isinstance(weights, Rho1TokenWeights):
            excess = weights.excess_by_head
            weights = weights.as_tensor()
        else:
            excess = {}
        stats = weight_stats(weights, mask)
        valid = weights.detach()[mask.bool()]
        if valid.numel():
            stats["selected"] = float((valid > 0).float().mean())
        if 0 in excess:
            head1_mask = mask[..., 0].bool()
            if head1_mask.any():
                stats["excess_head1"] = float(excess[0][head1_mask].mean())
        return stats
