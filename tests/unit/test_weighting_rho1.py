"""Rho-1: top-k / soft selection vs sorted lists and numpy, per-head vs head-1, the reference CE."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from weighted_mtp.losses import head_token_ce, mtp_forward_backward, mtp_loss_naive
from weighted_mtp.models.transformer import build_micro_model
from weighted_mtp.weighting import Rho1Weighting, head_target_mask, reference_token_ce
from weighted_mtp.weighting.rho1 import largest_at_rank, ordered_keys, soft_weights, top_k_weights, value_of_key


def random_labels(rng: random.Random, batch: int, length: int, vocab: int = 100) -> torch.Tensor:
    labels = torch.full((batch, length), -100, dtype=torch.long)
    for b in range(batch):
        prompt = rng.randint(0, length - 1)
        response = rng.randint(0, length - prompt)
        labels[b, prompt : prompt + response] = torch.tensor([rng.randrange(vocab) for _ in range(response)])
    return labels


def reference_top_k(scores: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sorted-list version: valid positions in row-major order, best score first, earlier wins ties."""
    flat = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    out = torch.zeros(mask.shape)
    if not flat:
        return out
    n_keep = min(len(flat), max(1, math.floor(ratio * len(flat) + 0.5)))
    ranked = sorted(range(len(flat)), key=lambda i: (-float(scores[flat[i]]), i))
    for i in ranked[:n_keep]:
        out[flat[i]] = len(flat) / n_keep
    return out


@pytest.mark.parametrize("seed", range(25))
def test_top_k_matches_sorted_list_with_ties(seed):
    rng = random.Random(seed)
    batch, length = rng.randint(1, 5), rng.randint(1, 30)
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < rng.random()
    # few distinct values: plenty of ties; garbage where masked must not matter
    scores = torch.randint(-2, 3, (batch, length), generator=torch.Generator().manual_seed(seed + 1)).float()
    scores[~mask] = 1e9
    ratio = rng.choice([rng.random(), 0.5, 1.0, 1e-3])
    weights = top_k_weights(scores, mask, ratio)
    torch.testing.assert_close(weights, reference_top_k(scores, mask, ratio))
    if mask.any():
        assert weights[mask].mean().item() == pytest.approx(1.0)
    assert (weights[~mask] == 0).all()


@pytest.mark.parametrize("seed", range(10))
def test_soft_weights_match_numpy(seed):
    rng = random.Random(seed)
    batch, length = rng.randint(1, 5), rng.randint(1, 30)
    mask = torch.rand(batch, length, generator=torch.Generator().manual_seed(seed)) < 0.7
    scores = torch.randn(batch, length, generator=torch.Generator().manual_seed(seed + 1)) * 3
    temperature = rng.uniform(0.2, 3.0)
    weights = soft_weights(scores, mask, temperature)
    m = mask.numpy()
    expected = np.zeros(m.shape)
    if m.any():
        z = scores.numpy().astype(np.float64)[m] / temperature
        e = np.exp(z - z.max())
        expected[m] = m.sum() * e / e.sum()
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-5, atol=1e-6)


