"""The MTP transformer: KV-cache decoding equals a full forward, masks, heads, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch

from weighted_mtp.models.checkpoints import add_heads
from weighted_mtp.models.transformer import (
    Linear,
    ModelArgs,
    MTPTransformer,
    attention_bias,
    build_micro_model,
    few_query_attention,
)


def small_model(n_future_tokens: int = 3, seed: int = 0, **overrides) -> MTPTransformer:
    args = {
        "dim": 48,
        "n_layers": 5,
        "n_heads": 6,
        "n_kv_heads": 2,
        "vocab_size": 97,
        "ffn_hidden_dim": 80,
        "rope_theta": 500.0,
        "n_future_tokens": n_future_tokens,
    }
    args.update(overrides)
    model = MTPTransformer(ModelArgs(**args))
    model.init_weights(seed, std=0.1)
    return model.eval()


def test_layout_follows_meta_key_names() -> None:
    model = small_model(n_future_tokens=3)
    assert len(model.layers) == 3 and len(model.extra_heads) == 2
    keys = set(model.state_dict())
    for key in (
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "layers.2.feed_forward.w3.weight",
        "layers.1.attention_norm.weight",
        "layers.1.ffn_norm.weight",
        "extra_heads.1.attention.wo.weight",
        "norm.weight",
        "output.weight",
    ):
        assert key in keys
    assert model.heads()[0] is model.layers[-1]


@torch.no_grad()
def test_kv_cache_incremental_decoding_equals_full_forward_for_every_head() -> None:
    torch.manual_seed(0)
    model = small_model()
    tokens = torch.randint(0, 97, (2, 13))
    full = model(tokens, return_all_heads=True, return_trunk=True)
    cache = model.new_cache(2, 16)
    # a prompt chunk, then single tokens, then a two-token chunk (speculative verification shape)
    steps = [(0, 6), *[(t, t + 1) for t in range(6, 11)], (11, 13)]
    for start, end in steps:
        out = model(
            tokens[:, start:end], start_pos=start, cache=cache, return_all_heads=True, return_trunk=True
        )
        torch.testing.assert_close(out.logits, full.logits[:, start:end], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.trunk_hidden, full.trunk_hidden[:, start:end], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_kv_cache_rollback_by_rewriting_earlier_positions() -> None:
    model = small_model()
    tokens = torch.randint(0, 97, (1, 10))
    other = tokens.clone()
    other[:, 7:] = (other[:, 7:] + 1) % 97
    cache = model.new_cache(1, 10)
    model(other, cache=cache, return_all_heads=True)  # fill with a continuation that gets rejected
    out = model(tokens[:, 7:], start_pos=7, cache=cache, return_all_heads=True)
    full = model(tokens, return_all_heads=True)
    torch.testing.assert_close(out.logits, full.logits[:, 7:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padding_with_key_mask_equals_unpadded_sequence() -> None:
    model = small_model()
    tokens = torch.randint(0, 97, (1, 9))
    pad = 4
    padded = torch.cat([torch.zeros(1, pad, dtype=torch.long), tokens], dim=1)
    batch = torch.cat([padded, torch.randint(0, 97, (1, 9 + pad))])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    out = model(batch, attention_mask=mask, return_all_heads=True)
    alone = model(tokens, return_all_heads=True)
    # RoPE is relative, so shifting every position by `pad` leaves the real tokens' logits unchanged
    torch.testing.assert_close(out.logits[0, pad:], alone.logits[0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(out.logits).all()
    other_alone = model(batch[1:], return_all_heads=True)
    torch.testing.assert_close(out.logits[1], other_alone.logits[0], atol=1e-5, rtol=1e-5)

    # the same left-padded row decoded incrementally through the cache
    cache = model.new_cache(1, 13)
    first = model(padded[:, :10], cache=cache, attention_mask=mask[:1, :10], return_all_heads=True)
    torch.testing.assert_close(first.logits[0, pad:], alone.logits[0, :6], atol=1e-4, rtol=1e-4)
    for t in range(10, 13):
        step = model(
            padded[:, t : t + 1],
            start_pos=t,
            cache=cache,
            attention_mask=mask[:1, : t + 1],
            return_all_heads=True,
        )
        torch.testing.assert_close(step.logits[0, 0], alone.logits[0, t - pad], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_right_padding_needs_no_mask_and_gives_the_same_logits() -> None:
    model = small_model()
    tokens = torch.randint(0, 97, (2, 10))
    mask = torch.ones_like(tokens)
    mask[0, 6:] = 0
    assert attention_bias(0, 10, mask, tokens.device) is None  # the fused causal path
    assert attention_bias(0, 10, mask.flip(1), tokens.device) is not None  # left padding keeps its mask
    out = model(tokens, attention_mask=mask, return_all_heads=True).logits
    alone = model(tokens[:1, :6], return_all_heads=True).logits
    torch.testing.assert_close(out[0, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_head_forward_matches_forward_and_heads_differ() -> None:
    model = small_model()
    tokens = torch.randint(0, 97, (2, 7))
    out = model(tokens, return_all_heads=True)
    h_trunk = model.trunk_forward(tokens)
    for k in range(3):
        torch.testing.assert_close(model.logits(model.head_forward(k, h_trunk)), out.logits[:, :, k])
    assert not torch.allclose(out.logits[:, :, 0], out.logits[:, :, 1])
    assert model(tokens).logits.shape == (2, 7, 1, 97)


def test_add_heads_copies_the_last_block_and_tied_embeddings() -> None:
    model = build_micro_model(vocab_size=101, n_future_tokens=1, seed=3)
    assert model.output.weight is model.tok_embeddings.weight
    model = add_heads(model, 3, init="copy")
    assert model.args.n_layers == 6 and len(model.extra_heads) == 2 and len(model.layers) == 4
    for block in model.extra_heads:
        for new, old in zip(block.parameters(), model.layers[-1].parameters()):
            assert torch.equal(new, old) and new is not old
    out = model(torch.randint(0, 101, (1, 5)), return_all_heads=True).logits
    torch.testing.assert_close(out[:, :, 1], out[:, :, 0])
    model = add_heads(model, 4, init="random", seed=1)
    assert not torch.equal(model.extra_heads[2].attention.wq.weight, model.layers[-1].attention.wq.weight)
    model = add_heads(model, 2)
    assert len(model.extra_heads) == 1 and model.args.n_layers == 5


def test_micro_model_is_deterministic_for_a_seed() -> None:
    a, b = build_micro_model(50, 2, seed=7), build_micro_model(50, 2, seed=7)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(
        build_micro_model(50, 2, seed=8).layers[0].attention.wq.weight, a.layers[0].attention.wq.weight
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_forward_is_close(dtype) -> None:
    model = small_model()
    tokens = torch.randint(0, 97, (2, 6))
    ref = model(tokens, return_all_heads=True).logits
    low = model.to(dtype)(tokens, return_all_heads=True).logits
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


def naive_attention(q, k, v, allowed):
    """Loop over heads in float64: head h reads key/value head h // (H / KV)."""
    batch, n_heads, length, head_dim = q.shape
    groups = n_heads // k.shape[1]
    out = torch.zeros(batch, n_heads, length, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(n_heads):
            kk, vv = k[b, h // groups].double(), v[b, h // groups].double()
            scores = q[b, h].double() @ kk.T / head_dim**0.5
            scores = scores.masked_fill(~allowed[min(b, allowed.shape[0] - 1), 0], float("-inf"))
            out[b, h] = scores.softmax(-1) @ vv
    return out


@pytest.mark.parametrize("length", [1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_few_query_attention_equals_a_loop_over_heads(length, masked) -> None:
    torch.manual_seed(0)
    start, batch = 9, 3
    q = torch.randn(batch, 6, length, 8, dtype=torch.float64)
    k, v = torch.randn(2, batch, 2, start + length, 8, dtype=torch.float64)
    mask = torch.ones(batch, start + length, dtype=torch.long)
    mask[0, :4] = 0  # a left-padded row
    bias = attention_bias(start, length, mask if masked else None, q.device)
    allowed = bias if bias is not None else torch.ones(1, 1, length, start + length, dtype=torch.bool)
    expected = naive_attention(q, k, v, allowed)
    torch.testing.assert_close(few_query_attention(q, k, v, bias).double(), expected, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_bf16_decoding_through_the_cache_stays_close_to_the_float64_forward() -> None:
    """bf16 decoding on CPU takes the few-query attention path; it must track the exact forward."""
    torch.manual_seed(0)
    model = small_model()
    tokens = torch.randint(0, 97, (2, 12))
    exact = model.double()(tokens, return_all_heads=True).logits
    low = model.to(torch.bfloat16)
    cache = low.new_cache(2, 12)
    steps = [low(tokens[:, :8], cache=cache, return_all_heads=True).logits]
    steps += [low(tokens[:, t : t + 1], start_pos=t, cache=cache, return_all_heads=True).logits for t in range(8, 10)]
    steps.append(low(tokens[:, 10:], start_pos=10, cache=cache, return_all_heads=True).logits)
    decoded = torch.cat(steps, dim=1).double()
    assert (decoded - exact).abs().max() < 0.05 * exact.abs().max()


@torch.no_grad()
def test_last_position_only_unembeds_just_the_last_position() -> None:
    model = small_model()
    tokens = torch.randint(0, 97, (2, 7))
    full = model(tokens, return_all_heads=True).logits
    last = model(tokens, return_all_heads=True, last_position_only=True).logits
    assert last.shape == (2, 1, 3, 97)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 64), (64,), (2, 1, 64), (1, 3, 64)])
def test_the_one_row_bf16_projection_equals_nn_linear(shape):
    layer = Linear(64, 96, bias=False).bfloat16()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        got, want = layer(x), torch.nn.functional.linear(x, layer.weight)
    assert got.shape == want.shape and torch.equal(got, want)
    out = layer(x)  # with gradients: nn.Linear's path
    assert out.requires_grad and torch.equal(out.detach(), want)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN's prepacked weights")
def test_a_few_bf16_rows_through_the_prepacked_weight_match_nn_linear_bitwise():
    from torch import nn

    from weighted_mtp.models.transformer import PACKED_ROWS, Linear

    torch.manual_seed(0)
    layer = Linear(96, 200, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        for rows in (1, 3, 8, PACKED_ROWS):
            x = torch.randn(1, rows, 96).to(torch.bfloat16)
            assert torch.equal(layer(x), nn.Linear.forward(layer, x)), rows
        first = layer.packed_weight()
        layer.weight.mul_(2)  # an in-place update: the packed copy is remade
        x = torch.randn(2, 2, 96).to(torch.bfloat16)
        assert layer.packed_weight() is not first
        assert torch.equal(layer(x), nn.Linear.forward(layer, x))
        layer.weight = nn.Parameter(torch.randn(200, 96).to(torch.bfloat16))  # another tensor
        assert torch.equal(layer(x), nn.Linear.forward(layer, x))
    x = torch.randn(1, 1, 96).to(torch.bfloat16)
    assert layer(x).grad_fn is not None  # with gradients: nn.Linear's path, differentiable
    copied = copy.deepcopy(layer)  # the packed weight stays behind and is remade
    with torch.no_grad():
        assert torch.equal(copied(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rope_is_the_written_out_rotation_of_each_pair_bitwise_and_so_is_its_gradient(dtype):
    """The complex-number form rotates each interleaved pair (x_2i, x_2i+1) by its angle exactly as
    the written-out formula does (in fp32, then back to x's dtype), on non-contiguous q-like inputs."""
    from weighted_mtp.models.transformer import apply_rope

    generator = torch.Generator().manual_seed(0)
    angles = torch.randn(7, 16, generator=generator) * 50
    cos, sin = angles.cos(), angles.sin()
    x = (torch.randn(3, 7, 5, 32, generator=generator) * 4).to(dtype).transpose(1, 2)  # [B, H, T, Dh] as q is
    grad_out = torch.randn(3, 5, 7, 32, generator=generator).to(dtype)

    def written_out(x):
        even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)

    results = []
    for rotate in (lambda x: apply_rope(x, torch.stack((cos, sin), dim=-1)), written_out):
        leaf = x.detach().clone().requires_grad_(True)
        out = rotate(leaf)
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    (out, grad), (expected_out, expected_grad) = results
    assert out.dtype == dtype and out.is_contiguous() and torch.equal(out, expected_out)
    assert torch.equal(grad, expected_grad)
    rotations = torch.stack((cos, sin), dim=-1).bfloat16()  # a caller's bf16 tables are cast to fp32
    assert torch.equal(apply_rope(x, rotations), apply_rope(x, rotations.float()))


def test_compiled_rope_takes_the_written_out_form_bitwise_the_same(recwarn):
    """Compiled, apply_rope writes the rotation out (fusable); same bits as eager's complex product,
    and no complex operator reaches the compiler (it would warn that it cannot generate code)."""
    from weighted_mtp.models.transformer import apply_rope

    generator = torch.Generator().manual_seed(1)
    angles = torch.randn(6, 16, generator=generator) * 50
    rotations = torch.stack((angles.cos(), angles.sin()), dim=-1)
    compiled = torch.compile(apply_rope, fullgraph=True, dynamic=False)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 6, 3, 32, generator=generator) * 4).to(dtype).transpose(1, 2)
        assert torch.equal(compiled(x, rotations), apply_rope(x, rotations))
    assert not [w for w in recwarn if "complex" in str(w.message)]
