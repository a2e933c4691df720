"""Activation checkpointing applied from outside the model: same loss and gradients, names and state
dict unchanged, and each block really runs again in the backward pass."""

from __future__ import annotations

import torch

from weighted_mtp.losses import mtp_forward_backward
from weighted_mtp.models.transformer import build_micro_model
from weighted_mtp.train.parallelize import apply_activation_checkpointing, compile_blocks


def batch(vocab: int = 53):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, 11), generator=generator)
    labels = input_ids.clone()
    labels[:, :3] = -100
    return input_ids, labels


def block_calls(model) -> list[int]:
    calls = [0]

    def count(*_):
        calls[0] += 1

    for block in model.blocks():
        block.register_forward_pre_hook(count)
    return calls


def test_checkpointed_blocks_give_the_same_gradients_and_recompute_in_backward():
    input_ids, labels = batch()
    results = []
    for checkpointed in (False, True):
        model = build_micro_model(53, n_future_tokens=2, seed=1).double().train()
        names = [name for name, _ in model.named_parameters()]
        if checkpointed:
            apply_activation_checkpointing(model)
        calls = block_calls(model)
        out = mtp_forward_backward(model, input_ids, labels)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        assert [name for name, _ in model.named_parameters()] == names  # nothing renamed or wrapped
        results.append((out.loss, grads, calls[0], sorted(model.state_dict())))
    (plain_loss, plain_grads, plain_calls, plain_keys), (loss, grads, calls, keys) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12)
    assert keys == plain_keys
    assert calls == 2 * plain_calls  # every block ran again during the backward pass


def test_without_gradients_a_checkpointed_model_runs_each_block_once():
    model = build_micro_model(53, n_future_tokens=2, seed=1).eval()
    apply_activation_checkpointing(model)
    calls = block_calls(model)
    input_ids, _ = batch()
    with torch.no_grad():
        model(input_ids, return_all_heads=True)
    assert calls[0] == len(model.blocks())


def test_compiled_blocks_give_the_same_gradients_alone_and_with_checkpointing():
    """Compiled blocks match eager: loss and every gradient, names and state dict unchanged; and the
    compiled graph really ran (dynamo compiled a frame), with activation checkpointing too. To float32
    rounding: RMSNorm and the rotary embedding compute in float32 even in a float64 model, and the
    compiler fuses them into kernels that round in another order."""
    from torch._dynamo.utils import counters

    input_ids, labels = batch()
    eager = build_micro_model(53, n_future_tokens=2, seed=1).double().train()
    out = mtp_forward_backward(eager, input_ids, labels)
    eager_grads = {name: p.grad for name, p in eager.named_parameters()}
    for checkpointed in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = build_micro_model(53, n_future_tokens=2, seed=1).double().train()
        if checkpointed:
            apply_activation_checkpointing(model)
        compile_blocks(model)
        compiled = mtp_forward_backward(model, input_ids, labels)
        assert counters["stats"]["unique_graphs"] >= 1
        torch.testing.assert_close(compiled.loss, out.loss, rtol=1e-6, atol=1e-8)
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-5, atol=1e-7, msg=name)
        assert sorted(model.state_dict()) == sorted(eager.state_dict())


def test_compiled_lora_blocks_give_the_same_gradients():
    """peft's LoRA layers inside compiled blocks: the adapters' gradients match eager (no dropout:
    compiled dropout draws its masks from another generator)."""
    from weighted_mtp.models.lora import configure_training_modes

    input_ids, labels = batch()
    grads = []
    for compiled in (False, True):
        model = build_micro_model(53, n_future_tokens=2, seed=1).double().train()
        configure_training_modes(model, trunk="lora", heads="lora", unembedding="frozen", lora_targets=["wq", "wv"],
                                 lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=0)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:  # peft starts B at zero; nonzero so that A's gradient is too
                    param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.02)
        if compiled:
            compile_blocks(model)
        mtp_forward_backward(model, input_ids, labels)
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    eager, compiled = grads
    assert sorted(compiled) == sorted(eager) and any("lora_A" in name for name in eager)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)
