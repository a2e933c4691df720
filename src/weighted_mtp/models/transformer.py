"""A LLaMA-family multi-token-prediction transformer in Meta's layout (Gloeckle et al. 2024).

`n_future_tokens = n` heads share a trunk. With `n_layers` blocks in all, `layers` holds the
`n_layers - n + 1` blocks of the trunk followed by head 1 (`layers[-1]`), and `extra_heads` holds the
`n - 1` other head blocks. Every head block reads the trunk's output; all heads share the final norm
and the unembedding, and head k at position t predicts token t + k.

Rotary embeddings use Meta's interleaved pair layout (dimensions 2i and 2i+1 rotate together), which is
also what GGUF stores; Hugging Face checkpoints permute wq/wk to a half-split layout, which the HF
loader undoes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelArgs:
    dim: int
    n_layers: int  # all blocks: trunk + head 1 + the n - 1 extra heads
    n_heads: int
    n_kv_heads: int | None
    vocab_size: int
    ffn_hidden_dim: int  # SwiGLU hidden size (explicit; loaders compute it from their format)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    n_future_tokens: int = 1
    tie_embeddings: bool = False
    # LLaMA 3.1-style frequency scaling ("llama3" rope_scaling); None leaves the frequencies as they are.
    rope_scaling: dict[str, float] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if not 1 <= self.n_future_tokens <= self.n_layers:
            raise ValueError(
                f"n_future_tokens {self.n_future_tokens} must be in [1, n_layers={self.n_layers}]"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model argument(s): {', '.join(unknown)}")
        return cls(**data)


class MTPOutput(NamedTuple):
    logits: Tensor  # [B, T, n_used, V] float32
    trunk_hidden: Tensor | None  # [B, T, D]


# ----------------------------------------------------------------------------- building blocks


# Up to this many rows a bf16 projection on the CPU reads a prepacked weight (see `Linear`).
PACKED_ROWS = 16


class Linear(nn.Linear):
    """A bias-free projection that, for a few bf16 rows on the CPU without gradients (decoding steps,
    speculative verification), multiplies by a copy of the weight prepacked once in oneDNN's blocked
    layout, as PyTorch's compiler does for frozen CPU models: the plain path reorders the weight on
    every call, and the packed one runs 1.5-2.6x faster per product (1.1-1.4x faster than `torch.mv`
    for one row), with bitwise the same result for up to `PACKED_ROWS` rows. The copy is remade when
    the weight changes (another tensor, or an in-place update). Anything else, and anything compiled
    (the compiler packs weights itself), is `nn.Linear`."""

    _packed: tuple[tuple[int, int], Tensor] | None = None  # ((data pointer, version), packed weight)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if (not torch.compiler.is_compiling() and x.shape[:-1].numel() <= PACKED_ROWS
                and weight.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and weight.device.type == "cpu"
                and self.bias is None and not torch.is_grad_enabled() and torch.backends.mkldnn.is_available()):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), None, "none", [], "")
        return super().forward(x)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight out (an opaque oneDNN tensor): remade on use."""
        state = dict(self.__dict__)
        state.pop("_packed", None)
        return state

    def packed_weight(self) -> Tensor:
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1))
        return self._packed[1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 even for bf16 activations, then scale in the activation dtype (as LLaMA does).
        upcast = x.float()  # one copy, read twice (for bf16 activations each .float() is a cast)
        normed = upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, float] | None) -> Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    if not scaling:
        return inv_freq
    # LLaMA 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    original = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = ((original / wavelen) - low) / (high - low)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    middle = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(middle, interpolated, scaled)


def rope_rotations(args: ModelArgs, start_pos: int | Tensor, length: int, device: torch.device) -> Tensor:
    """(cos, sin) of every rotation angle, [length, head_dim / 2, 2] fp32 (a complex number's layout,
    kept real so that no complex tensor enters a compiled block), for positions
    [start_pos, start_pos + length).

    Computed per call rather than kept as a buffer: it is tiny, never loses precision when the model is
    cast to bf16, and has no length limit.
    """
    inv_freq = rope_inverse_frequencies(args.head_dim, args.rope_theta, args.rope_scaling).to(device)
    positions = start_pos + torch.arange(length, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [B, H, T, head_dim], in fp32: each pair (2i, 2i+1) is a complex
    number multiplied by its rotation, as in Meta's reference code. Eagerly that is a third of the
    time (forward and backward) of writing out x_2i cos - x_2i+1 sin and x_2i sin + x_2i+1 cos;
    compiled, the written-out form, which the compiler fuses (it leaves complex operators unfused:
    a compiled bf16 decoding step ran 9% slower with them). Both are bitwise the same. The result
    is contiguous whatever x's strides (q and k arrive transposed). `rotations` in another dtype
    than fp32 are cast to it (the product has no bf16 complex form)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        even, odd = pairs[..., 0], pairs[..., 1]
        cos, sin = rotations[..., 0], rotations[..., 1]
        rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    else:
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * torch.view_as_complex(rotations.float()))
    return rotated.flatten(-2).type_as(x).contiguous()


