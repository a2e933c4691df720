"""Rho-1 (Lin et al. 2024): train on the tokens whose loss most exceeds a reference model's.

Differs from the baseline in its objective: a frozen reference model (`rho1.reference_model`,
default the ref_tuning run's export `<paths.runs>/ref_tuning/final`) scores every target token
first; the MTP loss then keeps the top `rho1.top_k_ratio` of tokens by excess loss (or softmax
weights with `selection: soft`), per head or by head 1's choice (`rho1.per_head`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from weighted_mtp.config.schema import Config
from weighted_mtp.data import Batch
from weighted_mtp.errors import CheckpointError, ConfigError
from weighted_mtp.losses import head_token_ce, mtp_forward_backward
from weighted_mtp.models.checkpoints import TensorSource, build_model, model_skeleton
from weighted_mtp.models.loading import DTYPES, read_named_or_path
from weighted_mtp.objectives.base import (
    Counts,
    FrozenModel,
    Objective,
    TokenWeights,
    head_counts,
    loss_metrics,
    prefixed,
    scaled,
    share,
    target_counts,
)
from weighted_mtp.weighting import (
    Rho1StepStatistics,
    Rho1Weighting,
    discounted_head_weights,
    head_target_mask,
    reference_token_ce,
)

log = logging.getLogger(__name__)


def reference_location(config: Config) -> str:
    """The reference model's name or path; a clear error when the default one was not trained yet."""
    if config.rho1.reference_model is not None:
        return config.rho1.reference_model
    path = config.paths.runs / "ref_tuning" / "final"
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"rho1.reference_model is not set and {path} does not exist: train the reference first "
            "(`wmtp train --recipe ref_tuning`) or set rho1.reference_model"
        )
    return str(path)


def load_reference(config: Config, model: nn.Module, device) -> FrozenModel:
    """The reference model, frozen, in eval mode, on the CPU (the trainer moves it to the device or
    shards it there). Beside a model still on the meta device (a sharded start-up) it stays on the meta
    device too, with the tensors that fill its shards."""
    location = reference_location(config)
    # frozen, so nothing to lose in bf16 on the CPU; float32 on a GPU, like the weights (autocast or FSDP cast)
    dtype = DTYPES[config.dtype] if device.type == "cpu" else DTYPES["float32"]
    raw = read_named_or_path(location, config.paths.models, config.seed)
    pending: dict[str, TensorSource] | None = None
    if next(model.parameters()).is_meta:
        reference, pending = model_skeleton(raw)
        reference.to(dtype)
    else:
        reference = build_model(raw, dtype=dtype)
    if reference.args.vocab_size != model.args.vocab_size:
        raise ConfigError(
            f"rho1.reference_model {location} has a vocabulary of {reference.args.vocab_size} tokens but the "
            f"model has {model.args.vocab_size}: Rho-1 compares losses on the same tokens"
        )
    if config.rho1.per_head and reference.n_future_tokens < model.n_future_tokens:
        raise ConfigError(
            f"rho1.per_head is true but the reference {location} has {reference.n_future_tokens} head(s) for "
            f"{model.n_future_tokens} trained heads; set rho1.per_head: false (select by head 1's excess loss)"
        )
    reference.requires_grad_(False)
    log.info("rho1 reference: %s (%d head(s))%s", location, reference.n_future_tokens,
             ", on the meta device until sharded" if pending is not None else "")
    return FrozenModel(reference.eval(), pending)


