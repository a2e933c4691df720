"""The head-by-head MTP loss against two references: `mtp_loss_naive` (all logits, one graph) and a
hand-written per-head loop in this file. Loss, metrics and every parameter's gradient to 1e-5 (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from weighted_mtp import losses
from weighted_mtp.config.schema import ValueHeadConfig
from weighted_mtp.losses import (
    head_targets,
    head_token_ce,
    mtp_forward_backward,
    mtp_loss_naive,
)
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer
from weighted_mtp.models.value_head import build_value_head
from weighted_mtp.train.parallelize import apply_activation_checkpointing

VOCAB, BATCH, SEQ = 61, 3, 13
TOL = dict(rtol=1e-5, atol=1e-5)


def _model(n: int, *, tie: bool, seed: int = 0) -> MTPTransformer:
    args = ModelArgs(
        dim=32, n_layers=2 + n, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_hidden_dim=48,
        n_future_tokens=n, tie_embeddings=tie,
    )
    model = MTPTransformer(args)
    model.init_weights(seed, std=0.2)  # large enough that the heads' predictions differ
    return model


def _batch(seed: int = 0):
    """Right-padded rows of different lengths, each with a prompt whose labels are masked."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    lengths, prompts = [SEQ, 9, 5], [4, 2, 3]
    attention_mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    labels = torch.full((BATCH, SEQ), -100)
    for row, (length, prompt) in enumerate(zip(lengths, prompts)):
        attention_mask[row, :length] = 1
        labels[row, prompt:length] = input_ids[row, prompt:length]
        input_ids[row, length:] = 0
    return input_ids, attention_mask, labels


def _rho1_like(model, input_ids, attention_mask, labels, n: int) -> Tensor:
    """Weights from the model's own per-token losses, as Rho-1's: harder tokens count more."""
    h_trunk = model.trunk_forward(input_ids, attention_mask=attention_mask)
    ce = head_token_ce(model, h_trunk, labels, attention_mask=attention_mask, n_heads=n, chunk_size=3)
    assert not ce.requires_grad
    mask = torch.stack([head_targets(labels, k0 + 1) != -100 for k0 in range(n)], dim=-1)
    return torch.where(mask, 0.5 + torch.sigmoid(ce - ce[mask].mean()) + 0.1 * torch.arange(n), 0.0)


def _hand_written(model, input_ids, attention_mask, labels, *, n, weights, head_weights, value_head, value_targets):
    """Per-head loop written independently of losses.py: explicit shifts, log-softmax and sums."""
    h_trunk = model.trunk_forward(input_ids, attention_mask=attention_mask)
    total, head_losses, accuracies = 0.0, [], []
    for k0 in range(n):
        k = k0 + 1
        log_probs = torch.log_softmax(model.output(model.norm(model.head_forward(k0, h_trunk, attention_mask=attention_mask))).float(), -1)
        targets = torch.zeros(BATCH, SEQ, dtype=torch.long)
        mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
        for b in range(BATCH):
            for t in range(SEQ - k):
                if labels[b, t + k] != -100:
                    targets[b, t], mask[b, t] = labels[b, t + k], True
        ce = -log_probs.gather(-1, targets[..., None]).squeeze(-1) * mask
        correct = (log_probs.argmax(-1) == targets) & mask
        w = torch.ones(BATCH, SEQ) if weights is None else weights[:, :, k0]
        loss_k = (w * ce).sum() / mask.sum()
        head_losses.append(loss_k)
        accuracies.append(correct.sum() / mask.sum())
        total = total + head_weights[k0] * loss_k
    total = total / sum(head_weights)
    if value_head is not None:
        total = total + ((value_head(h_trunk) - value_targets) ** 2 * attention_mask).sum() / attention_mask.sum()
    return total, torch.stack(head_losses).detach(), torch.stack(accuracies)


def _grads(modules) -> dict[str, Tensor | None]:
    return {
        f"{i}.{name}": None if p.grad is None else p.grad.clone()
        for i, module in enumerate(modules)
        for name, p in module.named_parameters()
    }


def _zero(modules) -> None:
    for module in modules:
        module.zero_grad(set_to_none=True)


CASES = [
    # n, tie, weights kind, head weights, with value loss
    (1, True, "tensor", None, False),
    (2, False, "own losses", [1.0, 0.5], True),
    (4, True, "tensor", [1.0, 0.7, 0.4, 0.2], True),
    (4, False, None, None, False),
]


