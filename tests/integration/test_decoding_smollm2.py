"""bf16 decoding of the real SmolLM2-135M multiplies the few rows of each step by prepacked weights
(models/transformer.py `Linear`): greedy outputs at batch 1 and batch 4 are token for token those of
`nn.Linear`'s path."""

from __future__ import annotations

import torch
from torch import nn

from weighted_mtp.eval.benchmarks import get_benchmark
from weighted_mtp.eval.generation import generate_ids
from weighted_mtp.models.loading import load_model
from weighted_mtp.models.transformer import Linear


def test_bf16_greedy_decoding_is_unchanged_by_the_prepacked_path(tmp_path, shared_data, monkeypatch):
    model, tokenizer = load_model("smollm2-135m", models_dir=tmp_path / "models", dtype=torch.bfloat16)
    model.eval()
    benchmark = get_benchmark("mbpp")
    prompts = [tokenizer.encode(benchmark.prompt(problem, "chat", tokenizer))
               for problem in benchmark.load(shared_data, "test", 4)]

    def decode():
        with torch.inference_mode():
            one_by_one = [generate_ids(model, [ids], max_new_tokens=32)[0].token_ids for ids in prompts]
            return one_by_one, [row.token_ids for row in generate_ids(model, prompts, max_new_tokens=32)]

    fast = decode()
    monkeypatch.setattr(Linear, "forward", nn.Linear.forward)
    assert decode() == fast
    assert all(len(ids) > 0 for ids in fast[0] + fast[1])