class Rho1Objective(Objective):
    """MTP loss on the tokens with the highest excess loss over a frozen reference model."""

    def __init__(
        self,
        reference: nn.Module,
        weighting: Rho1Weighting,
        *,
        head_weights: Sequence[float] | None = None,
        chunk_size: int = 1024,
        reference_weights: dict[str, TensorSource] | None = None,
    ) -> None:
        self.reference = reference
        self.reference_weights = reference_weights  # a reference on the meta device: what fills its shards
        self.weighting = weighting
        self.head_weights = list(head_weights) if head_weights is not None else None
        self.chunk_size = chunk_size
        self.step_statistics: Rho1StepStatistics | None = None  # the current training step's (prepare_step)
        self.step_excess: list[tuple[Batch, Tensor, Tensor]] = []  # its micro-batches with their (excess, mask)

    @classmethod
    def from_config(cls, config: Config, model: nn.Module, device: torch.device) -> Rho1Objective:
        if config.weighting.scheme != "rho1":
            raise ConfigError(
                f"weighting.scheme is {config.weighting.scheme!r}: the rho1 pipeline weighs by excess loss"
            )
        reference = load_reference(config, model, device)
        return cls(
            reference.module,
            Rho1Weighting.from_config(config),
            head_weights=discounted_head_weights(model.n_future_tokens, config.weighting.head_discount),
            chunk_size=config.training.loss_chunk_size,
            reference_weights=reference.pending_weights,
        )

    def token_counts(self, model: nn.Module, batch: Batch) -> Counts:
        return target_counts(batch.labels, model.n_future_tokens)

    @torch.no_grad()
    def _excess(self, model: nn.Module, hidden: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
        """Both models' per-token CE of the scored heads (no gradient) -> (excess, mask) [B,T,h].
        The model's CE runs each scored head's block once more (with dropout, under masks of its own)."""
        scored = self.weighting.scored_heads(model.n_future_tokens)
        model_ce = head_token_ce(
            model, hidden.detach(), batch.labels, attention_mask=batch.attention_mask, n_heads=scored,
            chunk_size=self.chunk_size,
        )  # fmt: skip
        reference_ce = reference_token_ce(
            self.reference, batch.input_ids, batch.labels, attention_mask=batch.attention_mask, n_heads=scored,
            chunk_size=self.chunk_size,
        )  # fmt: skip
        if isinstance(self.reference, FSDPModule):  # its root stays gathered after a forward: free it
            self.reference.reshard()
        return self.weighting.excess(model_ce, reference_ce, batch.labels, n_heads=model.n_future_tokens)

    @torch.no_grad()
    def prepare_step(self, model: nn.Module, batches: list[Batch], reduce_sum) -> None:
        """The selection over the whole step (every micro-batch and rank): each micro-batch's excess
        loss, kept for its backward pass (the reference runs once per micro-batch), then the step's
        threshold or softmax denominator, so accumulation and the number of ranks do not change it."""
        self.on_step_end(0)
        if self.weighting.statistics != "step":
            return
        for batch in batches:
            hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
            self.step_excess.append((batch, *self._excess(model, hidden, batch)))
        self.step_statistics = self.weighting.step_statistics([(e, m) for _, e, m in self.step_excess], reduce_sum)

    def on_step_end(self, step: int) -> None:
        """The step's selection and excess losses are spent."""
        self.step_statistics, self.step_excess = None, []

    def _prepared(self, batch: Batch) -> tuple[Tensor, Tensor]:
        for prepared, excess, mask in self.step_excess:
            if prepared is batch:
                return excess, mask
        raise RuntimeError("Rho-1 with statistics over the step: prepare_step was not given this micro-batch")

    @torch.no_grad()
    def token_weights(self, model: nn.Module, batch: Batch) -> TokenWeights:
        """The selection on this batch, with head 1's excess loss over the reference."""
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        excess, mask = self._excess(model, hidden, batch)
        weights = self.weighting.weights_from_excess(excess, mask, batch.labels, n_heads=model.n_future_tokens)
        return TokenWeights(weights, {"excess": excess[..., 0]})

    def frozen_modules(self) -> dict[str, FrozenModel]:
        return {"reference": FrozenModel(self.reference, self.reference_weights)}

    def step(self, model: nn.Module, batch: Batch, counts: Counts, *, loss_scale: float | None) -> dict[str, float]:
        """Trunk -> the excess loss over the reference (prepared with the step's, or computed here for
        validation and `statistics: micro_batch`) -> the weights of the selected tokens -> the heads'
        weighted loss and backward -> the trunk's backward."""
        n_heads = model.n_future_tokens
        hidden = model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        statistics = self.step_statistics if loss_scale is not None else None  # validation: per batch
        excess, mask = self._prepared(batch) if statistics is not None else self._excess(model, hidden, batch)
        weights = self.weighting.weights_from_excess(excess, mask, batch.labels, n_heads=n_heads, statistics=statistics)
        out = mtp_forward_backward(
            model,
            batch.input_ids,
            batch.labels,
            loss_scale=loss_scale,
            attention_mask=batch.attention_mask,
            target_counts=head_counts(counts, n_heads),
            weights=weights,
            head_weights=self.head_weights,
            chunk_size=self.chunk_size,
            h_trunk=hidden,
        )
        local = self.token_counts(model, batch)
        fraction = share(sum(local.values()), sum(counts.values()))
        stats = self.weighting.stats(weights, excess, head_target_mask(batch.labels, n_heads))
        return {**loss_metrics(out), **scaled(prefixed("weights", stats), fraction)}
