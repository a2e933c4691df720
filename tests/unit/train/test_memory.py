"""The per-rank memory estimate: its parameter counts are a real model's, and its parts scale as they
should with ranks, LoRA and activation checkpointing."""

from __future__ import annotations

import pytest

from weighted_mtp.models.lora import configure_training_modes
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer
from weighted_mtp.train.memory import GIB, estimate_memory, parameter_counts

TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def small_args(tie: bool) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden_dim=96,
                     n_future_tokens=3, tie_embeddings=tie)  # fmt: skip


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize(("trunk", "heads", "unembedding"), [
    ("train", "train", "as_heads"), ("lora", "lora", "as_heads"), ("frozen", "lora", "as_heads"),
    ("lora", "frozen", "as_heads"), ("frozen", "train", "as_heads"), ("frozen", "train", "frozen"),
    ("train", "train", "frozen"), ("lora", "train", "frozen"),
])  # fmt: skip
def test_parameter_counts_are_the_models(tie, trunk, heads, unembedding):
    args = small_args(tie)
    model = MTPTransformer(args)
    configure_training_modes(model, trunk=trunk, heads=heads, lora_targets=TARGETS, lora_r=4, lora_alpha=8,
                             lora_dropout=0.0, unembedding=unembedding)  # fmt: skip
    total, trainable = parameter_counts(args, trunk=trunk, heads=heads, lora_r=4, lora_targets=TARGETS,
                                        unembedding=unembedding)  # fmt: skip
    assert total == sum(p.numel() for p in model.parameters())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def meta_7b(n_future: int = 4) -> ModelArgs:
    return ModelArgs(dim=4096, n_layers=32 + n_future - 1, n_heads=32, n_kv_heads=32, vocab_size=32000,
                     ffn_hidden_dim=11008, n_future_tokens=n_future)  # fmt: skip


def estimate(**overrides):
    settings = dict(world_size=1, strategy="fsdp", weight_bytes=4, compute_bytes=2, batch_size=1, seq_len=4096,
                    trunk="train", heads="train", lora_r=16, lora_targets=TARGETS, activation_checkpointing=False,
                    loss_chunk_size=1024)  # fmt: skip
    return estimate_memory(meta_7b(), **{**settings, **overrides})


def test_meta_7b_in_fp32_with_adamw_does_not_fit_one_gpu_and_sharding_divides_it():
    one = estimate()
    assert 27 < one.parameters < 28  # ~7.35B parameters in fp32: 29.4 GB
    assert one.optimizer == pytest.approx(2 * one.parameters, rel=1e-6)
    four = estimate(world_size=4)
    block = (4096 * 4096 * 4 + 3 * 4096 * 11008 + 2 * 4096) * 4 / GIB
    assert four.parameters == pytest.approx(one.parameters / 4 + block, rel=1e-6)
    assert four.optimizer == pytest.approx(one.optimizer / 4, rel=1e-6)
    assert estimate(world_size=4, strategy="ddp").parameters == pytest.approx(one.parameters, rel=1e-6)


def test_lora_and_checkpointing_shrink_what_they_should():
    full, lora = estimate(), estimate(trunk="lora", heads="lora")
    assert lora.parameters > full.parameters  # the adapters are added
    assert lora.optimizer < full.optimizer / 50
    checkpointed = estimate(activation_checkpointing=True)
    assert checkpointed.activations < full.activations / 5
    assert checkpointed.parameters == full.parameters