def random_ce(labels, n_heads, generator):
    """[B,T,n] model CE, 0 off target, as `head_token_ce` returns it."""
    masks = head_target_mask(labels, n_heads)
    return torch.rand(*labels.shape, n_heads, generator=generator) * 5 * masks, masks


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("selection", ["top_k", "soft"])
def test_per_head_selection_uses_each_heads_excess(seed, selection):
    rng = random.Random(seed)
    n_heads = rng.randint(1, 4)
    labels = random_labels(rng, rng.randint(1, 5), rng.randint(2, 30))
    generator = torch.Generator().manual_seed(seed)
    reference_ce = torch.rand(*labels.shape, n_heads, generator=generator) * 5
    ce, masks = random_ce(labels, n_heads, generator)
    scheme = Rho1Weighting(selection=selection, ratio=0.4, temperature=0.7)
    weights, excess = scheme.weights(ce, reference_ce, labels, n_heads=n_heads)
    for k0 in range(n_heads):
        head_excess = ce[..., k0] - reference_ce[..., k0]
        if selection == "top_k":
            expected = reference_top_k(head_excess, masks[..., k0], 0.4)
        else:
            expected = soft_weights(head_excess, masks[..., k0], 0.7)
        torch.testing.assert_close(weights[..., k0], expected)
        torch.testing.assert_close(excess[..., k0], head_excess * masks[..., k0])
    assert (weights[~masks] == 0).all()


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("selection", ["top_k", "soft"])
def test_head1_selection_is_shared_by_the_target_token(seed, selection):
    rng = random.Random(seed)
    n_heads = rng.randint(2, 4)
    labels = random_labels(rng, rng.randint(1, 5), rng.randint(2, 30))
    generator = torch.Generator().manual_seed(seed)
    reference_ce = torch.rand(*labels.shape, 1, generator=generator) * 5  # head 1 only is enough
    ce, _ = random_ce(labels, 1, generator)  # and the model's head 1 only
    scheme = Rho1Weighting(selection=selection, ratio=0.5, per_head=False)
    assert scheme.scored_heads(n_heads) == 1
    weights, excess = scheme.weights(ce, reference_ce, labels, n_heads=n_heads)
    assert excess.shape[-1] == 1
    head1 = weights[..., 0]
    batch, length = labels.shape
    for b in range(batch):
        for p in range(length):
            for k in range(1, n_heads + 1):
                j = p + k  # target token; head 1 predicts it at j - 1
                expected = float(head1[b, j - 1]) if j < length and labels[b, j] != -100 else 0.0
                assert float(weights[b, p, k - 1]) == pytest.approx(expected)


def test_missing_heads_and_unknown_selections_are_refused():
    labels = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="needs the CE of 3 head"):
        Rho1Weighting(per_head=True).weights(torch.zeros(1, 4, 3), torch.zeros(1, 4, 1), labels, n_heads=3)
    with pytest.raises(ValueError, match="unknown rho1 selection"):
        Rho1Weighting(selection="best")


@pytest.fixture(scope="module")
def micro_models():
    torch.manual_seed(0)
    return build_micro_model(48, 3, seed=0).eval(), build_micro_model(48, 3, seed=1).eval()


def micro_batch(seed: int, vocab: int = 48):
    rng = random.Random(seed)
    batch, length = 3, 17
    input_ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    for b in range(batch):
        prompt, end = rng.randint(1, 6), rng.randint(8, length)
        labels[b, prompt:end] = input_ids[b, prompt:end]
        attention_mask[b, end:] = 0  # right padding
    return input_ids, attention_mask, labels


@torch.no_grad()
def naive_head_ce(model, input_ids, attention_mask, labels, n_heads):
    logits = model(input_ids, attention_mask=attention_mask, return_all_heads=True).logits
    out = torch.zeros(*labels.shape, n_heads)
    for k in range(1, n_heads + 1):
        targets = torch.full_like(labels, -100)
        targets[:, :-k] = labels[:, k:]
        out[..., k - 1] = F.cross_entropy(logits[:, :, k - 1].transpose(1, 2), targets, reduction="none")
    return out


@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_reference_ce_matches_full_logits(micro_models, chunk_size):
    _, reference = micro_models
    input_ids, attention_mask, labels = micro_batch(0)
    ce = reference_token_ce(
        reference, input_ids, labels, attention_mask=attention_mask, chunk_size=chunk_size
    )
    expected = naive_head_ce(reference, input_ids, attention_mask, labels, 3)
    torch.testing.assert_close(ce, expected, atol=1e-5, rtol=1e-5)
    assert (ce[~head_target_mask(labels, 3)] == 0).all()
    assert not ce.requires_grad


