"""The critic report: same-problem AUCs against a plain loop over pairs, intervals, value summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from weighted_mtp.eval.critic_report import bootstrap_interval, critic_report, same_problem_auc


def naive_auc(scores, positive, negative, problems):
    wins, pairs = 0.0, 0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if positive[i] and negative[j] and problems[i] == problems[j]:
                pairs += 1
                wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return (wins / pairs if pairs else math.nan), pairs


@pytest.mark.parametrize("seed", range(5))
def test_same_problem_auc_equals_a_loop_over_pairs(seed):
    rng = np.random.default_rng(seed)
    n = 40
    scores = rng.integers(0, 5, n) / 4.0  # coarse values: ties happen
    positive = rng.random(n) < 0.4
    negative = ~positive & (rng.random(n) < 0.8)
    problems = [f"p{k}" for k in rng.integers(0, 6, n)]
    auc, pairs = same_problem_auc(scores, positive, negative, problems)
    expected_auc, expected_pairs = naive_auc(scores, positive, negative, problems)
    assert pairs == expected_pairs
    assert auc == pytest.approx(expected_auc, abs=1e-12)


def test_pairs_across_problems_do_not_count():
    # every positive beats every negative of the other problem, but loses within its own
    scores = [0.9, 1.0, 0.1, 0.2]
    positive = [True, False, True, False]
    negative = [False, True, False, True]
    assert same_problem_auc(scores, positive, negative, ["a", "a", "b", "b"]) == (0.0, 2)
    assert math.isnan(same_problem_auc(scores, positive, negative, ["a", "b", "c", "d"])[0])


def test_bootstrap_interval_brackets_the_estimate_and_is_reproducible():
    rng = np.random.default_rng(0)
    problems = [f"p{k // 4}" for k in range(80)]
    positive = [k % 4 == 0 for k in range(80)]
    negative = [not p for p in positive]
    scores = rng.normal(size=80) + np.array(positive) * 1.0
    auc, _ = same_problem_auc(scores, positive, negative, problems)
    low, high = bootstrap_interval(scores, positive, negative, problems, seed=3)
    assert low < auc < high and 0 <= low and high <= 1
    assert (low, high) == bootstrap_interval(scores, positive, negative, problems, seed=3)


def test_a_style_only_critic_shows_up_as_gold_auc_high_and_model_auc_at_chance():
    records, last, along = [], [], []
    for p in range(6):
        for source, ok, value in (("gold", True, 0.9), ("model", True, 0.2), ("model", False, 0.2)):
            records.append({"problem_id": f"p{p}", "is_correct": ok, "source": source})
            last.append(value)
            along.append(np.linspace(0.5, value, 20))
    report = critic_report(records, last, along)
    assert report.gold_auc == 1.0 and report.gold_pairs == 6
    assert report.model_auc == 0.5 and report.model_pairs == 6
    assert report.mean_value == {"gold correct": 0.9, "model correct": pytest.approx(0.2), "model incorrect": pytest.approx(0.2)}
    assert len(report.value_by_position["passing"]) == 10
    failing = report.value_by_position["failing"]
    assert failing[0] > 0.48 and failing[-1] < 0.22 and failing == sorted(failing, reverse=True)
