"""The shared alignment helpers, logging stats, and masking for every weighting."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from weighted_mtp.config.schema import Config
from weighted_mtp.weighting import (
    CriticWeighting,
    GradNormWeighting,
    Rho1Weighting,
    discounted_head_weights,
    head_target_mask,
    response_step_mask,
    spread_over_heads,
    weight_stats,
)


class Batch:
    def __init__(self, labels: torch.Tensor, rewards: torch.Tensor) -> None:
        self.input_ids = labels.clamp_min(0)
        self.labels = labels
        self.rewards = rewards


def random_batch(seed: int) -> Batch:
    rng = random.Random(seed)
    batch, length = rng.randint(1, 5), rng.randint(2, 30)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    for b in range(batch):
        prompt = rng.randint(0, length - 1)
        response = rng.randint(0, length - prompt)
        labels[b, prompt : prompt + response] = torch.tensor([rng.randrange(50) for _ in range(response)])
    return Batch(labels, torch.tensor([float(rng.random() < 0.5) for _ in range(batch)]))


def test_unknown_scheme_names_the_choices():
    from weighted_mtp.config import load_config
    from weighted_mtp.errors import ConfigError

    expected = r"weighting.scheme: Input should be 'uniform', 'critic', 'rho1' or 'grad_norm' \(got 'rho-1'\)"
    with pytest.raises(ConfigError, match=expected):
        load_config(recipe="rho1", overrides=["weighting.scheme=rho-1"])


def test_rho1_reads_its_config_section():
    config = Config()
    config.rho1.top_k_ratio, config.rho1.per_head, config.rho1.selection = 0.25, False, "soft"
    scheme = Rho1Weighting.from_config(config)
    assert (scheme.ratio, scheme.per_head, scheme.selection) == (0.25, False, "soft")


def test_head_discount_is_a_geometric_head_weighting():
    assert discounted_head_weights(4, 0.5) == [1.0, 0.5, 0.25, 0.125]
    assert discounted_head_weights(3, 1.0) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("seed", range(5))
def test_alignment_helpers_match_loops(seed):
    batch = random_batch(seed)
    labels = batch.labels
    n_heads = 3
    mask = head_target_mask(labels, n_heads)
    step = response_step_mask(labels)
    w = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed))
    spread = spread_over_heads(w, n_heads)
    rows, length = labels.shape
    for b in range(rows):
        for p in range(length):
            assert bool(step[b, p]) == (p + 1 < length and labels[b, p + 1] != -100)
            for k in range(1, n_heads + 1):
                assert bool(mask[b, p, k - 1]) == (p + k < length and labels[b, p + k] != -100)
                assert float(spread[b, p, k - 1]) == (float(w[b, p + k - 1]) if p + k - 1 < length else 0.0)


def test_weight_stats_against_numpy():
    weights = torch.rand(3, 7, 2, generator=torch.Generator().manual_seed(0)) * 3
    mask = torch.rand(3, 7, 2, generator=torch.Generator().manual_seed(1)) < 0.6
    stats = weight_stats(weights, mask)
    valid = weights.numpy().astype(np.float64)[mask.numpy()]
    p = valid / valid.sum()
    assert stats["mean"] == pytest.approx(valid.mean())
    assert stats["std"] == pytest.approx(valid.std())
    assert (stats["min"], stats["max"]) == (pytest.approx(valid.min()), pytest.approx(valid.max()))
    assert stats["entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(len(valid)))
    assert stats["tokens"] == len(valid)


def test_weight_stats_edge_cases():
    mask = torch.ones(1, 4, 1, dtype=torch.bool)
    assert weight_stats(torch.ones(1, 4, 1), mask)["entropy"] == pytest.approx(1.0)
    one_token = torch.tensor([0.0, 0.0, 5.0, 0.0]).view(1, 4, 1)
    assert weight_stats(one_token, mask)["entropy"] == pytest.approx(0.0)
    assert weight_stats(torch.ones(1, 4, 1), torch.zeros(1, 4, 1, dtype=torch.bool))["tokens"] == 0.0


def all_scheme_weights(batch: Batch, n_heads: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = batch.labels.shape
    values = torch.rand(shape, generator=generator) * 10  # large values where masked too
    reference_ce = torch.rand(*shape, n_heads, generator=generator) * 5
    masks = head_target_mask(batch.labels, n_heads)
    model_ce = (torch.rand(*shape, n_heads, generator=generator) * 5 + 100) * masks
    out = {"critic": CriticWeighting(clip_min=0.5).targets(values, batch.rewards, batch.labels, n_heads=n_heads).weights}
    for selection in ("top_k", "soft"):
        for per_head in (True, False):
            scheme = Rho1Weighting(selection=selection, per_head=per_head)
            weights, _ = scheme.weights(model_ce, reference_ce, batch.labels, n_heads=n_heads)
            out[f"rho1-{selection}-{per_head}"] = weights
    out["grad_norm"] = GradNormWeighting().weights(torch.rand(*shape, n_heads, generator=generator) * 3, batch.labels)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_every_scheme_is_zero_on_masked_targets(seed):
    batch = random_batch(seed)
    masks = head_target_mask(batch.labels, 3)
    for name, weights in all_scheme_weights(batch, 3).items():
        assert weights.shape == masks.shape, name
        assert (weights[~masks] == 0).all(), name
        assert torch.isfinite(weights).all(), name
        assert (weights[masks] >= 0).all(), name


def test_the_weight_histogram_counts_head_one_targets_by_label_and_bin():
    from weighted_mtp.objectives.base import WEIGHT_BIN_EDGES, weight_histogram_counts

    batch = random_batch(3)
    generator = torch.Generator().manual_seed(1)
    weights = torch.rand(*batch.labels.shape, 2, generator=generator, dtype=torch.float64) * 6
    weights[..., 0][weights[..., 0] < 0.5] = 0.0  # some weights of exactly 0
    counts = weight_histogram_counts(weights, batch.labels, batch.rewards)
    edges = np.array(WEIGHT_BIN_EDGES)
    for label, wanted in (("passing", True), ("failing", False)):
        values = [float(weights[b, t, 0]) for b in range(batch.labels.shape[0]) for t in range(batch.labels.shape[1] - 1)
                  if batch.labels[b, t + 1] != -100 and (float(batch.rewards[b]) > 0.5) == wanted]
        assert counts[f"{label}/0"] == sum(v == 0 for v in values)
        positive = np.clip([v for v in values if v > 0], edges[0], edges[-1] * 0.999999)
        expected, _ = np.histogram(positive, bins=edges)
        assert [counts[f"{label}/{i}"] for i in range(1, len(edges))] == list(expected)
