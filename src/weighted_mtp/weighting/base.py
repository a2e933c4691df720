"""What the weighting functions share: the label/position alignment, head discounting, logging stats.

Alignment used throughout this package (the same as `mtp_forward_backward`'s): tensors are indexed
by *input position* p. Position p is the state after reading tokens 0..p; head k (1-based) at p
predicts token p+k, whose label is `labels[:, p+k]`. A per-token weight is therefore stored at the
position where head 1 predicts that token (`w[:, p]` weighs token p+1), and head k at position p
reads it at p+k-1 (`spread_over_heads`).

Head discounting (`weighting.head_discount`) is not folded into token weights: it is passed to the
loss as `head_weights` (`discounted_head_weights`), where the total is normalised by the sum of the
head weights, so every scheme gets it the same way and the loss scale stays that of one head.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from weighted_mtp.losses import IGNORE_INDEX, head_targets


def discounted_head_weights(n_heads: int, discount: float) -> list[float]:
    """head_weights for the loss: head k weighs discount**(k-1)."""
    return [discount**k for k in range(n_heads)]


def all_head_targets(labels: Tensor, n_heads: int) -> Tensor:
    """[B,T,n] targets: out[:, p, k-1] = labels[:, p+k], IGNORE_INDEX past the end."""
    return torch.stack([head_targets(labels, k) for k in range(1, n_heads + 1)], dim=-1)


def head_target_mask(labels: Tensor, n_heads: int) -> Tensor:
    """[B,T,n] bool: head k at position p has a target that counts in the loss."""
    return all_head_targets(labels, n_heads) != IGNORE_INDEX


def response_step_mask(labels: Tensor) -> Tensor:
    """[B,T] bool: positions p whose next token p+1 is a response token (head 1's target mask).

    These are the states at which the policy acts; the critic's values and advantages live here.
    """
    return head_target_mask(labels, 1)[..., 0]


def spread_over_heads(step_weights: Tensor, n_heads: int) -> Tensor:
    """[B,T] per-token weights (at head-1 positions) -> [B,T,n]: out[:, p, k-1] = w[:, p+k-1]."""
    batch, length = step_weights.shape
    out = step_weights.new_zeros((batch, length, n_heads))
    for k in range(1, n_heads + 1):
        out[:, : length - k + 1, k - 1] = step_weights[:, k - 1 :]
    return out


def weight_stats(weights: Tensor, mask: Tensor) -> dict[str, float]:
    """mean/std/min/max of the weights over valid targets, and their normalised entropy.

    entropy = H(w / sum w) / log N over the N valid targets: 1 for uniform weights, lower as the
    weight concentrates on fewer tokens (0 when a single token carries it all).
    """
    valid = weights.detach()[mask.bool()].double()
    count = valid.numel()
    if count == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0, "entropy": 0.0, "tokens": 0.0}
    total = valid.sum()
    if count > 1 and total > 0:
        p = valid / total
        entropy = float(-(p * torch.log(p.clamp_min(1e-300))).sum() / math.log(count))
    else:
        entropy = 1.0 if count == 1 else 0.0
    return {
        "mean": float(valid.mean()),
        "std": float(valid.std(unbiased=False)),
        "min": float(valid.min()),
        "max": float(valid.max()),
        "entropy": entropy,
        "tokens": float(count),
    }
