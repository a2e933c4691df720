"""Training modes per part (train / LoRA / frozen), LoRA adapters saved and loaded, and merging."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from weighted_mtp.config.schema import ValueHeadConfig
from weighted_mtp.errors import ConfigError
from weighted_mtp.models.checkpoints import TensorSource
from weighted_mtp.models.lora import (
    adapted_sources,
    configure_training_modes,
    lora_scaling,
    merge_lora_,
    merge_lora_state_dict,
)
from weighted_mtp.models.transformer import MTPTransformer, build_micro_model, micro_args
from weighted_mtp.models.value_head import build_value_head
from weighted_mtp.train.checkpoint import distinct_tensors, trainable_state_dict

VOCAB = 97
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def micro(seed: int = 0) -> nn.Module:
    return build_micro_model(VOCAB, n_future_tokens=2, seed=seed)


def configure(model: nn.Module, trunk: str, heads: str, **kwargs) -> dict[str, int]:
    return configure_training_modes(
        model,
        trunk=trunk,
        heads=heads,
        lora_targets=kwargs.pop("targets", TARGETS),
        lora_r=4,
        lora_alpha=8.0,
        lora_dropout=0.0,
        **kwargs,
    )


def trainable_names(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def randomize_adapters(module: nn.Module, seed: int = 1) -> None:
    """Non-zero B so that the adapters change the function (B starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens, return_all_heads=True).logits


TOKENS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def test_trunk_frozen_heads_trained() -> None:
    model = micro()
    configure(model, "frozen", "train")
    names = trainable_names(model)
    n_trunk = len(model.layers) - 1
    assert not any(n.startswith(f"layers.{i}.") for n in names for i in range(n_trunk))
    assert any(n.startswith(f"layers.{n_trunk}.") for n in names)
    assert any(n.startswith("extra_heads.0.") for n in names)
    assert "norm.weight" in names
    # the micro model ties its unembedding to the embeddings: trained with the heads
    assert model.tok_embeddings.weight.requires_grad


def test_everything_frozen_but_value_head() -> None:
    model = micro()
    value_head = build_value_head(ValueHeadConfig(type="mlp"), model.args.dim)
    counts = configure(model, "frozen", "frozen", value_head=value_head, value_head_mode="train")
    assert trainable_names(model) == set()
    assert counts["trunk"] == counts["heads"] == 0
    assert counts["value_head"] == sum(p.numel() for p in value_head.parameters()) > 0


def test_lora_trunk_full_heads() -> None:
    model = micro()
    configure(model, "lora", "train")
    names = trainable_names(model)
    n_trunk = len(model.layers) - 1
    trunk_names = {n for n in names if any(n.startswith(f"layers.{i}.") for i in range(n_trunk))}
    assert trunk_names and all(".lora_A." in n or ".lora_B." in n for n in trunk_names)
    # every target Linear of every trunk block got an adapter
    assert len(trunk_names) == 2 * len(TARGETS) * n_trunk
    head_names = {n for n in names if n.startswith("extra_heads.")}
    assert head_names and not any(".lora_" in n for n in head_names)
    assert model.layers[0].attention.wq.base_layer.weight.requires_grad is False


def test_lora_targets_match_whole_names_only() -> None:
    model = micro()
    configure(model, "lora", "frozen", targets=["wq"])
    adapted = {n.split(".lora_")[0] for n in trainable_names(model)}
    assert adapted == {f"layers.{i}.attention.wq" for i in range(len(model.layers) - 1)}


def test_unknown_lora_target_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="target_modules"):
        configure(micro(), "lora", "train", targets=["q_proj"])


def test_value_head_lora() -> None:
    model = micro()
    value_head = build_value_head(ValueHeadConfig(type="mlp"), model.args.dim)
    configure(model, "frozen", "frozen", value_head=value_head, value_head_mode="lora")
    names = trainable_names(value_head)
    assert names and all(".lora_" in n for n in names)


def test_adapters_start_as_identity_and_merge_exactly(tmp_path: Path) -> None:
    base = logits(micro(), TOKENS)
    model = micro()
    configure(model, "lora", "lora")
    assert torch.allclose(logits(model, TOKENS), base, atol=1e-6)  # B = 0
    randomize_adapters(model)
    adapted = logits(model, TOKENS)
    assert not torch.allclose(adapted, base, atol=1e-3)

    # state-dict merge: a plain model of the original class reproduces the adapted function
    merged_state = merge_lora_state_dict(model.state_dict(), lora_scaling(4, 8.0))
    assert not any(".lora_" in k or ".base_layer." in k for k in merged_state)
    plain = micro(seed=5)
    plain.load_state_dict(merged_state)
    assert torch.allclose(logits(plain, TOKENS), adapted, atol=1e-5)

    # peft's own merge, in place, agrees
    merge_lora_(model)
    assert not any(".lora_" in name for name, _ in model.named_parameters())
    assert isinstance(model.layers[0].attention.wq, nn.Linear)
    assert torch.allclose(logits(model, TOKENS), adapted, atol=1e-5)