class LayerKVCache:
    """Keys and values of one block, [B, n_kv_heads, max_len, head_dim]."""

    def __init__(
        self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, *, device, dtype
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, start_pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v at [start_pos, start_pos + T); the keys and values to attend to: up to the last
        written position, or (start_pos a tensor: compiled decoding) the whole buffer, every shape fixed."""
        if isinstance(start_pos, Tensor):
            positions = start_pos + torch.arange(k.shape[2], device=k.device)
            self.k.index_copy_(2, positions, k)
            self.v.index_copy_(2, positions, v)
            return self.k, self.v
        end = start_pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions; writing up to {end}")
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One K/V buffer per block: `layers[i]` (trunk and head 1) and `extra_heads[j]`.

    A forward call writes positions [start_pos, start_pos + T) and attends to [0, start_pos + T), so
    rolling back (e.g. rejected speculative tokens) is calling again with an earlier start_pos. With
    start_pos a 0-d tensor every shape stays the same from step to step (what a compiled decoding step
    needs): each block attends over its whole buffer, positions past the query masked out.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, *, device, dtype) -> None:
        n_trunk_blocks = args.n_layers - args.n_future_tokens + 1

        def make() -> LayerKVCache:
            return LayerKVCache(
                batch_size, args.n_kv_heads, max_len, args.head_dim, device=device, dtype=dtype
            )

        self.batch_size = batch_size
        self.max_len = max_len
        self.layers = [make() for _ in range(n_trunk_blocks)]
        self.extra_heads = [make() for _ in range(args.n_future_tokens - 1)]

    def head(self, k: int) -> LayerKVCache:
        """The cache of head k (0-based)."""
        return self.layers[-1] if k == 0 else self.extra_heads[k - 1]


def is_right_padding(attention_mask: Tensor) -> bool:
    """Every row is ones then zeros (training batches): causal attention alone keeps real tokens off
    the padding, so no mask is needed and SDPA can use its fused causal kernels."""
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def attention_bias(
    start_pos: int | Tensor, length: int, attention_mask: Tensor | None, device: torch.device
) -> Tensor | None:
    """Boolean mask [B or 1, 1, T, S] (True = attend) for queries at [start_pos, start_pos + T).

    None means plain causal attention starting at 0, which SDPA handles itself (`is_causal`). Every
    query may attend to its own position, so a left-padding query has one key and yields finite values.
    A tensor `start_pos` (compiled decoding over a whole cache) needs `attention_mask` covering the
    cache: S is its length.
    """
    if isinstance(start_pos, Tensor):
        if attention_mask is None:
            raise ValueError("a tensor start_pos needs an attention_mask as long as the cache")
        query_pos = start_pos + torch.arange(length, device=device)[:, None]
        key_pos = torch.arange(attention_mask.shape[1], device=device)[None, :]
        keys = attention_mask[:, None, None, :].bool()
        return ((key_pos <= query_pos) & keys) | (key_pos == query_pos)
    total = start_pos + length
    if attention_mask is not None and start_pos == 0 and is_right_padding(attention_mask[:, :total]):
        attention_mask = None
    if attention_mask is None and (start_pos == 0 or length == 1):
        return None
    query_pos = torch.arange(start_pos, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = key_pos <= query_pos  # [T, S]
    if attention_mask is None:
        return allowed[None, None]
    if attention_mask.shape[1] < total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions; need {total}")
    keys = attention_mask[:, None, None, :total].bool()  # [B, 1, 1, S]
    return (allowed & keys) | (key_pos == query_pos)


# Decoding steps and speculative verification ask a cache for at most this many queries at a time.
FEW_QUERIES = 16


def few_query_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """Attention of a few queries over a cache, computed in float32, grouped-query aware.

    On CPU, SDPA's bf16/fp16 kernel spends about 4x longer on one decoding query over a few hundred
    cached keys than these three float32 products (including the casts), and rounds no less
    accurately. q [B, H, T, Dh]; k, v [B, KV, S, Dh]; bias as from `attention_bias` (None: query i at
    position S - T + i sees keys up to its own position).
    """
    batch, n_heads, length, head_dim = q.shape
    n_kv, keys = k.shape[1], k.shape[2]
    groups = n_heads // n_kv
    # query head h reads key/value head h // groups, as SDPA's enable_gqa does
    scores = q.float().view(batch, n_kv, groups * length, head_dim) @ k.float().transpose(-1, -2)
    scores = (scores * head_dim**-0.5).view(batch, n_kv, groups, length, keys)
    if bias is None:
        query_pos = torch.arange(keys - length, keys, device=q.device)[:, None]
        bias = (torch.arange(keys, device=q.device)[None, :] <= query_pos)[None, None]
    scores = scores.masked_fill(~bias[:, :, None], float("-inf"))
    weights = scores.softmax(dim=-1).view(batch, n_kv, groups * length, keys)
    out = (weights @ v.float()).view(batch, n_heads, length, head_dim)
    return out.to(q.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        rotations: Tensor,
        start_pos: int | Tensor,
        cache: LayerKVCache | None,
        bias: Tensor | None,
    ) -> Tensor:
        batch, length, _ = x.shape
        q = self.wq(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rotations), apply_rope(k, rotations)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        repeats = self.n_heads // self.n_kv_heads
        if cache is not None and q.device.type == "cpu" and q.dtype != torch.float32 and length <= FEW_QUERIES:
            out = few_query_attention(q, k, v, bias)
        elif bias is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=length > 1, enable_gqa=repeats > 1)
        else:
            # CUDA's memory-efficient kernels take a mask but not GQA: expand the K/V heads there
            # (the CPU kernel takes both, and copying the whole cache each call would cost more).
            expand = repeats > 1 and q.device.type != "cpu"
            if expand:
                k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=repeats > 1 and not expand)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm attention + SwiGLU; the unit of FSDP wrapping and activation checkpointing
    (both applied from outside, by `train/parallelize.py`)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: Tensor,
        rotations: Tensor,
        start_pos: int | Tensor = 0,
        cache: LayerKVCache | None = None,
        bias: Tensor | None = None,
    ) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rotations, start_pos, cache, bias)
        return h + self.feed_forward(self.ffn_norm(h))


# ----------------------------------------------------------------------------- the model


class MTPTransformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.n_future_tokens = args.n_future_tokens
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        n_trunk_blocks = args.n_layers - args.n_future_tokens + 1
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(n_trunk_blocks))
        self.extra_heads = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_future_tokens - 1))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    # -- structure

    def heads(self) -> list[TransformerBlock]:
        return [self.layers[-1], *self.extra_heads]

    def blocks(self) -> list[TransformerBlock]:
        """Every block, trunk first: the modules to wrap with FSDP or to checkpoint."""
        return [*self.layers, *self.extra_heads]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Random init, deterministic for a seed: normal(0, std) for matrices, ones for norms."""
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
                    param.copy_(values.to(param.dtype))

    def new_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        reference = self.tok_embeddings.weight
        return KVCache(
            self.args, batch_size, max_len, device=device or reference.device, dtype=dtype or reference.dtype
        )

    # -- forward

    def trunk_forward(
        self,
        tokens: Tensor,
        *,
        start_pos: int | Tensor = 0,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Embeddings and the trunk blocks (`layers[:-1]`): [B, T] -> [B, T, D]."""
        h = self.tok_embeddings(tokens)
        rotations = rope_rotations(self.args, start_pos, tokens.shape[1], h.device)
        bias = attention_bias(start_pos, tokens.shape[1], attention_mask, h.device)
        for i, block in enumerate(self.layers[:-1]):
            layer_cache = cache.layers[i] if cache is not None else None
            h = block(h, rotations, start_pos, layer_cache, bias)
        return h

    def head_forward(
        self,
        k: int,
        h_trunk: Tensor,
        *,
        start_pos: int | Tensor = 0,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Head k's block (0-based) on the trunk output, before the final norm: [B, T, D]."""
        rotations = rope_rotations(self.args, start_pos, h_trunk.shape[1], h_trunk.device)
        bias = attention_bias(start_pos, h_trunk.shape[1], attention_mask, h_trunk.device)
        head_cache = cache.head(k) if cache is not None else None
        return self.heads()[k](h_trunk, rotations, start_pos, head_cache, bias)

    def logits(self, hidden: Tensor) -> Tensor:
        """Shared final norm and unembedding, in float32."""
        return self.output(self.norm(hidden)).float()

    def forward(
        self,
        tokens: Tensor,
        *,
        start_pos: int | Tensor = 0,
        cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
        return_all_heads: bool = False,
        return_trunk: bool = False,
        last_position_only: bool = False,
    ) -> MTPOutput:
        """Logits [B, T, heads, V] (heads: 1 unless `return_all_heads`).

        `last_position_only` unembeds only the last position (T becomes 1): what a generation prefill
        needs, without [B, T, V] float32 logits for the whole prompt.
        """
        h_trunk = self.trunk_forward(tokens, start_pos=start_pos, cache=cache, attention_mask=attention_mask)
        n_used = self.n_future_tokens if return_all_heads else 1
        per_head = []
        for k in range(n_used):
            hidden = self.head_forward(k, h_trunk, start_pos=start_pos, cache=cache, attention_mask=attention_mask)
            per_head.append(self.logits(hidden[:, -1:] if last_position_only else hidden))
        return MTPOutput(torch.stack(per_head, dim=2), h_trunk if return_trunk else None)


# ----------------------------------------------------------------------------- small models


def micro_args(vocab_size: int, n_future_tokens: int = 1, *, trunk_layers: int = 3) -> ModelArgs:
    """A few narrow blocks for seconds-long runs: `trunk_layers` shared blocks, then the heads."""
    return ModelArgs(
        dim=64,
        n_layers=trunk_layers + n_future_tokens,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab_size,
        ffn_hidden_dim=192,
        rope_theta=100000.0,
        max_seq_len=2048,
        n_future_tokens=n_future_tokens,
        tie_embeddings=True,
    )


def build_micro_model(vocab_size: int, n_future_tokens: int = 1, *, seed: int = 0) -> MTPTransformer:
    model = MTPTransformer(micro_args(vocab_size, n_future_tokens))
    model.init_weights(seed)
    return model