@pytest.mark.parametrize(("n", "tie", "weights_kind", "head_weights", "with_value"), CASES)
def test_head_by_head_matches_naive_and_hand_written(n, tie, weights_kind, head_weights, with_value):
    torch.manual_seed(n)
    model = _model(n, tie=tie, seed=n)
    input_ids, attention_mask, labels = _batch(seed=n)
    if weights_kind == "tensor":
        weights = torch.rand(BATCH, SEQ, n) * 2
    elif weights_kind == "own losses":
        weights = _rho1_like(model, input_ids, attention_mask, labels, n)
    else:
        weights = None
    value_head = build_value_head(ValueHeadConfig(type="mlp", hidden_size=16), 32) if with_value else None
    value_targets = torch.rand(BATCH, SEQ)
    modules = [model] + ([value_head] if value_head is not None else [])

    def value_loss(h_trunk: Tensor) -> Tensor:
        return ((value_head(h_trunk) - value_targets) ** 2 * attention_mask).sum() / attention_mask.sum()

    common = dict(attention_mask=attention_mask, weights=weights, head_weights=head_weights)
    trunk = {}
    if with_value:  # the caller runs the trunk and computes the value loss from it
        h_trunk = model.trunk_forward(input_ids, attention_mask=attention_mask)
        trunk = dict(h_trunk=h_trunk, trunk_loss=value_loss(h_trunk))

    efficient = mtp_forward_backward(model, input_ids, labels, chunk_size=5, **common, **trunk)
    grads_efficient = _grads(modules)
    _zero(modules)

    naive_loss, naive = mtp_loss_naive(
        model, input_ids, labels, **common, trunk_loss_fn=value_loss if with_value else None
    )
    naive_loss.backward()
    grads_naive = _grads(modules)
    _zero(modules)

    hw = head_weights or [1.0] * n
    hand_loss, hand_head_losses, hand_accuracy = _hand_written(
        model, input_ids, attention_mask, labels, n=n, weights=weights, head_weights=hw,
        value_head=value_head, value_targets=value_targets,
    )
    hand_loss.backward()
    grads_hand = _grads(modules)

    for reference in (naive.loss, naive_loss.detach(), hand_loss.detach()):
        torch.testing.assert_close(efficient.loss, reference, **TOL)
    torch.testing.assert_close(efficient.head_losses, naive.head_losses, **TOL)
    torch.testing.assert_close(efficient.head_losses, hand_head_losses, **TOL)
    torch.testing.assert_close(efficient.head_ce, naive.head_ce, **TOL)
    torch.testing.assert_close(efficient.head_accuracy, naive.head_accuracy, **TOL)
    torch.testing.assert_close(efficient.head_accuracy, hand_accuracy, **TOL)
    assert torch.equal(efficient.head_tokens, naive.head_tokens)
    if with_value:
        torch.testing.assert_close(efficient.aux_loss, naive.aux_loss, **TOL)
    else:
        assert efficient.aux_loss is None

    assert grads_efficient.keys() == grads_naive.keys() == grads_hand.keys()
    for name, grad in grads_efficient.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, grads_naive[name], **TOL, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(grad, grads_hand[name], **TOL, msg=lambda m: f"{name}: {m}")
    assert grads_efficient["0.layers.0.attention.wq.weight"].abs().sum() > 0
    assert grads_efficient["0.tok_embeddings.weight"].abs().sum() > 0


def test_head_tokens_count_targets_inside_the_sequence():
    _, _, labels = _batch()
    model = _model(4, tie=True)
    input_ids, attention_mask, labels = _batch()
    out = mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask, loss_scale=None)
    # Head k at position t needs labels[t + k]: rows have 9, 7 and 2 labelled tokens from position 4, 2, 3.
    expected = [sum(max(0, n_labelled - max(0, k - prompt)) for n_labelled, prompt in [(9, 4), (7, 2), (2, 3)])
                for k in range(1, 5)]
    assert out.head_tokens.tolist() == expected


