"""How well a critic tells passing from failing solutions, measured where it counts.

A critic trained on rollouts that include gold solutions can score well by recognising the gold
*style* (the dataset author's code) against the model's, without knowing anything about
correctness. So the held-out ROC AUC is reported two ways, each over pairs of the same problem:

- (a) `model_auc`: a correct model sample against an incorrect model sample (same style: this is the
  critic's real skill, and near 0.5 if it only knows style);
- (b) `gold_auc`: the gold solution against an incorrect model sample (style and correctness mixed).

A sample's score is the value at its last response step (the state before its final token), as in
the critic's validation AUC. Also reported: the mean value by source and label, and the mean value
along the response (ten bins of relative position) for passing and failing samples, which should
rise towards 1 along passing solutions and fall along failing ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

POSITION_BINS = 10


def _problem_wins(
    scores: Sequence[float], positive: Sequence[bool], negative: Sequence[bool], problems: Sequence[str]
) -> np.ndarray:
    """[problems with a pair, 2]: per problem, the wins (ties one half) of its positives over its
    negatives, and its number of (positive, negative) pairs."""
    scores_a = np.asarray(scores, dtype=np.float64)
    pos, neg = np.asarray(positive, dtype=bool), np.asarray(negative, dtype=bool)
    groups = np.asarray(problems)
    rows = []
    for problem in np.unique(groups):
        here = groups == problem
        p, n = scores_a[here & pos], scores_a[here & neg]
        if len(p) and len(n):
            diff = p[:, None] - n[None, :]
            rows.append((float((diff > 0).sum() + 0.5 * (diff == 0).sum()), diff.size))
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def same_problem_auc(
    scores: Sequence[float], positive: Sequence[bool], negative: Sequence[bool], problems: Sequence[str]
) -> tuple[float, int]:
    """P(score of a positive > score of a negative of the same problem), ties counting one half,
    over every such pair; and the number of pairs (NaN, 0 without any)."""
    wins, pairs = _problem_wins(scores, positive, negative, problems).sum(axis=0)
    return (float(wins / pairs) if pairs else float("nan")), int(pairs)


def bootstrap_interval(
    scores: Sequence[float], positive: Sequence[bool], negative: Sequence[bool], problems: Sequence[str],
    *, resamples: int = 1000, seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of `same_problem_auc` over problems drawn with replacement."""
    per_problem = _problem_wins(scores, positive, negative, problems)
    if len(per_problem) == 0:
        return float("nan"), float("nan")
    wins, sizes = per_problem.T
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(wins), size=(resamples, len(wins)))
    aucs = wins[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(aucs, tail)), float(np.quantile(aucs, 1 - tail))


