"""pass@k against the combinatorial definition and an explicit enumeration of k-subsets."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from weighted_mtp.eval.passk import pass_at_k, pass_at_k_summary


def pass_at_k_by_comb(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """The definition: the fraction of k-subsets of the n samples with at least one correct."""
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)


def test_known_values() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 5) == 1.0
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)


def test_matches_enumeration_on_small_cases() -> None:
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_enumeration(n, c, k), abs=1e-12)


def test_matches_math_comb_on_random_cases() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 300)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert pass_at_k(n, c, k) == pytest.approx(pass_at_k_by_comb(n, c, k), rel=1e-9, abs=1e-12)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_summary_mean_and_interval() -> None:
    rng = random.Random(1)
    n = [10] * 50
    c = [rng.randint(0, 10) for _ in n]
    summary = pass_at_k_summary(n, c, 5)
    expected = np.mean([pass_at_k_by_comb(10, ci, 5) for ci in c])
    assert summary.mean == pytest.approx(expected)
    assert summary.ci_low <= summary.mean <= summary.ci_high
    assert summary.ci_high - summary.ci_low > 0
    assert summary == pass_at_k_summary(n, c, 5)  # seeded
    sd = np.std([pass_at_k_by_comb(10, ci, 5) for ci in c], ddof=1) / np.sqrt(len(c))
    assert summary.ci_high - summary.ci_low == pytest.approx(2 * 1.96 * sd, rel=0.15)  # agrees with the normal approximation
    degenerate = pass_at_k_summary([3, 3], [3, 3], 1)
    assert (degenerate.mean, degenerate.ci_low, degenerate.ci_high) == (1.0, 1.0, 1.0)
