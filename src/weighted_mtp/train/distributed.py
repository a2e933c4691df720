"""Process groups, FSDP2 / data-parallel wrapping and the few collectives the trainer needs.

Launch with `torchrun`; a single process needs no launcher. torchrun stops every worker as soon as
one of them dies (and exits non-zero); the collective timeout (`distributed.timeout_s`) covers
launchers that do not, so a dead rank never leaves the others waiting forever.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from weighted_mtp.errors import ConfigError
from weighted_mtp.models.loading import resolve_device

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(
    *, device: str = "auto", backend: str = "auto", strategy: str = "none", timeout_s: int = 600
) -> DistEnv:
    """Join the process group torchrun describes in the environment (or run alone without one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = resolve_device(device, local_rank)
    if world_size == 1:
        return DistEnv(device=torch_device, strategy="none" if strategy == "none" else strategy)
    if strategy == "none":
        raise ConfigError(
            f"distributed.strategy: launched with {world_size} processes but the strategy is 'none' "
            "(set distributed.strategy=fsdp or ddp)"
        )
    if backend == "auto":
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
        # A stuck NCCL collective then raises after the timeout instead of hanging the job.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    log.info("rank %d/%d on %s (%s, %s)", rank, world_size, torch_device, backend, strategy)
    return DistEnv(
        rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device, strategy=strategy
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv, timeout_s: float | None = None) -> None:
    """Wait for every rank; after `timeout_s` (default: the process group's) raise rather than hang.

    On gloo, a monitored barrier names the ranks that never arrived.
    """
    if not env.is_distributed:
        return
    if dist.get_backend() == "gloo":
        timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        dist.monitored_barrier(timeout=timeout)
    else:
        dist.barrier(device_ids=[env.local_rank] if env.device.type == "cuda" else None)


def all_reduce_sum(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    if not env.is_distributed or not values:
        return dict(values)
    keys = sorted(values)
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return dict(zip(keys, buf.tolist(), strict=True))


def all_reduce_mean(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Every rank must pass the same keys (they are sorted, so the order does not matter)."""
    summed = all_reduce_sum(values, env)
    return {k: v / env.world_size for k, v in summed.items()}


def all_reduce_max(value: float, env: DistEnv) -> float:
    if not env.is_distributed:
        return value
    buf = torch.tensor([value], dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return float(buf.item())


def broadcast_object(obj: object, env: DistEnv) -> object:
    if not env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_device(env: DistEnv) -> torch.device:
    return env.device if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- wrapping


def broadcast_parameters(modules: Iterable[nn.Module], env: DistEnv) -> None:
    """Data-parallel replicas start from rank 0's weights (random LoRA and value-head inits included)."""
    if not env.is_distributed:
        return
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def all_reduce_gradients(params: Iterable[nn.Parameter], env: DistEnv, bucket_bytes: int = 32 << 20) -> None:
    """Average gradients across replicas, a bucket of flattened gradients per collective.

    Called once per optimizer step, after all accumulation micro-batches (DDP would instead
    synchronise inside every backward; the head-by-head loss calls backward several times).
    """
    if not env.is_distributed:
        return
    grads = []
    for param in params:
        if not param.requires_grad:
            continue
        if param.grad is None:  # unused on this rank this step: still take part in the sum
            param.grad = torch.zeros_like(param)
        grads.append(param.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        bucket.append(grad)
        size += grad.numel() * grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket, env)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket, env)


def _reduce_bucket(bucket: list[torch.Tensor], env: DistEnv) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for grad in bucket:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for tensors in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(env.world_size)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
