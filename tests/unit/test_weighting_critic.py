"""Critic weighting: GAE, z-score/exp/clip, head mapping and value losses vs plain loops/numpy."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from weighted_mtp.weighting import (
    CriticWeighting,
    critic_pretrain_loss,
    critic_targets,
    gae_advantages,
    response_step_mask,
    value_loss,
)
from weighted_mtp.weighting.critic import advantage_token_weights, last_true


def random_labels(rng: random.Random, batch: int, length: int, *, gaps: bool = False) -> torch.Tensor:
    """Right-padded rows: a prompt (-100), a response of random length (maybe 0), then padding."""
    labels = torch.full((batch, length), -100, dtype=torch.long)
    for b in range(batch):
        prompt = rng.randint(0, length - 1)
        response = rng.randint(0, length - prompt)
        for t in range(prompt, prompt + response):
            if not gaps or rng.random() > 0.25:
                labels[b, t] = rng.randint(0, 99)
    return labels


def reference_gae(values, rewards, labels, gamma, lam, dtype=torch.float32):
    """Plain Python on lists: list the steps of each row, then the GAE sum as a double loop."""
    batch, length = len(labels), len(labels[0])
    advantages = [[0.0] * length for _ in range(batch)]
    returns = [[0.0] * length for _ in range(batch)]
    for b in range(batch):
        steps = [p for p in range(length - 1) if labels[b][p + 1] != -100]
        n = len(steps)
        v = [float(values[b][p]) for p in steps] + [0.0]
        r = [0.0] * n
        if n:
            r[-1] = float(rewards[b])
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(n)]
        for i in range(n):
            a = sum((gamma * lam) ** l * deltas[i + l] for l in range(n - i))
            advantages[b][steps[i]] = a
            returns[b][steps[i]] = a + v[i]
    return torch.tensor(advantages, dtype=dtype), torch.tensor(returns, dtype=dtype)


KNOBS = dict(
    gamma=0.99, lam=0.95, temperature=1.0, normalization="zscore", transform="exp", clip_min=0.1, clip_max=3.0,
    weight_normalization="mean1",
)


def random_case(seed: int, *, gaps: bool = False):
    rng = random.Random(seed)
    batch, length = rng.randint(1, 6), rng.randint(2, 40)
    labels = random_labels(rng, batch, length, gaps=gaps)
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(batch, length, generator=generator)
    rewards = torch.randint(0, 2, (batch,), generator=generator).float()
    return rng, labels, values, rewards


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("gaps", [False, True])
def test_gae_matches_double_loop(seed, gaps):
    rng, labels, values, rewards = random_case(seed, gaps=gaps)
    for gamma, lam in [(rng.random(), rng.random()), (1.0, 1.0), (1.0, 0.0), (rng.random(), 1.0), (0.0, 0.5)]:
        mask = response_step_mask(labels)
        advantages, returns = gae_advantages(values, rewards, mask, gamma=gamma, lam=lam)
        expected_a, expected_r = reference_gae(values.tolist(), rewards.tolist(), labels.tolist(), gamma, lam)
        torch.testing.assert_close(advantages, expected_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(returns, expected_r, atol=1e-5, rtol=1e-5)
        assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


@pytest.mark.parametrize("seed", range(5))
def test_gamma_lambda_one_gives_monte_carlo_returns(seed):
    _, labels, values, rewards = random_case(seed)
    mask = response_step_mask(labels)
    _, returns = gae_advantages(values, rewards, mask, gamma=1.0, lam=1.0)
    expected = rewards[:, None].expand_as(values)
    torch.testing.assert_close(returns[mask], expected[mask])


def test_lambda_zero_gives_one_step_td_errors():
    labels = torch.tensor([[-100, -100, 5, 6, 7, -100], [-100, 1, 2, 3, 4, 5]])
    values = torch.tensor([[9.0, 0.2, 0.4, 0.6, 9.0, 9.0], [0.1, 0.3, 0.5, 0.7, 0.9, 9.0]])
    rewards = torch.tensor([1.0, 0.0])
    advantages, _ = gae_advantages(values, rewards, response_step_mask(labels), gamma=0.9, lam=0.0)
    # row 0: steps at positions 1, 2, 3 (tokens 2, 3, 4); the last step is paid R and ends.
    expected_row0 = [0.0, 0.9 * 0.4 - 0.2, 0.9 * 0.6 - 0.4, 1.0 - 0.6, 0.0, 0.0]
    expected_row1 = [0.9 * 0.3 - 0.1, 0.9 * 0.5 - 0.3, 0.9 * 0.7 - 0.5, 0.9 * 0.9 - 0.7, 0.0 - 0.9, 0.0]
    torch.testing.assert_close(advantages, torch.tensor([expected_row0, expected_row1]))


def test_values_do_not_leak_from_padding_or_prompt():
    _, labels, values, rewards = random_case(3)
    mask = response_step_mask(labels)
    noisy = values.clone()
    noisy[~mask] = 1e6
    a, r = gae_advantages(values, rewards, mask, gamma=0.97, lam=0.9)
    a2, r2 = gae_advantages(noisy, rewards, mask, gamma=0.97, lam=0.9)
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(r, r2)


def reference_token_weights(scores, mask, temperature, normalization, transform, clip_min, clip_max, weight_normalization):
    """Plain loops over rows and steps, in float64."""
    batch, length = mask.shape
    steps = [(b, t) for b in range(batch) for t in range(length) if mask[b, t]]
    s = {bt: float(scores[bt]) for bt in steps}
    if normalization == "zscore" and steps:
        mean = sum(s.values()) / len(s)
        std = math.sqrt(sum((x - mean) ** 2 for x in s.values()) / len(s))
        s = {bt: (x - mean) / (std + 1e-8) for bt, x in s.items()}
    w = {}
    for b in range(batch):
        row = [t for t in range(length) if mask[b, t]]
        if transform == "exp":
            w.update({(b, t): math.exp(s[b, t] / temperature) for t in row})
        elif row:
            top = max(s[b, t] / temperature for t in row)
            total = sum(math.exp(s[b, t] / temperature - top) for t in row)
            w.update({(b, t): len(row) * math.exp(s[b, t] / temperature - top) / total for t in row})
    w = {bt: min(max(x, clip_min), clip_max) for bt, x in w.items()}
    if weight_normalization == "mean1" and w:
        mean = sum(w.values()) / len(w)
        w = {bt: x / mean for bt, x in w.items()}
    out = torch.zeros(batch, length, dtype=torch.float64)
    for bt, x in w.items():
        out[bt] = x
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("normalization", ["zscore", "none"])
@pytest.mark.parametrize("transform", ["exp", "softmax"])
@pytest.mark.parametrize("weight_normalization", ["mean1", "none"])
def test_token_weights_match_plain_loops_in_float64(seed, normalization, transform, weight_normalization):
    rng, labels, values, rewards = random_case(seed, gaps=seed % 2 == 1)
    mask = response_step_mask(labels)
    scores = torch.randn(values.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2
    knobs = dict(
        temperature=rng.uniform(0.3, 2.0), normalization=normalization, transform=transform,
        clip_min=rng.uniform(0.0, 0.5), clip_max=rng.uniform(1.5, 4.0), weight_normalization=weight_normalization,
    )
    weights = advantage_token_weights(scores, mask, **knobs)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, reference_token_weights(scores, mask, **knobs), rtol=1e-9, atol=1e-12)
    if weight_normalization == "mean1" and mask.any():
        assert float(weights[mask].mean()) == pytest.approx(1.0, abs=1e-12)


def reference_critic_delta(values, rewards, labels):
    """V of the next step minus V of this one; after the last step the reward (or no change if NaN)."""
    batch, length = len(labels), len(labels[0])
    out = [[0.0] * length for _ in range(batch)]
    for b in range(batch):
        steps = [p for p in range(length - 1) if labels[b][p + 1] != -100]
        for i, p in enumerate(steps):
            if i + 1 < len(steps):
                after = float(values[b][steps[i + 1]])
            else:
                after = float(values[b][p]) if math.isnan(float(rewards[b])) else float(rewards[b])
            out[b][p] = after - float(values[b][p])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(10))
def test_critic_delta_scores_match_a_plain_loop(seed):
    from weighted_mtp.weighting.critic import critic_delta_scores

    _, labels, values, rewards = random_case(seed, gaps=seed % 2 == 1)
    values, rewards = values.double(), rewards.double()
    if seed % 3 == 0:
        rewards[0] = float("nan")  # unknown reward: the last step changes nothing
    scores = critic_delta_scores(values, rewards, response_step_mask(labels))
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, reference_critic_delta(values.tolist(), rewards.tolist(), labels.tolist()))


@pytest.mark.parametrize("scorer", ["gae", "critic_delta"])
def test_critic_targets_score_with_the_chosen_scorer_and_keep_float64(scorer):
    from weighted_mtp.weighting.critic import critic_delta_scores

    _, labels, values, rewards = random_case(3)
    values, rewards = values.double(), rewards.double()
    out = critic_targets(values, rewards, labels, n_heads=2, scorer=scorer, **KNOBS)
    mask = response_step_mask(labels)
    expected = critic_delta_scores(values, rewards, mask) if scorer == "critic_delta" else gae_advantages(
        values, rewards, mask, gamma=KNOBS["gamma"], lam=KNOBS["lam"]
    )[0]
    torch.testing.assert_close(out.advantages, expected)
    assert out.advantages.dtype == out.returns.dtype == out.weights.dtype == torch.float64


def test_extreme_advantages_clip_instead_of_overflowing():
    advantages = torch.tensor([[1e4, -1e4, 0.0]])
    mask = torch.tensor([[True, True, True]])
    w = advantage_token_weights(
        advantages, mask, temperature=0.01, normalization="none", transform="exp", clip_min=0.1, clip_max=3.0,
        weight_normalization="none",
    )
    assert w.tolist() == [[3.0, pytest.approx(0.1), 1.0]]


@pytest.mark.parametrize("seed", range(10))
def test_critic_weights_per_head_follow_the_target_token(seed):
    rng, labels, values, rewards = random_case(seed, gaps=seed % 2 == 1)
    n_heads = rng.randint(1, 4)
    out = critic_targets(values, rewards, labels, n_heads=n_heads, scorer="gae", **KNOBS)
    batch, length = labels.shape
    for b in range(batch):
        # weight of the token at index j is stored where head 1 predicts it: position j-1
        token_weight = {j: float(out.token_weights[b, j - 1]) for j in range(1, length)}
        for p in range(length):
            for k in range(1, n_heads + 1):
                j = p + k
                expected = token_weight[j] if j < length and labels[b, j] != -100 else 0.0
                assert float(out.weights[b, p, k - 1]) == pytest.approx(expected)


def test_weighting_reads_its_config_section():
    from weighted_mtp.config.schema import Config

    config = Config()
    config.stage2.value_weighting.weight_clip_max = 2.0
    scheme = CriticWeighting.from_config(config)
    assert scheme.clip_max == 2.0

    _, labels, values, rewards = random_case(7)
    weights = scheme.targets(values, rewards, labels, n_heads=3).weights
    assert weights.shape == (*labels.shape, 3)
    from weighted_mtp.weighting import head_target_mask

    mask = head_target_mask(labels, 3)
    targets = scheme.targets(values, rewards, labels, n_heads=3)
    stats = scheme.stats(targets, mask)
    assert stats["mean"] == pytest.approx(1.0, abs=0.3)  # mean 1 over the steps; heads see shifted subsets
    assert 0.0 <= stats["clipped_low"] <= 1.0 and 0.0 <= stats["clipped_high"] <= 1.0


def reference_value_loss(values, old_values, returns, mask, clip_range):
    terms = []
    columns = (values, old_values, returns, mask)
    for v, o, g, m in zip(*(c.flatten().tolist() for c in columns)):
        if not m:
            continue
        unclipped = (v - g) ** 2
        if clip_range is None:
            terms.append(unclipped)
        else:
            v_clipped = o + min(max(v - o, -clip_range), clip_range)
            terms.append(max(unclipped, (v_clipped - g) ** 2))
    return 0.5 * sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("clip_range", [0.2, 0.05, None])
def test_value_loss_matches_hand_written(seed, clip_range):
    _, labels, old_values, rewards = random_case(seed)
    mask = response_step_mask(labels)
    _, returns = gae_advantages(old_values, rewards, mask, gamma=1.0, lam=0.95)
    values = (old_values + 0.3 * torch.randn(old_values.shape, generator=torch.Generator().manual_seed(seed)))
    values.requires_grad_(True)
    loss = value_loss(values, old_values, returns, mask, clip_range)
    expected = reference_value_loss(values.detach(), old_values, returns, mask, clip_range)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    loss.backward()
    assert (values.grad[~mask] == 0).all()


def test_value_loss_gradient_stops_where_the_clipped_term_wins():
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[0.5, -0.5]], requires_grad=True)
    value_loss(values, old, returns, torch.ones(1, 2, dtype=torch.bool), 0.2).backward()
    # first: moved 0.5 toward the return, clipped to 0.2 -> clipped error is larger, no gradient.
    # second: moved away, unclipped error is larger -> gradient 0.5 * 2 * (v - G) / 2 tokens.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5 * (-0.5 - 1.0)]]))


def test_empty_mask_gives_zero_loss_that_backpropagates():
    values = torch.randn(2, 5, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    loss = value_loss(values, values.detach(), torch.zeros(2, 5), mask, 0.2)
    loss.backward()
    assert loss.item() == 0.0 and (values.grad == 0).all()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["mse", "bce"])
@pytest.mark.parametrize("reward_on", ["every_token", "last_token"])
def test_critic_pretrain_loss_matches_hand_written(seed, kind, reward_on):
    _, labels, _, rewards = random_case(seed)
    mask = response_step_mask(labels)
    values = torch.randn(labels.shape, generator=torch.Generator().manual_seed(seed))
    loss = critic_pretrain_loss(values, rewards, mask, kind=kind, reward_on=reward_on)
    terms = []
    for b in range(labels.shape[0]):
        positions = [p for p in range(labels.shape[1]) if mask[b, p]]
        if reward_on == "last_token":
            positions = positions[-1:]
        for p in positions:
            v, r = float(values[b, p]), float(rewards[b])
            if kind == "mse":
                terms.append((v - r) ** 2)
            else:
                s = 1 / (1 + math.exp(-v))
                terms.append(-(r * math.log(s) + (1 - r) * math.log(1 - s)))
    expected = sum(terms) / len(terms) if terms else 0.0
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_last_true_keeps_only_the_final_position():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.tensor([[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(last_true(mask), expected)


def test_unknown_options_are_refused():
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="reward_on"):
        critic_pretrain_loss(torch.zeros(1, 3), torch.ones(1), mask, reward_on="first_token")
    with pytest.raises(ValueError, match="critic loss"):
        critic_pretrain_loss(torch.zeros(1, 3), torch.ones(1), mask, kind="hinge")
    with pytest.raises(ValueError, match="normalization"):
        advantage_token_weights(
            torch.zeros(1, 3), mask, temperature=1.0, normalization="rank", transform="exp", clip_min=0, clip_max=1,
            weight_normalization="none",
        )
    for knob, value in (("transform", "tanh"), ("weight_normalization", "sum1")):
        with pytest.raises(ValueError, match=knob.split("_")[0]):
            advantage_token_weights(torch.zeros(1, 3), mask, **{**dict(
                temperature=1.0, normalization="none", transform="exp", clip_min=0, clip_max=1,
                weight_normalization="none"), knob: value})


def test_bce_matches_torch_on_logits():
    values = torch.tensor([[0.3, -1.2, 2.0]])
    mask = torch.tensor([[True, True, False]])
    loss = critic_pretrain_loss(values, torch.tensor([1.0]), mask, kind="bce")
    expected = F.binary_cross_entropy_with_logits(values[:, :2], torch.ones(1, 2))
    torch.testing.assert_close(loss, expected)


def test_critic_weights_and_value_loss_in_the_memory_efficient_loss():
    """The docs' recipe: weights from no-grad values on the caller's trunk output, the value loss from
    that output as trunk_loss; equals the naive loss."""
    from weighted_mtp.config.schema import ValueHeadConfig
    from weighted_mtp.losses import mtp_forward_backward, mtp_loss_naive
    from weighted_mtp.models.transformer import build_micro_model
    from weighted_mtp.models.value_head import build_value_head

    model = build_micro_model(40, 3, seed=0)
    value_head = build_value_head(ValueHeadConfig(type="mlp"), model.args.dim)
    rng = random.Random(0)
    input_ids = torch.randint(0, 40, (4, 15), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(input_ids, -100)
    attention_mask = torch.ones_like(input_ids)
    for b in range(4):
        prompt, end = rng.randint(1, 5), rng.randint(7, 15)
        labels[b, prompt:end] = input_ids[b, prompt:end]
        attention_mask[b, end:] = 0
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])

    scheme = CriticWeighting(gamma=1.0, lam=0.95, clip_min=0.1, clip_max=3.0)
    with torch.no_grad():
        old_values = value_head(model.trunk_forward(input_ids, attention_mask=attention_mask))
    targets = scheme.targets(old_values, rewards, labels, n_heads=3)

    def trunk_loss(h):
        return 0.5 * value_loss(value_head(h), old_values, targets.returns, targets.step_mask, 0.2)

    kwargs = dict(attention_mask=attention_mask, weights=targets.weights, head_weights=[1.0, 0.5, 0.25])
    h_trunk = model.trunk_forward(input_ids, attention_mask=attention_mask)
    out = mtp_forward_backward(model, input_ids, labels, **kwargs, h_trunk=h_trunk, trunk_loss=trunk_loss(h_trunk))
    grads = [p.grad.clone() for p in value_head.parameters()]
    model.zero_grad()
    value_head.zero_grad()
    loss, naive = mtp_loss_naive(model, input_ids, labels, **kwargs, trunk_loss_fn=trunk_loss)
    loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), atol=1e-5, rtol=1e-5)
    assert out.aux_loss.item() > 0
    for fast, slow in zip(grads, [p.grad for p in value_head.parameters()]):
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_the_critic_weighting_defaults_are_the_configs():
    from weighted_mtp.config.schema import ValueWeightingConfig

    scheme, section = CriticWeighting(), ValueWeightingConfig()
    assert (
        scheme.scorer, scheme.gamma, scheme.lam, scheme.temperature, scheme.normalization, scheme.transform,
        scheme.clip_min, scheme.clip_max, scheme.weight_normalization,
    ) == (
        section.scorer, section.gae_gamma, section.gae_lambda, section.weight_temperature,
        section.td_error_normalization, section.transform, section.weight_clip_min, section.weight_clip_max,
        section.weight_normalization,
    )


def reference_pairwise(values, labels, rewards):
    """Plain loops: per pair (2i, 2i+1), mean value over each row's steps, -log sigmoid of the margin."""
    total, count, margins = 0.0, 0, []
    for i in range(0, len(labels), 2):
        means = []
        for b in (i, i + 1):
            steps = [p for p in range(len(labels[b]) - 1) if labels[b][p + 1] != -100]
            means.append(sum(values[b][p] for p in steps) / len(steps) if steps else None)
        if None in means or rewards[i] == rewards[i + 1]:
            continue
        better, worse = (means[0], means[1]) if rewards[i] > rewards[i + 1] else (means[1], means[0])
        margins.append(better - worse)
        total += math.log1p(math.exp(-(better - worse)))
        count += 1
    return total, count, margins


