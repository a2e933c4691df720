"""Samplers: choose solution lines from a split's index alone, never touching the data.

Each sampler returns a `Selection`, an int64 array of line numbers shaped [n, 1] for single
solutions or [n, 2] for (correct, incorrect) pairs. The same index, arguments and generator seed
give the same selection. `shard` splits a selection between distributed ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from weighted_mtp.data.index import SplitIndex
from weighted_mtp.errors import DataError

SAMPLERS = ("all", "correct_only", "difficulty_weighted", "pairs", "length_balanced_pairs")


PAIR_REMEDY = (
    "for more pairs, roll out more samples (rollout.n_samples, --n-samples), sample at a higher "
    "rollout.temperature, keep each problem's gold solution (wmtp rollout adds it unless --no-gold), "
    "or use data.sampler=pairs (no length bins)"
)


def _empty(index: SplitIndex, what: str, remedy: str = "") -> DataError:
    return DataError(f"{index.paths.jsonl}: empty selection: {what}" + (f"; {remedy}" if remedy else ""))


def _draw(candidates: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """`n` of the candidates in random order; all of them when n is None.

    Asking for more than there are repeats the candidates, each pass a fresh permutation, so every
    candidate is used before any is used again.
    """
    if n is None:
        return rng.permutation(candidates)
    if n <= 0:
        return candidates[:0]
    passes = [rng.permutation(candidates) for _ in range(-(-n // len(candidates)))]
    return np.concatenate(passes)[:n]


def select_all(index: SplitIndex, *, n_samples: int | None, rng: np.random.Generator) -> np.ndarray:
    """Every solution, correct or not (rewards tell them apart)."""
    if len(index) == 0:
        raise _empty(index, "the split has no solutions")
    return _draw(np.arange(len(index), dtype=np.int64), n_samples, rng)[:, None]


def correct_only(index: SplitIndex, *, n_samples: int | None, rng: np.random.Generator) -> np.ndarray:
    """Correct solutions only, uniformly: supervised fine-tuning on code that passes its tests."""
    candidates = np.flatnonzero(index.is_correct)
    if len(candidates) == 0:
        raise _empty(index, "no correct solutions")
    return _draw(candidates, n_samples, rng)[:, None]


def difficulty_bin(difficulty: np.ndarray, bins: Sequence[int]) -> np.ndarray:
    """Bin number of each difficulty: bin i holds [bins[i], bins[i+1]); below bins[0] counts as bin 0."""
    edges = np.asarray(bins, dtype=np.int64)
    if len(edges) == 0 or np.any(np.diff(edges) <= 0):
        raise DataError(f"data.difficulty_bins must be increasing lower edges, got {list(bins)}")
    return np.clip(np.searchsorted(edges, difficulty, side="right") - 1, 0, len(edges) - 1)


def difficulty_weighted(
    index: SplitIndex,
    *,
    bins: Sequence[int],
    weights: Sequence[float],
    n_samples: int | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Correct solutions drawn so that bin b makes up weights[b] of the sample.

    The count per bin is multinomial(n, weights renormalised over bins that have solutions); within
    a bin solutions are drawn without repeats until the bin is used up.
    """
    if len(bins) != len(weights):
        raise DataError(f"data.difficulty_bins has {len(bins)} entries but data.difficulty_weights has {len(weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"data.difficulty_weights must be non-negative with a positive sum, got {list(weights)}")
    candidates = np.flatnonzero(index.is_correct)
    if len(candidates) == 0:
        raise _empty(index, "no correct solutions")
    line_bins = difficulty_bin(index.difficulty[index.problem_of_line[candidates]], bins)
    members = [candidates[line_bins == b] for b in range(len(bins))]
    p = np.array([w if len(m) else 0.0 for w, m in zip(weights, members)], dtype=np.float64)
    if p.sum() == 0:
        raise _empty(index, f"no correct solution falls in a difficulty bin with positive weight ({list(weights)})")
    p /= p.sum()
    n = len(candidates) if n_samples is None else n_samples
    counts = rng.multinomial(n, p)
    chosen = [_draw(m, int(c), rng) for m, c in zip(members, counts) if c > 0]
    return rng.permutation(np.concatenate(chosen))[:, None]


def _distinct_pairs(n_left: int, n_right: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k distinct (i, j) with i < n_left, j < n_right, uniformly without replacement."""
    flat = rng.choice(n_left * n_right, size=min(k, n_left * n_right), replace=False)
    return flat // n_right, flat % n_right


def pairs(index: SplitIndex, *, max_pairs_per_problem: int, n_samples: int | None, rng: np.random.Generator) -> np.ndarray:
    """Unique (correct, incorrect) pairs of the same problem, at most `max_pairs_per_problem` each."""
    chosen = []
    for problem in np.flatnonzero((index.n_correct > 0) & (index.n_incorrect > 0)):
        good, bad = index.correct_lines(problem), index.incorrect_lines(problem)
        i, j = _distinct_pairs(len(good), len(bad), max_pairs_per_problem, rng)
        chosen.append(np.stack([good[i], bad[j]], axis=1))
    if not chosen:
        raise _empty(index, "no problem has both a correct and an incorrect solution (pairs need both)", PAIR_REMEDY)
    return _limit(rng.permutation(np.concatenate(chosen)), n_samples)


def length_balanced_pairs(
    index: SplitIndex,
    *,
    max_pairs_per_problem: int,
    length_bin_size: int,
    n_samples: int | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Unique pairs whose two responses fall in the same token-length bin (length // length_bin_size).

    Across the selection, correct and incorrect responses then have the same length histogram at
    bin resolution, so a critic cannot tell them apart by length alone. Pairs are drawn uniformly
    from all same-bin pairs of a problem.
    """
    if length_bin_size <= 0:
        raise DataError(f"data.length_bin_size must be positive, got {length_bin_size}")
    lengths = index.token_lengths
    chosen = []
    for problem in np.flatnonzero((index.n_correct > 0) & (index.n_incorrect > 0)):
        good, bad = index.correct_lines(problem), index.incorrect_lines(problem)
        good_bins, bad_bins = lengths[good] // length_bin_size, lengths[bad] // length_bin_size
        shared = np.intersect1d(good_bins, bad_bins)
        if len(shared) == 0:
            continue
        groups = [(good[good_bins == b], bad[bad_bins == b]) for b in shared]
        sizes = np.array([len(g) * len(b) for g, b in groups])
        starts = np.concatenate([[0], np.cumsum(sizes)])
        flat = rng.choice(int(starts[-1]), size=min(max_pairs_per_problem, int(starts[-1])), replace=False)
        group_of = np.searchsorted(starts, flat, side="right") - 1
        for g, within in zip(group_of, flat - starts[group_of]):
            group_good, group_bad = groups[g]
            chosen.append((group_good[within // len(group_bad)], group_bad[within % len(group_bad)]))
    if not chosen:
        raise _empty(
            index,
            f"no problem has a correct and an incorrect solution in the same {length_bin_size}-token length bin",
            PAIR_REMEDY.replace(" (no length bins)", " (no length bins) or a larger data.length_bin_size"),
        )
    return _limit(rng.permutation(np.array(chosen, dtype=np.int64)), n_samples)


def _limit(selected: np.ndarray, n_samples: int | None) -> np.ndarray:
    """n_samples counts sequences, so a pair selection keeps n_samples // 2 pairs."""
    if n_samples is None:
        return selected
    return selected[: max(1, n_samples // selected.shape[1])]


def select(
    index: SplitIndex,
    sampler: str,
    *,
    seed: int,
    epoch: int = 0,
    n_samples: int | None = None,
    max_pairs_per_problem: int = 4,
    difficulty_bins: Sequence[int] = (0,),
    difficulty_weights: Sequence[float] = (1.0,),
    length_bin_size: int = 32,
) -> np.ndarray:
    """Run the named sampler with a generator seeded by (seed, epoch)."""
    rng = np.random.default_rng([seed, epoch])
    if sampler == "all":
        return select_all(index, n_samples=n_samples, rng=rng)
    if sampler == "correct_only":
        return correct_only(index, n_samples=n_samples, rng=rng)
    if sampler == "difficulty_weighted":
        return difficulty_weighted(
            index, bins=difficulty_bins, weights=difficulty_weights, n_samples=n_samples, rng=rng
        )
    if sampler == "pairs":
        return pairs(index, max_pairs_per_problem=max_pairs_per_problem, n_samples=n_samples, rng=rng)
    if sampler == "length_balanced_pairs":
        return length_balanced_pairs(
            index,
            max_pairs_per_problem=max_pairs_per_problem,
            length_bin_size=length_bin_size,
            n_samples=n_samples,
            rng=rng,
        )
    raise DataError(f"data.sampler: unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")


def shard(selection: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's part: every world_size-th unit from `rank`. Parts are disjoint and cover the selection."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return selection[rank::world_size]
