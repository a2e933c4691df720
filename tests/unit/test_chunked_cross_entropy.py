"""chunked_cross_entropy against F.cross_entropy on fully materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weighted_mtp.losses import IGNORE_INDEX, chunked_cross_entropy


def _inputs(n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0, ignored: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, dtype=dtype)
    weight = torch.randn(v, d, generator=gen, dtype=dtype) / d**0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    # A third of the targets are the argmax, so that top-1 correctness is tested both ways.
    hit = torch.rand(n, generator=gen) < 1 / 3
    targets[hit] = (hidden @ weight.T).argmax(-1)[hit]
    targets[torch.rand(n, generator=gen) < ignored] = IGNORE_INDEX
    return hidden, weight, targets


def _reference(hidden, weight, targets):
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    correct = (logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)
    return ce, correct


@pytest.mark.parametrize(
    ("dtype", "tol", "chunk_size"),
    [(torch.float32, 1e-5, 7), (torch.float32, 1e-5, 1000), (torch.float64, 1e-12, 5)],
)
def test_values_and_gradients_match_full_logits(dtype, tol, chunk_size):
    hidden, weight, targets = _inputs(53, 16, 97, dtype)
    upstream = torch.randn(53, dtype=torch.promote_types(dtype, torch.float32))

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ce, correct = chunked_cross_entropy(h1, w1, targets, chunk_size=chunk_size, return_correct=True)
    (ce * upstream).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ce_ref, correct_ref = _reference(h2, w2, targets)
    (ce_ref * upstream).sum().backward()

    assert ce.dtype == ce_ref.dtype
    torch.testing.assert_close(ce, ce_ref, rtol=tol, atol=tol)
    assert torch.equal(correct, correct_ref)
    assert correct.any() and not correct[targets != IGNORE_INDEX].all()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=tol, atol=tol)
    assert (ce[targets == IGNORE_INDEX] == 0).all()
    assert (h1.grad[targets == IGNORE_INDEX] == 0).all()


def test_gradcheck_float64():
    hidden, weight, targets = _inputs(9, 4, 11, torch.float64, seed=1)
    hidden.requires_grad_()
    weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_cross_entropy(h, w, targets, chunk_size=4), (hidden, weight)
    )


def test_gradient_only_for_hidden_when_weight_is_frozen():
    hidden, weight, targets = _inputs(20, 8, 31, torch.float32, seed=2)
    hidden.requires_grad_()
    chunked_cross_entropy(hidden, weight, targets, chunk_size=6).sum().backward()
    h_ref = hidden.detach().clone().requires_grad_()
    _reference(h_ref, weight, targets)[0].sum().backward()
    torch.testing.assert_close(hidden.grad, h_ref.grad, rtol=1e-5, atol=1e-5)
    assert weight.grad is None


def test_all_targets_ignored_gives_zero_loss_and_gradient():
    hidden, weight, _ = _inputs(10, 8, 13, torch.float32)
    targets = torch.full((10,), IGNORE_INDEX)
    hidden.requires_grad_()
    weight.requires_grad_()
    ce = chunked_cross_entropy(hidden, weight, targets, chunk_size=4)
    ce.sum().backward()
    assert (ce == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_bfloat16_inputs_give_fp32_loss_close_to_reference():
    hidden, weight, targets = _inputs(40, 32, 64, torch.bfloat16, seed=3)
    ce = chunked_cross_entropy(hidden, weight, targets, chunk_size=16)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce, _reference(hidden, weight, targets)[0], rtol=1e-5, atol=1e-5)


def test_rejects_non_positive_chunk_size():
    hidden, weight, targets = _inputs(4, 4, 5, torch.float32)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, targets, chunk_size=0)


def test_bfloat16_gradients_are_close_to_the_fp32_reference():
    hidden, weight, targets = _inputs(40, 32, 64, torch.bfloat16, seed=4)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked_cross_entropy(h1, w1, targets, chunk_size=16).sum().backward()
    assert h1.grad.dtype == w1.grad.dtype == torch.bfloat16
    h2, w2 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    _reference(h2, w2, targets)[0].sum().backward()
    torch.testing.assert_close(h1.grad.float(), h2.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w1.grad.float(), w2.grad, rtol=2e-2, atol=2e-2)
