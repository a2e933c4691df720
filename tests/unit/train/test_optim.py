"""The learning-rate schedule and the optimizer's parameter groups."""

from __future__ import annotations

import itertools
import math

import pytest
from torch import nn

from weighted_mtp.train.optim import build_optimizer, build_scheduler, warmup_cosine


def reference_multiplier(step: int, warmup: int, total: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize(("warmup", "total", "floor"), [(0, 10, 0.1), (3, 20, 0.0), (5, 5, 0.5), (2, 7, 1.0)])
def test_warmup_cosine_shape(warmup: int, total: int, floor: float) -> None:
    values = [
        warmup_cosine(s, warmup_steps=warmup, total_steps=total, min_lr_ratio=floor) for s in range(total + 3)
    ]
    for step, value in enumerate(values):
        assert value == pytest.approx(reference_multiplier(step, warmup, total, floor))
    if warmup:
        assert values[warmup - 1] == pytest.approx(1.0)  # the peak is reached at the end of warmup
        assert all(a < b for a, b in itertools.pairwise(values[:warmup]))  # rising
    decay = values[warmup : total + 1]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(decay))  # then never rising
    if total > warmup:
        assert values[total] == pytest.approx(floor)
    assert values[-1] == pytest.approx(floor)  # stays at the floor past the planned end


def test_scheduler_drives_the_optimizer_lr() -> None:
    model = nn.Linear(4, 4)
    optimizer = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1e-2 * reference_multiplier(s, 2, 6, 0.1) for s in range(8)]
    assert seen == pytest.approx(expected)


def test_weight_decay_only_on_matrices_and_frozen_params_left_out() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    optimizer = build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[2].bias),
    }
    assert not optimizer.defaults["fused"]  # CPU: the foreach implementation


def test_nothing_to_train_is_an_error() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