def test_fewer_heads_than_the_model_has_leaves_the_rest_untouched():
    model = _model(4, tie=False)
    input_ids, attention_mask, labels = _batch(seed=3)
    efficient = mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask, n_heads=2)
    grads_efficient = _grads([model])
    _zero([model])
    naive_loss, naive = mtp_loss_naive(model, input_ids, labels, attention_mask=attention_mask, n_heads=2)
    naive_loss.backward()
    grads_naive = _grads([model])
    assert efficient.head_losses.shape == (2,)
    torch.testing.assert_close(efficient.loss, naive.loss, **TOL)
    for name, grad in grads_efficient.items():
        if name.startswith("0.extra_heads.1.") or name.startswith("0.extra_heads.2."):
            # The naive forward runs every head; the efficient one does not touch the unused ones.
            assert grad is None and not grads_naive[name].any()
        else:
            torch.testing.assert_close(grad, grads_naive[name], **TOL)


def test_loss_scale_accumulates_like_a_mean_over_micro_batches():
    model = _model(2, tie=True)
    batches = [_batch(seed=s) for s in (1, 2)]
    for input_ids, attention_mask, labels in batches:
        mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask, loss_scale=0.5)
    accumulated = _grads([model])
    _zero([model])
    total = sum(mtp_loss_naive(model, ids, labels, attention_mask=mask)[0] for ids, mask, labels in batches) / 2
    total.backward()
    for name, grad in _grads([model]).items():
        torch.testing.assert_close(accumulated[name], grad, **TOL)


def test_activation_checkpointing_gives_the_same_gradients():
    model = _model(2, tie=False).train()
    input_ids, attention_mask, labels = _batch(seed=4)
    plain = mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask)
    grads_plain = _grads([model])
    _zero([model])
    apply_activation_checkpointing(model)
    checkpointed = mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask)
    torch.testing.assert_close(checkpointed.loss, plain.loss, **TOL)
    for name, grad in _grads([model]).items():
        torch.testing.assert_close(grad, grads_plain[name], **TOL)


def test_evaluate_reports_the_same_metrics_without_gradients():
    model = _model(2, tie=True)
    input_ids, attention_mask, labels = _batch(seed=5)
    weights = torch.rand(BATCH, SEQ, 2)
    trained = mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask, weights=weights)
    _zero([model])
    evaluated = mtp_forward_backward(
        model, input_ids, labels, attention_mask=attention_mask, weights=weights, loss_scale=None
    )
    assert all(p.grad is None for p in model.parameters())
    for field in ("loss", "head_losses", "head_ce", "head_accuracy", "head_tokens"):
        torch.testing.assert_close(getattr(evaluated, field), getattr(trained, field), **TOL)
    metrics = evaluated.metrics("val/")
    assert set(metrics) == {"val/loss"} | {f"val/head{k}/{m}" for k in (1, 2) for m in ("loss", "ce", "accuracy", "tokens")}


def test_frozen_trunk_gets_no_gradient_and_heads_still_train():
    model = _model(2, tie=False)
    for module in (model.tok_embeddings, *model.layers[:-1]):
        module.requires_grad_(False)
    input_ids, attention_mask, labels = _batch(seed=6)
    mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask)
    assert model.tok_embeddings.weight.grad is None and model.layers[0].attention.wq.weight.grad is None
    assert model.extra_heads[0].attention.wq.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("n", "chunk_size"), [(1, 4), (3, 1000)])
def test_head_token_ce_is_the_cross_entropy_of_the_full_logits(n, chunk_size):
    model = _model(3, tie=False, seed=5).double()
    input_ids, attention_mask, labels = _batch(seed=5)
    h_trunk = model.trunk_forward(input_ids, attention_mask=attention_mask)
    got = head_token_ce(model, h_trunk, labels, attention_mask=attention_mask, n_heads=n, chunk_size=chunk_size)
    assert got.shape == (BATCH, SEQ, n) and got.dtype == torch.float64 and not got.requires_grad
    for k0 in range(n):
        logits = model.output(model.norm(model.head_forward(k0, h_trunk, attention_mask=attention_mask)))
        targets = head_targets(labels, k0 + 1)
        want = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        torch.testing.assert_close(got[..., k0], want.view(BATCH, SEQ).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_heads=3), "n_heads must be in"),
        (dict(head_weights=[1.0]), "head_weights has 1 entries for 2 heads"),
        (dict(head_weights=[0.0, 0.0]), "sum to zero"),
        (dict(chunk_size=0), "chunk_size must be positive"),
        (dict(weights=torch.ones(BATCH, SEQ, 1)), "weights have shape"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    model = _model(2, tie=True)
    input_ids, attention_mask, labels = _batch()
    with pytest.raises(ValueError, match=message):
        mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask, **kwargs)


