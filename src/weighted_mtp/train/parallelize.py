"""What trains and how it is spread over devices, applied to the model from outside (torchtitan's
`parallelize`): per-part training modes (train / LoRA / frozen), activation checkpointing per block,
`torch.compile` per block, then FSDP2 sharding or replicated data parallelism. The model's own code
knows none of this.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import torch
from torch import nn

from weighted_mtp.config.schema import Config
from weighted_mtp.models.checkpoints import TensorSource
from weighted_mtp.models.loading import DTYPES
from weighted_mtp.models.lora import adapted_sources, configure_training_modes
from weighted_mtp.objectives.base import FrozenModel
from weighted_mtp.train import distributed as D

log = logging.getLogger(__name__)


def part_modes(config: Config) -> dict[str, str]:
    """How the trunk, the heads and the unembedding train: `training.freeze`, where
    `training.lora.enabled` turns a part left at `train` into `lora`."""
    freeze, lora = config.training.freeze, config.training.lora
    return {"trunk": "lora" if lora.enabled and freeze.trunk == "train" else freeze.trunk,
            "heads": "lora" if lora.enabled and freeze.heads == "train" else freeze.heads,
            "unembedding": freeze.unembedding}


def parallelize(
    model: nn.Module, extra_modules: dict[str, nn.Module], config: Config, env: D.DistEnv, *,
    pending_weights: dict[str, TensorSource] | None = None, frozen_models: dict[str, FrozenModel] | None = None,
) -> str:
    """Set what trains (LoRA adapters injected where asked), move everything to the device, checkpoint
    activations, compile the blocks, and shard (fsdp) or synchronise (ddp) across ranks. Returns the
    strategy in use: "fsdp", "ddp" or "none" (one process). `pending_weights`: the model is still on
    the meta device (a sharded start-up); it is sharded first and each rank then reads only its
    shards. `frozen_models`: models only run forward (Rho-1's reference), sharded the same way under
    FSDP (filled from their own pending weights when on the meta device), else moved."""
    lora = config.training.lora
    configure_training_modes(
        model,
        **part_modes(config),
        lora_targets=lora.target_modules,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        value_head=extra_modules.get("value_head"),
        value_head_mode=config.training.freeze.value_head,
        seed=config.seed,
    )
    if pending_weights is not None:  # LoRA layers wrap some weights and add adapters
        pending_weights = adapted_sources(model, pending_weights, config.seed)
    else:
        model.to(env.device)
    for module in extra_modules.values():
        module.to(env.device)
    if config.model.activation_checkpointing:
        apply_activation_checkpointing(model)
    if config.model.compile:
        compile_blocks(model)
    strategy = env.strategy if env.is_distributed else "none"
    for name, frozen in (frozen_models or {}).items():
        if strategy == "fsdp":
            shard_model(frozen.module, [], env, param_dtype=config.distributed.param_dtype,
                        reduce_dtype=config.distributed.reduce_dtype, reshard_after_forward=True,
                        pending_weights=frozen.pending_weights)
            log.info("%s: sharded over %d ranks", name, env.world_size)
        elif frozen.pending_weights is not None:
            raise ValueError(f"{name}: a model on the meta device is filled shard by shard: only under FSDP")
        else:
            frozen.module.to(env.device)
    if strategy == "fsdp":
        dist_cfg = config.distributed
        shard_model(
            model,
            extra_modules.values(),
            env,
            param_dtype=dist_cfg.param_dtype,
            reduce_dtype=dist_cfg.reduce_dtype,
            reshard_after_forward=dist_cfg.reshard_after_forward,
            pending_weights=pending_weights,
        )
    elif pending_weights is not None:
        raise ValueError("a model on the meta device is filled shard by shard: only under FSDP")
    elif strategy == "ddp":
        D.broadcast_parameters([model, *extra_modules.values()], env)
    return strategy


@torch.no_grad()
def fill_shards(model: nn.Module, sources: dict[str, TensorSource]) -> None:
    """Each rank copies its own part of every parameter out of the full tensor read from the
    checkpoint, one tensor at a time: a rank holds its shards plus the tensor being read."""
    from torch.distributed.tensor import DTensor, Shard

    for name, param in model.named_parameters():
        source = sources[name]
        if not isinstance(param, DTensor):
            param.copy_(source.read(param.dtype))
            continue
        if tuple(param.placements) != (Shard(0),):
            raise ValueError(f"{name}: sharded as {param.placements}; only FSDP's Shard(0) is filled by rows")
        local = param.to_local()
        rows, ranks = param.shape[0], param.device_mesh.size()
        per_rank = -(-rows // ranks)  # torch.chunk's split, as FSDP2 shards dim 0
        start = min(param.device_mesh.get_local_rank() * per_rank, rows)
        stop = min(start + per_rank, rows)
        if stop - start != local.shape[0]:
            raise RuntimeError(f"{name}: rank holds {local.shape[0]} rows, expected rows {start}..{stop}")
        if stop > start:
            local.copy_(source.rows(param.dtype, start, stop).to(local.device))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Each transformer block keeps only its input for the backward pass and recomputes the rest
    (PyTorch's composable `checkpoint`: hooks on the block, so names and state dicts are unchanged)."""
    from torch.distributed._composable import checkpoint

    for block in model.blocks():
        checkpoint(block)


def compile_blocks(model: nn.Module) -> None:
    """`torch.compile` each transformer block, as torchtitan does: the blocks run the same code, so one
    compiled graph serves them all (a few seconds on the first step, again for a new batch shape, then
    shapes are treated as dynamic), and `nn.Module.compile` leaves names and state dicts unchanged.
    The embedding, the loss and the optimizer stay eager. Measured on SmolLM2-135M, 2 CPU cores,
    batch 4 x 256: a bf16 step 1.16-1.25x faster, fp32 1.02-1.07x (docs/BENCHMARKS.md)."""
    blocks = model.blocks()
    for block in blocks:
        block.compile()
    log.info("torch.compile: %d transformer blocks, compiled on the first step", len(blocks))


def shard_model(
    model: nn.Module,
    extra_modules: Iterable[nn.Module],
    env: D.DistEnv,
    *,
    param_dtype: str = "auto",
    reduce_dtype: str = "float32",
    reshard_after_forward: bool = True,
    pending_weights: dict[str, TensorSource] | None = None,
) -> None:
    """FSDP2: one shard unit per transformer block, then the root (embeddings, norm, unembedding).

    The loss drives the model through `trunk_forward` and `head_forward` rather than `forward`,
    so both are registered as FSDP forward methods: the root's parameters are gathered for them.
    Extra trainable modules (a value head) become their own units. A model on the meta device
    (`pending_weights`) is sharded as it is, then each rank allocates its shards and fills them.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype in ("auto", "float32") else DTYPES[param_dtype],
        reduce_dtype=DTYPES[reduce_dtype],
    )
    # A block's hidden states arrive in the parameter dtype already (the embedding's output, then the
    # blocks'); casting its inputs would round the rotary (cos, sin) tables to bf16 as well, and bf16
    # angles blur relative positions over long contexts (Wang et al. 2024, "When Precision Meets
    # Position"). One process keeps them fp32; so do the blocks here.
    block_policy = dataclasses.replace(policy, cast_forward_inputs=False)
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters (norm, unembedding) are used by the loss between head_forward calls,
    # outside any forward method, so they stay gathered from forward until backward.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    for method in ("trunk_forward", "head_forward"):
        register_fsdp_forward_method(model, method)
    for module in extra_modules:
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    if pending_weights is not None:
        model.to_empty(device=env.device)
        fill_shards(model, pending_weights)

