"""How much memory a training run will need per rank, from the config alone: before renting GPUs,
pick full fine-tuning, LoRA or activation checkpointing, and the number of ranks.

An estimate from the model's shapes, not a measurement:

- parameters: every weight once, in the weights' dtype (float32 on CUDA and the CPU, where the trainer
  keeps fp32 weights and autocasts to the config's dtype); FSDP shards them over the ranks and gathers
  one block at a time (that block is added once);
- gradients: the trainable parameters, in the weights' dtype, sharded like them under FSDP;
- optimizer: AdamW's two moments per trainable parameter, in the weights' dtype, sharded likewise;
- activations: what a block keeps for its backward, per token about (8 d + 2 d_kv + 4 f) values in the
  compute dtype (the norms' inputs and outputs, q, k, v, the attention output, the residuals, the
  SwiGLU's three hidden vectors; SDPA keeps no s x s matrix), for every trunk block and one head (the
  memory-efficient loss runs the heads one at a time); with activation checkpointing only each
  block's input is kept, plus one block's activations while it is recomputed;
- the loss: `loss_chunk_size` rows of logits and their gradient in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from weighted_mtp.models.transformer import ModelArgs

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """GiB per rank."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    loss: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.loss


def block_parameters(args: ModelArgs) -> int:
    head_dim = args.dim // args.n_heads
    attention = args.dim * head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)  # wq, wo, wk, wv
    return attention + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim


def lora_parameters(args: ModelArgs, r: int, targets: list[str]) -> int:
    """Adapter parameters of one block: r x (in + out) per targeted projection."""
    head_dim = args.dim // args.n_heads
    shapes = {
        "wq": (args.dim, args.n_heads * head_dim), "wk": (args.dim, args.n_kv_heads * head_dim),
        "wv": (args.dim, args.n_kv_heads * head_dim), "wo": (args.n_heads * head_dim, args.dim),
        "w1": (args.dim, args.ffn_hidden_dim), "w3": (args.dim, args.ffn_hidden_dim), "w2": (args.ffn_hidden_dim, args.dim),
    }  # fmt: skip
    return sum(r * (n_in + n_out) for name, (n_in, n_out) in shapes.items() if name in targets)


def parameter_counts(
    args: ModelArgs, *, trunk: str, heads: str, lora_r: int, lora_targets: list[str], unembedding: str = "as_heads"
) -> tuple[int, int]:
    """(all parameters, trainable parameters) for the parts' modes: train, lora or frozen (and the
    final norm and unembedding frozen apart, `unembedding: frozen`). A tied embedding trains when the
    trunk or the unembedding does."""
    n_trunk, n_heads = args.n_layers - args.n_future_tokens, args.n_future_tokens
    block, adapters = block_parameters(args), lora_parameters(args, lora_r, lora_targets)
    embedding = args.vocab_size * args.dim
    unembedding_size = args.dim + (0 if args.tie_embeddings else embedding)  # the final norm and output
    total = embedding + (n_trunk + n_heads) * block + unembedding_size
    total += (n_trunk * adapters if trunk == "lora" else 0) + (n_heads * adapters if heads == "lora" else 0)
    trainable = {"train": n_trunk * block, "lora": n_trunk * adapters, "frozen": 0}[trunk]
    trainable += {"train": n_heads * block, "lora": n_heads * adapters, "frozen": 0}[heads]
    unembedding_trains = heads == "train" and unembedding == "as_heads"
    trainable += unembedding_size if unembedding_trains else 0
    trainable += embedding if trunk == "train" or (args.tie_embeddings and unembedding_trains) else 0
    return total, trainable


def estimate_memory(
    args: ModelArgs,
    *,
    world_size: int,
    strategy: str,
    weight_bytes: int,
    compute_bytes: int,
    batch_size: int,
    seq_len: int,
    trunk: str,
    heads: str,
    lora_r: int,
    lora_targets: list[str],
    activation_checkpointing: bool,
    loss_chunk_size: int,
    unembedding: str = "as_heads",
) -> MemoryEstimate:
    total, trainable = parameter_counts(args, trunk=trunk, heads=heads, lora_r=lora_r, lora_targets=lora_targets,
                                        unembedding=unembedding)
    shards = world_size if strategy == "fsdp" and world_size > 1 else 1
    gathered = block_parameters(args) if shards > 1 else 0  # one block unsharded at a time
    parameters = (total / shards + gathered) * weight_bytes
    gradients = trainable / shards * weight_bytes
    optimizer = 2 * trainable / shards * weight_bytes
    tokens = batch_size * seq_len
    head_dim = args.dim // args.n_heads
    per_block = tokens * (8 * args.dim + 2 * args.n_kv_heads * head_dim + 4 * args.ffn_hidden_dim) * compute_bytes
    blocks_alive = args.n_layers - args.n_future_tokens + 1  # the trunk and one head
    if activation_checkpointing:
        activations = blocks_alive * tokens * args.dim * compute_bytes + per_block
    else:
        activations = blocks_alive * per_block
    loss = 2 * min(loss_chunk_size, tokens) * args.vocab_size * 4
    return MemoryEstimate(parameters / GIB, gradients / GIB, optimizer / GIB, activations / GIB, loss / GIB)


def reset_resident_peak() -> int:
    """Start measuring this process's resident high-water mark afresh (Linux: VmHWM, reset through
    /proc/self/clear_refs); returns the resident bytes now, or 0 where that cannot be read."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_bytes("VmRSS")
    except OSError:
        return 0


def resident_peak() -> int:
    """The resident high-water mark since the last `reset_resident_peak`, in bytes (0: unknown)."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return 0


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")