def test_adapter_checkpoint_round_trip(tmp_path: Path) -> None:
    model = micro()
    configure(model, "lora", "train")
    randomize_adapters(model)
    expected = logits(model, TOKENS)
    state = trainable_state_dict(model)
    assert any(".lora_A." in k for k in state)
    assert not any(k.startswith("layers.0.") and ".base_layer." in k for k in state)  # frozen base not saved
    save_file(distinct_tensors(state), tmp_path / "adapter.safetensors")

    fresh = micro()  # the same base weights, new random adapters
    configure(fresh, "lora", "train")
    assert not torch.allclose(logits(fresh, TOKENS), expected, atol=1e-3)
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "adapter.safetensors"), strict=False)
    assert not unexpected
    frozen = {name for name, p in fresh.named_parameters() if not p.requires_grad}
    assert set(missing) == frozen  # only frozen base weights come from the base model
    assert torch.allclose(logits(fresh, TOKENS), expected, atol=1e-6)


def test_adapters_start_from_their_names_whole_or_filled_on_the_meta_device() -> None:
    """A model adapted whole and one adapted on the meta device, then filled from the checkpoint's
    tensors and the adapters' sources (what each rank of a sharded start-up reads), are the same."""
    whole = MTPTransformer(dataclasses.replace(micro_args(VOCAB, 2), tie_embeddings=False))  # as sharded start-ups
    whole.init_weights(3)
    checkpoint = {name: TensorSource.in_memory(t.clone()) for name, t in whole.state_dict().items()}
    configure(whole, "lora", "lora", seed=11)
    with torch.device("meta"):
        skeleton = MTPTransformer(whole.args)
    configure(skeleton, "lora", "lora", seed=11)
    sources = adapted_sources(skeleton, checkpoint, seed=11)
    assert sorted(sources) == sorted(name for name, _ in whole.named_parameters())
    skeleton.to_empty(device="cpu")
    with torch.no_grad():
        for name, param in skeleton.named_parameters():
            param.copy_(sources[name].read(param.dtype))
    filled = dict(skeleton.named_parameters())
    for name, param in whole.named_parameters():
        assert torch.equal(param, filled[name]), name
    adapters = {name: p for name, p in whole.named_parameters() if ".lora_A." in name}
    assert len(adapters) == 7 * (len(whole.layers) + len(whole.extra_heads))
    for name, a in adapters.items():  # peft's range, +-1/sqrt(in_features), and not all alike
        bound = 1 / a.shape[1] ** 0.5
        assert 0.5 * bound < a.abs().max() <= bound, name
        assert torch.equal(dict(whole.named_parameters())[name.replace("lora_A", "lora_B")], torch.zeros_like(
            dict(whole.named_parameters())[name.replace("lora_A", "lora_B")]))
    firsts = [a.flatten()[:8] for a in adapters.values() if a.shape == next(iter(adapters.values())).shape]
    assert len({tuple(x.tolist()) for x in firsts}) == len(firsts)  # each name its own draw
    other = micro(seed=3)
    configure(other, "lora", "lora", seed=12)  # another seed, other draws
    assert not torch.equal(next(iter(adapters.values())), dict(other.named_parameters())[next(iter(adapters))])


@pytest.mark.parametrize("tie", [False, True])
def test_a_frozen_unembedding_leaves_training_to_the_head_blocks(tie) -> None:
    """Medusa-style: trunk frozen, heads trained, unembedding frozen: only the head blocks train, and a
    tied embedding stays frozen with the unembedding it is."""
    model = MTPTransformer(dataclasses.replace(micro_args(VOCAB, 3), tie_embeddings=tie))
    configure(model, "frozen", "train", unembedding="frozen")
    trained = trainable_names(model)
    assert trained and all(name.startswith(("layers.3.", "extra_heads.")) for name in trained), sorted(trained)
    assert len(trained) == 3 * len(list(model.extra_heads[0].parameters()))
    configure(model := MTPTransformer(dataclasses.replace(micro_args(VOCAB, 3), tie_embeddings=tie)),
              "train", "train", unembedding="frozen")
    assert model.output.weight.requires_grad == tie  # a tied unembedding is the embedding: it trains with the trunk
    assert "norm.weight" not in trainable_names(model)
