"""Value heads: a critic on the trunk's hidden states, hidden [B, T, D] -> values [B, T] in fp32.

The value of position t estimates the expected return (here: the chance that the completion is
correct) after reading tokens up to t. The critic-based weighting schemes turn its TD/GAE advantages
into token weights. Heads compute in their own parameter dtype (fp32 unless cast) whatever the trunk
runs in, so the regression target and its loss stay in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from weighted_mtp.config.schema import ValueHeadConfig
from weighted_mtp.errors import CheckpointError, UnknownComponentError, lookup

VALUE_HEAD_FILE = "value_head.safetensors"  # beside a critic's exported model


class _ValueHead(nn.Module):
    """RMS-normalises its input first: the trunk's residual stream is not normalised (SmolLM2's
    hidden states have norms of ~600, and ~10,000 at the first position), so a head on raw states
    starts with outputs far from [0, 1] and gradients a hundred times too large."""

    norm: nn.Module
    net: nn.Module

    def forward(self, hidden: Tensor) -> Tensor:
        param_dtype = next(self.parameters()).dtype
        return self.net(self.norm(hidden.to(param_dtype))).squeeze(-1).float()


class LinearValueHead(_ValueHead):
    """One linear map of the hidden state: the cheapest critic, a probe of what the trunk knows."""

    def __init__(self, dim: int, *, hidden_size: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        del hidden_size  # no hidden layer
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, 1))


class MLPValueHead(_ValueHead):
    """Linear -> GELU -> Linear, so the critic can learn features the frozen-ish trunk does not expose."""

    def __init__(self, dim: int, *, hidden_size: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        width = hidden_size or dim
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.net = nn.Sequential(
            nn.Linear(dim, width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(width, 1),
        )


VALUE_HEADS = {"linear": LinearValueHead, "mlp": MLPValueHead}


def build_value_head(cfg: ValueHeadConfig, dim: int) -> nn.Module:
    """The value head the config names (`cfg.type`), for a trunk of width `dim`, in fp32."""
    try:
        head_cls = lookup(VALUE_HEADS, cfg.type, "value head")
    except UnknownComponentError as err:
        raise UnknownComponentError(f"model.value_head.type: {err}") from None
    return head_cls(dim, hidden_size=cfg.hidden_size, dropout=cfg.dropout).to(torch.float32)


def load_value_head(directory: Path, critic, dim: int) -> nn.Module:
    """The value head exported in `directory` by a run whose config is `critic`."""
    from safetensors.torch import load_file

    head = build_value_head(critic.model.value_head, dim)
    path = directory / VALUE_HEAD_FILE
    state = load_file(str(path))
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: does not fit a {critic.model.value_head.type} value head of width {dim} ({first})"
        ) from None
    return head