@pytest.mark.parametrize("seed", range(10))
def test_pairwise_loss_matches_a_plain_loop_in_float64(seed):
    from weighted_mtp.weighting import pairwise_value_loss

    rng = random.Random(seed)
    rows, length = 2 * rng.randint(1, 4), rng.randint(3, 30)
    labels = random_labels(rng, rows, length, gaps=seed % 2 == 1)
    values = torch.randn(rows, length, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([float(rng.random() < 0.5) for _ in range(rows)], dtype=torch.float64)
    rewards[0], rewards[1] = 1.0, 0.0  # at least one pair of differing rewards, the pair sampler's order
    loss, count = pairwise_value_loss(values, response_step_mask(labels), rewards)
    expected, expected_count, _ = reference_pairwise(values.tolist(), labels.tolist(), rewards.tolist())
    assert int(count) == expected_count
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    loss.backward()
    assert values.grad is not None and torch.isfinite(values.grad).all()


def test_pairwise_needs_pairs():
    from weighted_mtp.weighting import pairwise_value_loss

    with pytest.raises(ValueError, match="even number of rows"):
        pairwise_value_loss(torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool), torch.zeros(3))


def test_ema_normalisation_follows_a_plain_running_average_over_batches():
    from weighted_mtp.weighting.critic import ScoreMoments, transformed_scores

    momentum, warmup = 0.9, 2
    moments = ScoreMoments(momentum, warmup)
    mean = var = None
    for update in range(1, 7):
        _, labels, values, rewards = random_case(20 + update, gaps=True)
        mask = response_step_mask(labels)
        if not mask.any():
            continue
        scores = torch.randn(values.shape, generator=torch.Generator().manual_seed(update), dtype=torch.float64)
        valid = [float(x) for x in scores[mask]]
        batch_mean = sum(valid) / len(valid)
        batch_var = sum((x - batch_mean) ** 2 for x in valid) / len(valid)
        if mean is None:
            mean, var = batch_mean, batch_var
        else:
            mean, var = momentum * mean + (1 - momentum) * batch_mean, momentum * var + (1 - momentum) * batch_var
        moments.update(scores[mask])
        use_mean, use_std = (batch_mean, math.sqrt(batch_var)) if moments.updates <= warmup else (mean, math.sqrt(var))
        got = transformed_scores(scores, mask, temperature=1.0, normalization="ema", transform="exp", moments=moments)
        expected = torch.where(mask, torch.exp((scores - use_mean) / (use_std + 1e-8)), 0.0)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        assert (moments.mean, moments.var) == (pytest.approx(mean, abs=1e-12), pytest.approx(var, abs=1e-12))
    restored = ScoreMoments(momentum, warmup)
    restored.load_state_dict(moments.state_dict())
    assert restored == moments


