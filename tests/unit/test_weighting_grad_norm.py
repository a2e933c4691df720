"""grad_norm weighting: the closed-form gradient norms against autograd token by token, the weights
against a plain loop, and the objective's gradients against the naive loss with those weights; float64,
padding on both sides, a hole in a response, several heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from weighted_mtp.data import Batch
from weighted_mtp.losses import head_logit_grad_norms, head_targets
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer
from weighted_mtp.objectives import GradNormObjective
from weighted_mtp.weighting import GradNormWeighting

VOCAB, N_HEADS = 50, 3


def model(tie: bool, seed: int = 0) -> MTPTransformer:
    args = ModelArgs(dim=16, n_layers=2 + N_HEADS, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_hidden_dim=24,
                     n_future_tokens=N_HEADS, tie_embeddings=tie)
    out = MTPTransformer(args)
    out.init_weights(seed, std=0.3)
    return out.double().eval()


def batch(seed: int = 0) -> Batch:
    """Row 0 left-padded, row 1 right-padded with a hole in its response, row 2 without padding."""
    gen = torch.Generator().manual_seed(seed)
    seq = 14
    input_ids = torch.randint(1, VOCAB, (3, seq), generator=gen)
    attention_mask = torch.ones(3, seq, dtype=torch.long)
    labels = torch.full((3, seq), -100)
    attention_mask[0, :3] = 0
    input_ids[0, :3] = 0
    labels[0, 6:] = input_ids[0, 6:]
    attention_mask[1, 10:] = 0
    input_ids[1, 10:] = 0
    labels[1, 3:10] = input_ids[1, 3:10]
    labels[1, 6] = -100
    labels[2, 5:] = input_ids[2, 5:]
    return Batch(input_ids, attention_mask, labels, torch.tensor([1.0, 0.0, 1.0]), ["a", "b", "c"])


def autograd_norms(m: MTPTransformer, b: Batch) -> torch.Tensor:
    """Token by token: the gradient of that one token's CE with respect to the unembedding's input."""
    trunk = m.trunk_forward(b.input_ids, attention_mask=b.attention_mask).detach()
    out = torch.zeros(*b.labels.shape, N_HEADS, dtype=torch.float64)
    for k0 in range(N_HEADS):
        hidden = m.norm(m.head_forward(k0, trunk, attention_mask=b.attention_mask)).detach()
        targets = head_targets(b.labels, k0 + 1)
        for row in range(b.labels.shape[0]):
            for t in range(b.labels.shape[1]):
                if targets[row, t] == -100:
                    continue
                h = hidden[row, t].clone().requires_grad_(True)
                loss = F.cross_entropy(m.output(h)[None], targets[row, t][None])
                (grad,) = torch.autograd.grad(loss, h)
                out[row, t, k0] = grad.norm()
    return out


@pytest.mark.parametrize(("tie", "chunk_size"), [(False, 1), (True, 5), (False, 1000)])
def test_closed_form_gradient_norms_equal_autograd_token_by_token(tie, chunk_size):
    m, b = model(tie), batch()
    trunk = m.trunk_forward(b.input_ids, attention_mask=b.attention_mask)
    got = head_logit_grad_norms(m, trunk, b.labels, attention_mask=b.attention_mask, chunk_size=chunk_size)
    assert got.dtype == torch.float64 and not got.requires_grad
    torch.testing.assert_close(got, autograd_norms(m, b), rtol=1e-9, atol=1e-12)
    assert (got > 0).sum() == sum(int((head_targets(b.labels, k) != -100).sum()) for k in range(1, N_HEADS + 1))


def loop_weights(scores: torch.Tensor, labels: torch.Tensor, w: GradNormWeighting) -> torch.Tensor:
    out = torch.zeros_like(scores)
    for k0 in range(scores.shape[-1]):
        targets = head_targets(labels, k0 + 1)
        cells = [(r, t) for r in range(labels.shape[0]) for t in range(labels.shape[1]) if targets[r, t] != -100]
        values = [float(scores[r, t, k0]) for r, t in cells]
        if w.normalization == "zscore":
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            values = [(v - mean) / (std + 1e-8) for v in values]
        if w.transform == "exp":
            raw = [math.exp(v / w.temperature) for v in values]
        else:  # L * softmax over each row's L targets
            raw = []
            for i, (r, _) in enumerate(cells):
                row = [values[j] / w.temperature for j, (r2, _) in enumerate(cells) if r2 == r]
                raw.append(len(row) * math.exp(values[i] / w.temperature) / sum(math.exp(x) for x in row))
        clipped = [min(max(x, w.clip_min), w.clip_max) for x in raw]
        if w.weight_normalization == "mean1":
            mean = sum(clipped) / len(clipped)
            clipped = [x / mean for x in clipped]
        for (r, t), x in zip(cells, clipped):
            out[r, t, k0] = x
    return out


@pytest.mark.parametrize(
    "weighting",
    [
        GradNormWeighting(),
        GradNormWeighting(normalization="none", temperature=0.5, clip_min=0.5, clip_max=1.2),
        GradNormWeighting(transform="softmax", temperature=2.0, weight_normalization="none"),
    ],
)
def test_weights_match_a_plain_loop(weighting):
    b = batch(seed=3)
    scores = torch.rand(*b.labels.shape, N_HEADS, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = weighting.weights(scores, b.labels)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, loop_weights(scores, b.labels, weighting), rtol=1e-9, atol=1e-12)


def test_the_objectives_gradients_are_the_naive_loss_with_the_loop_weights():
    weighting = GradNormWeighting(temperature=0.7)
    m, b = model(tie=False, seed=2), batch(seed=2)
    objective = GradNormObjective(weighting, chunk_size=4)
    metrics = objective.forward_backward(m, b, loss_scale=1.0)
    got = {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)

    weights = loop_weights(autograd_norms(m, b), b.labels, weighting)
    trunk = m.trunk_forward(b.input_ids, attention_mask=b.attention_mask)
    head_losses = []
    for k0 in range(N_HEADS):  # sum of weight x CE over the head's targets / their count, in float64
        logits = m.output(m.norm(m.head_forward(k0, trunk, attention_mask=b.attention_mask)))
        targets = head_targets(b.labels, k0 + 1)
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="none")
        head_losses.append((weights[..., k0].flatten() * ce).sum() / (targets != -100).sum())
    loss = sum(head_losses) / N_HEADS
    assert loss.dtype == torch.float64
    loss.backward()
    want = {name: p.grad for name, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and metrics["loss"] == pytest.approx(loss.item(), rel=1e-9)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-10, msg=name)
    torch.testing.assert_close(objective.token_weights(m, b).weights, weights, rtol=1e-9, atol=1e-12)
