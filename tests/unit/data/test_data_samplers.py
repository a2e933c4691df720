"""Every sampler's guarantees, checked against brute-force enumeration of what it may choose."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from weighted_mtp.data.samplers import difficulty_bin, select, shard
from weighted_mtp.errors import DataError

SAMPLERS = ("all", "correct_only", "difficulty_weighted", "pairs", "length_balanced_pairs")


def _same_problem(index, a, b) -> bool:
    return index.problem_of_line[a] == index.problem_of_line[b]


def test_correct_only_draws_every_correct_solution_once(synthetic_index):
    chosen = select(synthetic_index, "correct_only", seed=3)[:, 0]
    assert sorted(chosen.tolist()) == np.flatnonzero(synthetic_index.is_correct).tolist()


def test_n_samples_beyond_the_candidates_uses_all_before_repeating(synthetic_index):
    n_correct = int(synthetic_index.is_correct.sum())
    chosen = select(synthetic_index, "correct_only", seed=3, n_samples=n_correct + 5)[:, 0]
    assert len(chosen) == n_correct + 5
    assert len(set(chosen[:n_correct].tolist())) == n_correct
    assert synthetic_index.is_correct[chosen].all()


def test_all_includes_incorrect_solutions(synthetic_index):
    chosen = select(synthetic_index, "all", seed=0)[:, 0]
    assert sorted(chosen.tolist()) == list(range(len(synthetic_index)))


def test_difficulty_bins_follow_their_weights(synthetic_index):
    bins, weights = [0, 3, 7, 11], [0.1, 0.2, 0.3, 0.4]
    chosen = select(
        synthetic_index, "difficulty_weighted", seed=0, n_samples=20000, difficulty_bins=bins, difficulty_weights=weights
    )[:, 0]
    assert synthetic_index.is_correct[chosen].all()
    chosen_bins = difficulty_bin(synthetic_index.difficulty[synthetic_index.problem_of_line[chosen]], bins)
    # an independent binning of the same difficulties
    expected_bins = [max(i for i, edge in enumerate(bins) if d >= edge) if d >= bins[0] else 0
                     for d in synthetic_index.difficulty[synthetic_index.problem_of_line[chosen]]]
    assert chosen_bins.tolist() == expected_bins
    frequencies = np.bincount(chosen_bins, minlength=len(bins)) / len(chosen)
    np.testing.assert_allclose(frequencies, weights, atol=0.02)


def test_difficulty_weights_are_renormalised_over_non_empty_bins(synthetic_index):
    # no difficulty reaches 100, so the last bin is empty and its weight goes to the others
    chosen = select(
        synthetic_index, "difficulty_weighted", seed=1, n_samples=8000,
        difficulty_bins=[0, 7, 100], difficulty_weights=[1.0, 1.0, 2.0],
    )[:, 0]
    chosen_bins = difficulty_bin(synthetic_index.difficulty[synthetic_index.problem_of_line[chosen]], [0, 7, 100])
    np.testing.assert_allclose(np.bincount(chosen_bins, minlength=3) / len(chosen), [0.5, 0.5, 0.0], atol=0.03)


def _all_pairs(index, problem, bin_size=None):
    good, bad = index.correct_lines(problem), index.incorrect_lines(problem)
    lengths = index.token_lengths
    return {
        (int(c), int(i))
        for c, i in itertools.product(good, bad)
        if bin_size is None or lengths[c] // bin_size == lengths[i] // bin_size
    }


@pytest.mark.parametrize("max_pairs", [1, 3, 100])
def test_pairs_are_unique_same_problem_correct_then_incorrect(synthetic_index, max_pairs):
    chosen = select(synthetic_index, "pairs", seed=5, max_pairs_per_problem=max_pairs)
    assert chosen.shape[1] == 2
    assert synthetic_index.is_correct[chosen[:, 0]].all() and not synthetic_index.is_correct[chosen[:, 1]].any()
    assert all(_same_problem(synthetic_index, c, i) for c, i in chosen)
    assert len({tuple(p) for p in chosen.tolist()}) == len(chosen)
    for problem in range(synthetic_index.n_problems):
        candidates = _all_pairs(synthetic_index, problem)
        mine = {tuple(p) for p in chosen.tolist() if synthetic_index.problem_of_line[p[0]] == problem}
        assert mine <= candidates
        assert len(mine) == min(max_pairs, len(candidates))


@pytest.mark.parametrize("bin_size", [4, 16])
def test_length_balanced_pairs_share_a_length_bin(synthetic_index, bin_size):
    chosen = select(synthetic_index, "length_balanced_pairs", seed=2, max_pairs_per_problem=3, length_bin_size=bin_size)
    assert len(chosen) > 10
    lengths = synthetic_index.token_lengths
    assert (lengths[chosen[:, 0]] // bin_size == lengths[chosen[:, 1]] // bin_size).all()
    assert synthetic_index.is_correct[chosen[:, 0]].all() and not synthetic_index.is_correct[chosen[:, 1]].any()
    assert len({tuple(p) for p in chosen.tolist()}) == len(chosen)
    for problem in range(synthetic_index.n_problems):
        candidates = _all_pairs(synthetic_index, problem, bin_size)
        mine = {tuple(p) for p in chosen.tolist() if synthetic_index.problem_of_line[p[0]] == problem}
        assert mine <= candidates
        assert len(mine) == min(3, len(candidates))
    # the correct and incorrect halves have the same length-bin histogram
    assert sorted(lengths[chosen[:, 0]] // bin_size) == sorted(lengths[chosen[:, 1]] // bin_size)


def test_pairs_are_drawn_uniformly(synthetic_index):
    problem = max(range(synthetic_index.n_problems), key=lambda p: len(_all_pairs(synthetic_index, p)))
    candidates = sorted(_all_pairs(synthetic_index, problem))
    counts = dict.fromkeys(candidates, 0)
    draws = 400
    for seed in range(draws):
        for c, i in select(synthetic_index, "pairs", seed=seed, max_pairs_per_problem=1).tolist():
            if (c, i) in counts:
                counts[(c, i)] += 1
    expected = draws / len(candidates)
    assert sum(counts.values()) == draws
    assert all(abs(n - expected) < 5 * expected**0.5 + 2 for n in counts.values()), counts


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_sample_other_seed_or_epoch_another(synthetic_index, sampler):
    kwargs = {"difficulty_bins": [0, 5], "difficulty_weights": [0.5, 0.5], "length_bin_size": 16}
    first = select(synthetic_index, sampler, seed=11, **kwargs)
    assert np.array_equal(first, select(synthetic_index, sampler, seed=11, **kwargs))
    assert not np.array_equal(first, select(synthetic_index, sampler, seed=12, **kwargs))
    assert not np.array_equal(first, select(synthetic_index, sampler, seed=11, epoch=1, **kwargs))


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
@pytest.mark.parametrize("sampler", ["correct_only", "pairs"])
def test_rank_shards_are_disjoint_and_cover(synthetic_index, world_size, sampler):
    selection = select(synthetic_index, sampler, seed=0)
    parts = [shard(selection, rank, world_size) for rank in range(world_size)]
    as_units = [[tuple(u) for u in part.tolist()] for part in parts]
    assert sum(len(p) for p in as_units) == len(selection)
    assert sorted(itertools.chain(*as_units)) == sorted(tuple(u) for u in selection.tolist())
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_n_samples_counts_sequences_for_pairs(synthetic_index):
    assert len(select(synthetic_index, "pairs", seed=0, n_samples=6)) == 3


def test_empty_selections_are_data_errors(tmp_path, tokenizer):
    from weighted_mtp.data.prepare import write_processed_split
    from weighted_mtp.data.sources import Problem

    only_correct = [Problem("p/1", "task", correct=["print(1)", "print(2)"])]
    index = write_processed_split(only_correct, tmp_path, "train", tokenizer, dataset="t")
    with pytest.raises(DataError, match=r"train\.jsonl: empty selection: no problem has both"):
        select(index, "pairs", seed=0)
    with pytest.raises(DataError, match="same 32-token length bin"):
        select(index, "length_balanced_pairs", seed=0)
    only_wrong = [Problem("p/1", "task", incorrect=["print(0)"])]
    index = write_processed_split(only_wrong, tmp_path, "bad", tokenizer, dataset="t")
    with pytest.raises(DataError, match="no correct solutions"):
        select(index, "correct_only", seed=0)
    with pytest.raises(DataError, match="no correct solutions"):
        select(index, "difficulty_weighted", seed=0)
    with pytest.raises(DataError, match="unknown sampler"):
        select(index, "bogus", seed=0)
