"""The learning-rate schedule and the optimizer's parameter groups."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
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
    assert optimizer.defaults["fused"]  # one kernel per parameter, on the CPU too


def test_nothing_to_train_is_an_error() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="nothing to train"):
        build_optimizer(model.named_parameters(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))


def reference_adamw(values, grads_per_step, *, lr, betas, eps, weight_decay):
    """AdamW as Loshchilov & Hutter write it, in float64: decoupled decay, bias-corrected moments."""
    values = values.double().clone()
    m = torch.zeros_like(values)
    v = torch.zeros_like(values)
    for step, grad in enumerate(grads_per_step, start=1):
        grad = grad.double()
        values *= 1 - lr * weight_decay
        m = betas[0] * m + (1 - betas[0]) * grad
        v = betas[1] * v + (1 - betas[1]) * grad**2
        m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
        values -= lr * m_hat / (v_hat.sqrt() + eps)
    return values


def test_the_optimizer_steps_as_adamw_does() -> None:
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5))
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    grads = {name: [torch.randn(p.shape, generator=generator) for _ in range(4)] for name, p in model.named_parameters()}
    for step in range(4):
        for name, p in model.named_parameters():
            p.grad = grads[name][step].clone()
        optimizer.step()
    for name, p in model.named_parameters():
        decay = 0.1 if p.ndim >= 2 else 0.0
        expected = reference_adamw(start[name], grads[name], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=decay)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)