def test_bfloat16_model_matches_the_naive_loss_within_bf16_precision():
    model = _model(2, tie=True).to(torch.bfloat16)
    input_ids, attention_mask, labels = _batch(seed=7)
    efficient = mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask, chunk_size=8)
    grads_efficient = _grads([model])
    _zero([model])
    naive_loss, naive = mtp_loss_naive(model, input_ids, labels, attention_mask=attention_mask)
    naive_loss.backward()
    assert efficient.loss.dtype == torch.float32
    torch.testing.assert_close(efficient.loss, naive.loss, rtol=1e-2, atol=1e-2)
    for name, grad in _grads([model]).items():
        assert grads_efficient[name].dtype == torch.bfloat16
        torch.testing.assert_close(grads_efficient[name].float(), grad.float(), rtol=5e-2, atol=5e-2 * grad.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cache_sized_row_blocks_compute_what_one_block_per_chunk_computes(monkeypatch, dtype):
    """On CPU each chunk's softmax arithmetic runs in row blocks (`losses.CPU_BLOCK_BYTES`); blocks of
    two rows inside chunks of five (so the last block is short) give every loss, metric and gradient
    of one block per chunk bitwise, in float64 (the logits' own dtype, blocks written in place) and in
    bf16 (each block's fp32 gradient written back into the bf16 logits). The other tests here hold the
    loss to the naive one."""
    model = _model(2, tie=True).to(dtype)
    input_ids, attention_mask, labels = _batch(seed=3)
    weights = torch.rand(BATCH, SEQ, 2, generator=torch.Generator().manual_seed(3)).to(dtype) * 2

    def run():
        out = mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask, weights=weights,
                                   chunk_size=5)
        h_trunk = model.trunk_forward(input_ids, attention_mask=attention_mask)
        ce = head_token_ce(model, h_trunk, labels, attention_mask=attention_mask, chunk_size=5)
        grads = _grads([model])
        _zero([model])
        return out, ce, grads

    one_block, one_block_ce, one_block_grads = run()
    monkeypatch.setattr(losses, "CPU_BLOCK_BYTES", 4 * VOCAB * 2)
    assert [len(range(5)[block]) for block in losses._row_blocks(torch.empty(5, VOCAB))] == [2, 2, 1]
    blocked, blocked_ce, blocked_grads = run()
    assert torch.equal(blocked.loss, one_block.loss)
    assert torch.equal(blocked.head_accuracy, one_block.head_accuracy)
    assert torch.equal(blocked_ce, one_block_ce)
    assert blocked_grads.keys() == one_block_grads.keys()
    for name, grad in one_block_grads.items():
        assert (grad is None) == (blocked_grads[name] is None), name
        if grad is not None:
            assert torch.equal(blocked_grads[name], grad), name


PRODUCTS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default,
                      torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default})


class _ProductDtypes(TorchDispatchMode):
    """The input dtypes of every matrix product dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            self.dtypes.update(a.dtype for a in args if isinstance(a, Tensor))
        return func(*args, **(kwargs or {}))


def test_under_cpu_autocast_every_product_runs_in_bf16_and_fp32_weights_get_fp32_gradients():
    """How the trainer runs `dtype: bfloat16` on the CPU: float32 weights under autocast. Every matrix
    product of the loss's forward and backward (the trunk's, each head's, the unembedding's, including
    the in-place accumulation of its gradient, which autocast alone leaves in fp32) takes bf16 inputs;
    every gradient is float32 and within bf16 precision of the naive loss under the same autocast."""
    model = _model(2, tie=True)
    input_ids, attention_mask, labels = _batch(seed=5)
    weights = torch.rand(BATCH, SEQ, 2, generator=torch.Generator().manual_seed(5)) * 2
    with torch.autocast("cpu", dtype=torch.bfloat16), _ProductDtypes() as products:
        efficient = mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask, weights=weights,
                                         chunk_size=5)
    assert products.dtypes == {torch.bfloat16}
    grads_efficient = _grads([model])
    _zero([model])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive_loss, _ = mtp_loss_naive(model, input_ids, labels, attention_mask=attention_mask, weights=weights)
    naive_loss.backward()
    torch.testing.assert_close(efficient.loss, naive_loss.detach(), rtol=1e-2, atol=1e-2)
    for name, grad in _grads([model]).items():
        assert grads_efficient[name].dtype == torch.float32, name
        torch.testing.assert_close(grads_efficient[name], grad, rtol=5e-2, atol=5e-2 * grad.abs().max().item())
