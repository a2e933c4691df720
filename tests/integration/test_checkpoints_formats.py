"""Checkpoint formats: Meta shards, HF LLaMA (both ways, against transformers), native, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fixtures.checkpoints import write_meta_checkpoint

from weighted_mtp.errors import CheckpointError
from weighted_mtp.models.checkpoints import build_model, hf, native, read_checkpoint
from weighted_mtp.models.loading import load_model
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer

transformers = pytest.importorskip("transformers")


def random_model(
    n_future_tokens: int = 3, tie: bool = False, vocab_size: int = 301, seed: int = 0
) -> MTPTransformer:
    args = ModelArgs(
        dim=64,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=vocab_size,
        ffn_hidden_dim=192,
        rope_theta=5000.0,
        norm_eps=1e-5,
        n_future_tokens=n_future_tokens,
        tie_embeddings=tie,
    )
    model = MTPTransformer(args)
    model.init_weights(seed, std=0.1)
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return model.eval()


def assert_same_weights(a: MTPTransformer, b: MTPTransformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


# ----------------------------------------------------------------------------- Meta format


def test_two_shard_meta_checkpoint_matches_the_same_weights_from_safetensors(tmp_path) -> None:
    model = random_model(n_future_tokens=2)
    write_meta_checkpoint(model, tmp_path / "meta", n_shards=2)
    native.save(model, tmp_path / "native")
    from_meta = build_model(read_checkpoint(tmp_path / "meta"))
    from_safetensors = build_model(read_checkpoint(tmp_path / "native"))
    assert from_meta.args.n_future_tokens == 2 and len(from_meta.extra_heads) == 1
    assert from_meta.args.ffn_hidden_dim == 192  # from the merged w1 rows: 2 shards x 96
    assert_same_weights(from_meta, from_safetensors)
    tokens = torch.randint(0, 301, (2, 9))
    expected = model(tokens, return_all_heads=True).logits
    torch.testing.assert_close(from_meta(tokens, return_all_heads=True).logits, expected, rtol=0, atol=0)

    # the released MTP checkpoints hold one unsplit `consolidated.pth`
    write_meta_checkpoint(model, tmp_path / "single", n_shards=1)
    (tmp_path / "single" / "consolidated.00.pth").rename(tmp_path / "single" / "consolidated.pth")
    assert_same_weights(build_model(read_checkpoint(tmp_path / "single")), from_safetensors)


def test_meta_shards_that_disagree_raise(tmp_path) -> None:
    model = random_model(n_future_tokens=1)
    write_meta_checkpoint(model, tmp_path / "meta", n_shards=2)
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth")
    del shard["norm.weight"]
    torch.save(shard, tmp_path / "meta" / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth"):
        read_checkpoint(tmp_path / "meta")


# ----------------------------------------------------------------------------- Hugging Face format


def hf_reference(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=257,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        initializer_range=0.1,
        max_position_embeddings=128,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_hf_llama_loads_with_the_same_logits_as_transformers(tmp_path, tie) -> None:
    reference = hf_reference(tie)
    reference.save_pretrained(tmp_path / "hf")
    raw = read_checkpoint(tmp_path / "hf")
    assert raw.format == "hf" and raw.args.tie_embeddings == tie
    model = build_model(raw).eval()
    tokens = torch.randint(0, 257, (2, 21))
    with torch.no_grad():
        expected = reference(tokens).logits
        ours = model(tokens).logits[:, :, 0]
    assert (ours - expected).abs().max() < 1e-4


@pytest.mark.parametrize("tie", [False, True])
def test_hf_export_loads_unchanged_in_transformers_and_keeps_the_extra_heads(tmp_path, tie) -> None:
    model = random_model(n_future_tokens=3, tie=tie)
    hf.export_hf(model, tmp_path / "export")
    assert (tmp_path / "export" / hf.HEADS_FILE).is_file()
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert reference.config.num_hidden_layers == 2  # trunk + head 1
    tokens = torch.randint(0, 301, (2, 17))
    with torch.no_grad():
        ours = model(tokens, return_all_heads=True).logits
        assert (reference(tokens).logits - ours[:, :, 0]).abs().max() < 1e-4
    back = build_model(read_checkpoint(tmp_path / "export"))
    assert back.n_future_tokens == 3 and back.args.n_layers == 4
    assert_same_weights(back, model)


def test_sharded_hf_checkpoint_with_index(tmp_path) -> None:
    reference = hf_reference(tie=False)
    reference.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model = build_model(read_checkpoint(tmp_path / "hf"))
    tokens = torch.randint(0, 257, (1, 11))
    with torch.no_grad():
        assert (model(tokens).logits[:, :, 0] - reference(tokens).logits).abs().max() < 1e-4


# ----------------------------------------------------------------------------- native format and expansion


def test_native_round_trip_and_the_trainers_bare_config(tmp_path) -> None:
    model = random_model(n_future_tokens=2, tie=True)
    native.save(model, tmp_path / "ckpt", extra={"step": 7})
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["extra"] == {"step": 7}
    back = build_model(read_checkpoint(tmp_path / "ckpt"))
    assert back.output.weight is back.tok_embeddings.weight
    assert_same_weights(back, model)
    # a directory whose config.json is ModelArgs itself (what train/export.py writes) reads the same
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(model.args.to_dict()))
    assert_same_weights(build_model(read_checkpoint(tmp_path / "ckpt")), model)


def test_bfloat16_load(tmp_path) -> None:
    model = random_model()
    native.save(model, tmp_path / "ckpt")
    low = build_model(read_checkpoint(tmp_path / "ckpt"), dtype=torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- bad input


def test_bad_checkpoints_raise_checkpoint_errors_naming_the_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="nowhere"):
        read_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a model checkpoint"):
        read_checkpoint(tmp_path / "empty")

    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"params.json:1: invalid JSON"):
        read_checkpoint(meta_dir)
    (meta_dir / "params.json").write_text(json.dumps({"dim": 64}))
    with pytest.raises(CheckpointError, match="no consolidated"):
        read_checkpoint(meta_dir)
    (meta_dir / "consolidated.00.pth").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="consolidated.00.pth"):
        read_checkpoint(meta_dir)

    model = random_model()
    native.save(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_checkpoint(tmp_path / "ckpt")

    # shapes that do not fit the declared architecture
    native.save(model, tmp_path / "wrong")
    config = json.loads((tmp_path / "wrong" / "config.json").read_text())
    config["model_args"]["ffn_hidden_dim"] = 100
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"wrong: tensor .*feed_forward\.w1\.weight has shape"):
        build_model(read_checkpoint(tmp_path / "wrong"))
    config["model_args"]["ffn_hidden_dim"], config["model_args"]["n_layers"] = 192, 5
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing layers.2"):
        build_model(read_checkpoint(tmp_path / "wrong"))

    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CheckpointError, match="bad.gguf: truncated"):
        read_checkpoint(tmp_path / "bad.gguf")
    (tmp_path / "notgguf.gguf").write_bytes(b"hello world, not a gguf")
    with pytest.raises(CheckpointError, match="notgguf.gguf: not a GGUF file"):
        read_checkpoint(tmp_path / "notgguf.gguf")

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        read_checkpoint(hf_dir)
    with pytest.raises(CheckpointError, match="neither a named model"):
        load_model(str(tmp_path / "missing-model"))