def test_ema_without_moments_is_refused():
    from weighted_mtp.weighting.critic import transformed_scores

    with pytest.raises(ValueError, match="running moments"):
        transformed_scores(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), temperature=1.0,
                           normalization="ema", transform="exp")  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_stage1_lambda_return_targets_match_the_plain_gae_loop(seed):
    from weighted_mtp.weighting.critic import lambda_return_targets

    _, labels, values, rewards = random_case(seed, gaps=seed % 2 == 1)
    values, rewards = values.double(), rewards.double()
    targets = lambda_return_targets(values, rewards, response_step_mask(labels), gamma=0.9, lam=0.8)
    _, expected = reference_gae(values.tolist(), rewards.tolist(), labels.tolist(), 0.9, 0.8, dtype=torch.float64)
    torch.testing.assert_close(targets, expected, rtol=1e-12, atol=1e-12)
    mask = response_step_mask(labels)
    loss = critic_pretrain_loss(values.clone().requires_grad_(), rewards, mask, "mse", targets=targets)
    by_hand = sum((float(values[b, t]) - float(targets[b, t])) ** 2 for b, t in mask.nonzero().tolist())
    assert float(loss.detach()) == pytest.approx(by_hand / max(int(mask.sum()), 1), rel=1e-6)


def test_a_batch_without_response_steps_weighs_nothing_instead_of_failing():
    labels = torch.full((2, 6), -100)
    targets = CriticWeighting().targets(torch.rand(2, 6), torch.tensor([1.0, 0.0]), labels, n_heads=2)
    assert targets.weights.shape == (2, 6, 2) and (targets.weights == 0).all()