@pytest.mark.parametrize("per_head", [True, False])
def test_rho1_weights_in_the_memory_efficient_loss(micro_models, per_head):
    """Both models' CE from `head_token_ce`, the selection, then the loss: hand-built top-k weights."""
    model, reference = micro_models
    input_ids, attention_mask, labels = micro_batch(1)
    scheme = Rho1Weighting(selection="top_k", ratio=0.3, per_head=per_head)
    heads = scheme.scored_heads(3)
    h_trunk = model.trunk_forward(input_ids, attention_mask=attention_mask)
    model_ce = head_token_ce(model, h_trunk, labels, attention_mask=attention_mask, n_heads=heads, chunk_size=7)
    reference_ce = reference_token_ce(reference, input_ids, labels, attention_mask=attention_mask, n_heads=heads)
    assert model_ce.shape[-1] == reference_ce.shape[-1] == (3 if per_head else 1)
    weights, excess = scheme.weights(model_ce, reference_ce, labels, n_heads=3)
    model.zero_grad()
    out = mtp_forward_backward(model, input_ids, labels, attention_mask=attention_mask, weights=weights)

    masks = head_target_mask(labels, 3)
    excess_naive = naive_head_ce(model, input_ids, attention_mask, labels, 3) - naive_head_ce(
        reference, input_ids, attention_mask, labels, 3
    )
    expected = torch.zeros(*labels.shape, 3)
    if per_head:
        for k0 in range(3):
            expected[..., k0] = reference_top_k(excess_naive[..., k0], masks[..., k0], 0.3)
    else:
        head1 = reference_top_k(excess_naive[..., 0], masks[..., 0], 0.3)
        for k0 in range(3):
            expected[:, : labels.shape[1] - k0, k0] = head1[:, k0:]
        expected = expected * masks
    torch.testing.assert_close(weights, expected)
    loss, naive = mtp_loss_naive(model, input_ids, labels, attention_mask=attention_mask, weights=expected)
    torch.testing.assert_close(out.loss, loss.detach(), atol=1e-5, rtol=1e-5)
    stats = scheme.stats(weights, excess, masks)
    assert 0.0 < stats["selected"] < 1.0
    assert stats["excess_head1"] == pytest.approx(float(excess_naive[..., 0][masks[..., 0]].mean()), abs=1e-5)