@dataclass
class CriticReport:
    model_auc: float
    model_auc_ci: tuple[float, float]
    model_pairs: int
    gold_auc: float
    gold_auc_ci: tuple[float, float]
    gold_pairs: int
    n_samples: int
    n_problems: int
    mean_value: dict[str, float] = field(default_factory=dict)  # "model correct", "gold correct", ...
    value_by_position: dict[str, list[float]] = field(default_factory=dict)  # "passing"/"failing" -> bins

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_records(
    model: torch.nn.Module,
    value_head: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[dict],
    *,
    template: str,
    max_length: int,
    value_kind: str = "mse",
    batch_size: int = 8,
) -> tuple[list[float], list[np.ndarray]]:
    """Each record's last-step value and its values at every response step, in record order."""
    from weighted_mtp.data.collate import collate, example_from_record
    from weighted_mtp.data.templates import prompt_adds_bos, render
    from weighted_mtp.objectives.critic import value_estimates
    from weighted_mtp.weighting import response_step_mask

    device = model.tok_embeddings.weight.device
    last_values: list[float] = []
    step_values: list[np.ndarray] = []
    model.eval()
    value_head.eval()
    with torch.inference_mode():
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            examples = [
                example_from_record(r, *render(template, r, tokenizer), tokenizer, max_length,
                                    add_bos=prompt_adds_bos(template))
                for r in chunk
            ]
            batch = collate(examples, tokenizer.pad_id)
            hidden = model.trunk_forward(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
            raw = value_head(hidden).float().cpu()
            values = value_estimates(raw, value_kind)
            steps = response_step_mask(batch.labels)
            for row in range(len(chunk)):
                along = values[row][steps[row]].double().numpy()
                step_values.append(along)
                last_values.append(float(along[-1]) if len(along) else float("nan"))
    return last_values, step_values


def critic_report(records: Sequence[dict], last_values: Sequence[float], step_values: Sequence[np.ndarray]) -> CriticReport:
    """The report from scored records (their `problem_id`, `is_correct` and `source`)."""
    keep = [i for i, v in enumerate(last_values) if np.isfinite(v)]
    records = [records[i] for i in keep]
    scores = [last_values[i] for i in keep]
    steps = [step_values[i] for i in keep]
    problems = [str(r["problem_id"]) for r in records]
    source = [r.get("source", "model") for r in records]
    correct = [bool(r["is_correct"]) for r in records]
    model_correct = [c and s == "model" for c, s in zip(correct, source)]
    model_incorrect = [(not c) and s == "model" for c, s in zip(correct, source)]
    gold_correct = [c and s == "gold" for c, s in zip(correct, source)]

    model_auc, model_pairs = same_problem_auc(scores, model_correct, model_incorrect, problems)
    gold_auc, gold_pairs = same_problem_auc(scores, gold_correct, model_incorrect, problems)
    mean_value: dict[str, float] = {}
    for name in sorted({(s, c) for s, c in zip(source, correct)}):
        members = [v for v, s, c in zip(scores, source, correct) if (s, c) == name]
        mean_value[f"{name[0]} {'correct' if name[1] else 'incorrect'}"] = float(np.mean(members))
    by_position: dict[str, list[float]] = {}
    for label, wanted in (("passing", True), ("failing", False)):
        sums, counts = np.zeros(POSITION_BINS), np.zeros(POSITION_BINS)
        for along, ok in zip(steps, correct):
            if ok != wanted or len(along) == 0:
                continue
            bins = np.minimum((np.arange(len(along)) * POSITION_BINS) // len(along), POSITION_BINS - 1)
            np.add.at(sums, bins, along)
            np.add.at(counts, bins, 1)
        if counts.any():
            by_position[label] = [float(s / c) if c else float("nan") for s, c in zip(sums, counts)]
    return CriticReport(
        model_auc=model_auc,
        model_auc_ci=bootstrap_interval(scores, model_correct, model_incorrect, problems),
        model_pairs=model_pairs,
        gold_auc=gold_auc,
        gold_auc_ci=bootstrap_interval(scores, gold_correct, model_incorrect, problems),
        gold_pairs=gold_pairs,
        n_samples=len(records),
        n_problems=len(set(problems)),
        mean_value=mean_value,
        value_by_position=by_position,
    )


def evaluate_critic(config, critic_dir, records: Sequence[dict], *, batch_size: int = 8) -> CriticReport:
    """Load the critic exported in `critic_dir` (its trunk and value head) and report on `records`."""
    from weighted_mtp.config import load_saved_config
    from weighted_mtp.models.loading import load_model, resolve_device
    from weighted_mtp.models.value_head import load_value_head

    critic = load_saved_config(critic_dir / "config.yaml")
    model, tokenizer = load_model(critic_dir, models_dir=config.paths.models, device=resolve_device(config.device))
    head = load_value_head(critic_dir, critic, model.args.dim).to(model.tok_embeddings.weight.device)
    last, along = score_records(
        model, head, tokenizer, records, template=critic.data.prompt_template, max_length=critic.data.max_length,
        value_kind=critic.stage1.loss, batch_size=batch_size,
    )
    return critic_report(records, last, along)
