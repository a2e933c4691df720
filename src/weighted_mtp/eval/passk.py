"""The unbiased pass@k estimator (Chen et al. 2021) and a bootstrap confidence interval.

With n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the probability that at least one
of k samples drawn without replacement passes. It is computed as a running product, which stays
exact in floating point where the binomials would overflow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CI_METHOD = "percentile bootstrap over problems, 10000 resamples, 95%"


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@dataclass(frozen=True)
class PassAtK:
    k: int
    mean: float
    ci_low: float
    ci_high: float
    per_problem: tuple[float, ...]

    def to_dict(self) -> dict:
        return {"k": self.k, "mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "ci_method": CI_METHOD}


def pass_at_k_summary(
    n_samples: Sequence[int], n_correct: Sequence[int], k: int, *, resamples: int = 10_000, seed: int = 0
) -> PassAtK:
    """Mean pass@k over problems with a 95% percentile-bootstrap interval (problems resampled)."""
    if not n_samples:
        raise ValueError("no problems to score")
    scores = np.array([pass_at_k(n, c, k) for n, c in zip(n_samples, n_correct, strict=True)])
    rng = np.random.default_rng(seed)
    means = scores[rng.integers(0, len(scores), size=(resamples, len(scores)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return PassAtK(k, float(scores.mean()), float(low), float(high), tuple(float(s) for s in scores))


def exact_mcnemar_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value of two paired outcomes per problem: the discordant problems
    (solved by a only, by b only) against Binomial(n, 1/2)."""
    from math import comb

    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)