@pytest.mark.parametrize("selection", ["top_k", "soft"])
def test_weights_keep_float64(selection):
    rng = random.Random(5)
    labels = random_labels(rng, 3, 20)
    generator = torch.Generator().manual_seed(5)
    model_ce = torch.rand(*labels.shape, 2, generator=generator, dtype=torch.float64) * head_target_mask(labels, 2)
    reference_ce = torch.rand(*labels.shape, 2, generator=generator, dtype=torch.float64)
    weights, excess = Rho1Weighting(selection=selection, ratio=0.5).weights(model_ce, reference_ce, labels, n_heads=2)
    assert weights.dtype == excess.dtype == torch.float64
    mask = head_target_mask(labels, 2)
    for k0 in range(2):
        scores = model_ce[..., k0] - reference_ce[..., k0]
        expected = reference_top_k(scores, mask[..., k0], 0.5).double() if selection == "top_k" else None
        if expected is None:
            valid = scores[mask[..., k0]]
            expected = torch.zeros_like(scores)
            expected[mask[..., k0]] = len(valid) * torch.exp(valid - valid.max()) / torch.exp(valid - valid.max()).sum()
        torch.testing.assert_close(weights[..., k0], expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- over the whole step


def test_ordered_keys_sort_like_the_floats():
    values = torch.tensor([-math.inf, -3.5, -1e-300, -0.0, 0.0, 1e-300, 2.0, 2.0000000000000004, math.inf],
                          dtype=torch.float64)
    keys = ordered_keys(values)
    assert (keys[1:] >= keys[:-1]).all() and (keys[2:] > keys[1:-1])[torch.arange(7) != 2].all()
    shuffled = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e3
    order = torch.argsort(ordered_keys(shuffled))
    assert torch.equal(shuffled[order], torch.sort(shuffled).values)
    for v in shuffled[:20].tolist():
        assert value_of_key(int(ordered_keys(torch.tensor([v], dtype=torch.float64)))) == v


@pytest.mark.parametrize("seed", range(10))
def test_the_search_finds_the_kth_largest_over_pieces_like_a_sorted_list(seed):
    rng = random.Random(seed)
    groups = []
    for _ in range(rng.randint(1, 3)):
        pieces = [torch.tensor([rng.choice([-2.5, -1.0, 0.0, 0.5, 3.0, rng.uniform(-5, 5)])
                                for _ in range(rng.randint(0, 6))], dtype=torch.float64) for _ in range(3)]
        groups.append(pieces)
    totals = [sum(len(p) for p in group) for group in groups]
    ranks = [rng.randint(1, max(1, n)) for n in totals]
    got = largest_at_rank(groups, ranks, lambda sums: sums)
    for group, rank, n, value in zip(groups, ranks, totals, got):
        if n == 0:
            continue
        assert value == sorted((x for p in group for x in p.tolist()), reverse=True)[rank - 1]


def loop_step_weights(excess_pieces, mask_pieces, scheme: Rho1Weighting):
    """The step's selection by hand: every valid target of every piece in one list per head."""
    out = [torch.zeros(e.shape, dtype=torch.float64) for e in excess_pieces]
    for k0 in range(excess_pieces[0].shape[-1]):
        cells = [(i, b, t) for i, m in enumerate(mask_pieces) for b in range(m.shape[0]) for t in range(m.shape[1])
                 if m[b, t, k0]]
        values = [float(excess_pieces[i][b, t, k0]) for i, b, t in cells]
        n = len(values)
        if scheme.selection == "top_k":
            keep = min(n, max(1, math.floor(scheme.ratio * n + 0.5)))
            threshold = sorted(values, reverse=True)[keep - 1]
            chosen = [v >= threshold for v in values]
            weights = [n / sum(chosen) if c else 0.0 for c in chosen]
        else:
            top = max(values)
            exps = [math.exp((v - top) / scheme.temperature) for v in values]
            weights = [n * x / sum(exps) for x in exps]
        for (i, b, t), w in zip(cells, weights):
            out[i][b, t, k0] = w
    return out


@pytest.mark.parametrize("selection", ["top_k", "soft"])
@pytest.mark.parametrize("seed", range(4))
def test_step_statistics_weigh_every_piece_as_one_list_does(selection, seed):
    rng = random.Random(seed)
    scheme = Rho1Weighting(selection=selection, ratio=rng.choice([0.3, 0.6]), temperature=rng.choice([0.5, 2.0]))
    labels = [random_labels(rng, rng.randint(1, 3), rng.randint(4, 12)) for _ in range(3)]
    gen = torch.Generator().manual_seed(seed)
    model_ce = [torch.rand(*l.shape, 2, generator=gen, dtype=torch.float64) * 4 for l in labels]
    reference_ce = [torch.rand(*l.shape, 2, generator=gen, dtype=torch.float64) * 4 for l in labels]
    scored = [scheme.excess(m, r, l, n_heads=2) for m, r, l in zip(model_ce, reference_ce, labels)]
    statistics = scheme.step_statistics(scored, lambda sums: sums)
    expected = loop_step_weights([e for e, _ in scored], [m for _, m in scored], scheme)
    for l, (e, m), want in zip(labels, scored, expected):
        got = scheme.weights_from_excess(e, m, l, n_heads=2, statistics=statistics)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    every = torch.cat([w[m] for (_, m), w in zip(scored, expected)])
    if every.numel():
        assert float(every.mean()) == pytest.approx(1.0)
