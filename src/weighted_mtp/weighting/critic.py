"""Verifiable Critic WMTP: weight each response token by exp(advantage / beta) from a value head.

Indexing (see also `base.py`). `values[b, p]` is the value head's output at input position p, i.e.
the value of the state after reading tokens 0..p. The policy acts at the *step positions*
p_1 < ... < p_L of a row: the positions whose next token p+1 is a response token
(`response_step_mask(labels)`, head 1's target mask). Step i emits token p_i + 1 from the state
V[p_i]; the state it leads to is the next step's state V[p_{i+1}], and after the last response
token the episode ends (terminal value 0). The sequence reward R (1 pass, 0 fail) is paid on the
last step:

    delta_i = r_i + gamma * V[p_{i+1}] - V[p_i]       r_i = R if i == L else 0,  V[p_{L+1}] = 0
    A_i     = sum_l (gamma * lambda)^l delta_{i+l}      returns_i = A_i + V[p_i]

Why this indexing: the value is read *before* the token it judges, so A_i is the advantage of
emitting token p_i + 1 and sits at the position where head 1 predicts that token: head 1 uses
it as is, and head k at position p reads the weight stored at p+k-1 (for labels[p+k]). The
prompt-only state (the last prompt position) gets a value and is trained; the state after the final
token is terminal and is not. For a contiguous response, p_{i+1} = p_i + 1; if a row has gaps (tokens
without loss inside the response) they are skipped: the next state is the next decision state.

The z-score and the mean-1 rescaling take the statistics of the whole optimizer step by default
(`CriticWeighting.step_statistics`, every micro-batch and rank), or each micro-batch's own with
`statistics: micro_batch`. Everything is detached: the weights and returns are targets, never a path
for gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from weighted_mtp.config.schema import ValueWeightingConfig
from weighted_mtp.weighting.base import response_step_mask, spread_over_heads, weight_stats

if TYPE_CHECKING:
    from weighted_mtp.config.schema import Config

ZSCORE_EPS = 1e-8


def steps_to_front(mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each row's step positions in order, gathered to the front (gaps and padding vanish):
    `order` [B,L] (the positions; `gather(1, order)` reads the steps, `scatter(1, order, .)` puts
    them back), the step index `rank` [L], and which entries are steps / each row's last [B,L]."""
    steps_per_row = mask.sum(dim=1)
    longest = int(steps_per_row.max()) if mask.shape[0] else 0
    # positions of each row's steps, in order, then the rest (stable sort keeps the order)
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :longest]
    rank = torch.arange(longest, device=mask.device)
    is_step = rank[None, :] < steps_per_row[:, None]
    is_last = rank[None, :] == (steps_per_row[:, None] - 1)
    return order, rank, is_step, is_last


@torch.no_grad()
def gae_advantages(
    values: Tensor, rewards: Tensor, step_mask: Tensor, *, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE advantages and returns [B,T] at the step positions (0 elsewhere), float32.

    Each row's steps are gathered to the front (so gaps and padding vanish), the TD errors are
    computed in one shot, and A_i = sum_j (gamma*lam)^(j-i) delta_j is one matmul with an upper
    triangular [L,L] discount matrix (L = most steps in a row), in float64 so no TF32 setting
    can touch it. gamma=lam=1 gives Monte-Carlo returns (every return is R); lam=0 gives TD(0).
    """
    mask = step_mask.bool()
    order, rank, is_step, is_last = steps_to_front(mask)
    step_values = torch.where(is_step, values.detach().double().gather(1, order), 0.0)
    next_values = F.pad(step_values[:, 1:], (0, 1))  # the terminal state is worth 0
    step_rewards = torch.where(is_last, rewards.detach().double().to(mask.device)[:, None], 0.0)
    deltas = torch.where(is_step, step_rewards + gamma * next_values - step_values, 0.0)

    offset = rank[None, :] - rank[:, None]  # [i, j] = j - i
    powers = (gamma * lam) ** rank.double()
    discount = torch.where(offset >= 0, powers[offset.clamp_min(0)], 0.0)
    step_advantages = deltas @ discount.T

    step_returns = torch.where(is_step, step_advantages + step_values, 0.0)
    placed = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    out_dtype = torch.promote_types(values.dtype, torch.float32)  # float64 in, float64 out
    return placed.scatter(1, order, step_advantages).to(out_dtype), placed.scatter(1, order, step_returns).to(out_dtype)


@torch.no_grad()
def critic_delta_scores(values: Tensor, rewards: Tensor, step_mask: Tensor) -> Tensor:
    """[B,T] the value change each token causes, V[p_{i+1}] - V[p_i], at the step positions (0
    elsewhere): the original design's critic-weighted scorer, without reward shaping or discount.
    After the last step the next value is the reward R, or the last value (a change of 0) where R is
    unknown (NaN)."""
    mask = step_mask.bool()
    order, _, is_step, is_last = steps_to_front(mask)
    step_values = torch.where(is_step, values.detach().double().gather(1, order), 0.0)
    rewards = rewards.detach().double().to(mask.device)[:, None]
    after_last = torch.where(torch.isnan(rewards), step_values, rewards)
    next_values = torch.where(is_last, after_last, F.pad(step_values[:, 1:], (0, 1)))
    deltas = torch.where(is_step, next_values - step_values, 0.0)
    placed = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
    return placed.scatter(1, order, deltas).to(torch.promote_types(values.dtype, torch.float32))


@torch.no_grad()
def advantage_token_weights(
    scores: Tensor,
    step_mask: Tensor,
    *,
    temperature: float,
    normalization: Literal["zscore", "none"],
    transform: Literal["exp", "softmax"],
    clip_min: float,
    clip_max: float,
    weight_normalization: Literal["mean1", "none"],
) -> Tensor:
    """[B,T] token weights from per-step scores (advantages or value changes), 0 off the steps, in
    the scores' dtype (at least float32). In order:

    1. normalization "zscore": s' = (s - mean) / std over the batch's steps (population std);
    2. transform "exp": w = exp(s' / temperature); "softmax": w = L * softmax(s' / temperature) over
       each row's L steps (mean 1 per row);
    3. clip to [clip_min, clip_max];
    4. weight_normalization "mean1": w / mean(w) over the batch's steps, so the weights average 1
       and the loss keeps the baseline's scale from batch to batch (after clipping, so a weight can
       end up to clip_max / mean(w) high; clipping bounds the spread, the rescale the level).
    """
    raw = transformed_scores(scores, step_mask, temperature=temperature, normalization=normalization, transform=transform)
    return clipped_weights(
        raw, step_mask, clip_min=clip_min, clip_max=clip_max, weight_normalization=weight_normalization
    )


@dataclass
class ScoreMoments:
    """Running mean and variance of the scores, for `td_error_normalization: ema`: each training
    micro-batch updates them (`update`: mean <- momentum mean + (1 - momentum) batch mean, the same for
    the population variance; the first update takes the batch's own), and scores are z-scored with
    them once more than `warmup` updates were made, with the batch's own statistics before. Part of
    the objective's state: checkpoints save it and a resumed run restores it."""

    momentum: float
    warmup: int
    mean: float = 0.0
    var: float = 1.0
    updates: int = 0

    def update(self, valid: Tensor) -> None:
        if valid.numel() == 0:
            return
        self.update_from(float(valid.double().mean()), float(valid.double().var(unbiased=False)))

    def update_from(self, batch_mean: float, batch_var: float) -> None:
        if self.updates == 0:
            self.mean, self.var = batch_mean, batch_var
        else:
            self.mean = self.momentum * self.mean + (1 - self.momentum) * batch_mean
            self.var = self.momentum * self.var + (1 - self.momentum) * batch_var
        self.updates += 1

    def normalize(self, scores: Tensor, valid: Tensor) -> Tensor:
        if self.updates <= self.warmup:
            return (scores - valid.mean()) / (valid.std(unbiased=False) + ZSCORE_EPS)
        return (scores - self.mean) / (math.sqrt(self.var) + ZSCORE_EPS)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "updates": self.updates}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.updates = float(state["mean"]), float(state["var"]), int(state["updates"])


def transformed_scores(
    scores: Tensor,
    step_mask: Tensor,
    *,
    temperature: float,
    normalization: Literal["zscore", "none", "ema"],
    transform: Literal["exp", "softmax"],
    moments: ScoreMoments | None = None,
    center: tuple[float, float] | None = None,
) -> Tensor:
    """Steps 1-2 of `advantage_token_weights`: the weights before clipping, 0 off the steps.
    `center`: the (mean, std) to z-score with, computed over a whole step (`step_statistics`),
    instead of this batch's own or the running moments."""
    mask = step_mask.bool()
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if center is not None and normalization != "none":
        scores = (scores - center[0]) / (center[1] + ZSCORE_EPS)
    elif normalization == "zscore":
        if mask.any():
            valid = scores[mask]
            scores = (scores - valid.mean()) / (valid.std(unbiased=False) + ZSCORE_EPS)
    elif normalization == "ema":
        if moments is None:
            raise ValueError("td_error_normalization ema needs the running moments (ScoreMoments)")
        if mask.any():
            scores = moments.normalize(scores, scores[mask])
    elif normalization != "none":
        raise ValueError(f"unknown td_error_normalization {normalization!r} (expected zscore, ema or none)")
    if transform == "exp":
        weights = torch.exp(scores / temperature)
    elif transform == "softmax":
        logits = torch.where(mask, scores / temperature, -torch.inf)
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0) * mask.sum(dim=1, keepdim=True)
    else:
        raise ValueError(f"unknown weight transform {transform!r} (expected exp or softmax)")
    return torch.where(mask, weights, 0.0)


def clipped_weights(
    raw: Tensor,
    step_mask: Tensor,
    *,
    clip_min: float,
    clip_max: float,
    weight_normalization: Literal["mean1", "none"],
    divisor: float | None = None,
) -> Tensor:
    """Steps 3-4 of `advantage_token_weights`: clip, then rescale to mean 1 over the steps (over the
    whole step when `divisor`, the mean of the step's clipped weights, is given)."""
    mask = step_mask.bool()
    weights = torch.where(mask, raw.clamp(clip_min, clip_max), 0.0)
    if weight_normalization == "mean1" and divisor is not None:
        weights = weights / max(divisor, torch.finfo(weights.dtype).tiny)
    elif weight_normalization == "mean1" and mask.any():
        weights = weights / weights[mask].mean().clamp_min(torch.finfo(weights.dtype).tiny)
    elif weight_normalization not in ("mean1", "none"):
        raise ValueError(f"unknown weight_normalization {weight_normalization!r} (expected mean1 or none)")
    return weights


@dataclass(frozen=True)
class StepStatistics:
    """The statistics of a whole optimizer step's scores (every micro-batch and rank): the (mean,
    std) they are z-scored with, and the mean of the clipped weights that `mean1` divides by."""

    center: tuple[float, float] | None
    weight_mean: float | None


@dataclass
class CriticTargets:
    """What one batch's values give: the loss weights and the value-loss targets."""

    advantages: Tensor  # [B,T] the scores at step positions, before normalisation (GAE A, or value changes)
    returns: Tensor  # [B,T] targets for values[:, p] on the steps
    step_mask: Tensor  # [B,T] bool, the positions where values are trained
    token_weights: Tensor  # [B,T] weight of token p+1, at position p
    weights: Tensor  # [B,T,n] for mtp_forward_backward
    unclipped: Tensor  # [B,T] the token weights before clipping and rescaling


def critic_targets(
    values: Tensor,
    rewards: Tensor,
    labels: Tensor,
    *,
    n_heads: int,
    scorer: Literal["gae", "critic_delta"],
    gamma: float,
    lam: float,
    temperature: float,
    normalization: Literal["zscore", "none", "ema"],
    transform: Literal["exp", "softmax"],
    clip_min: float,
    clip_max: float,
    weight_normalization: Literal["mean1", "none"],
    moments: ScoreMoments | None = None,
    update_moments: bool = False,
    statistics: StepStatistics | None = None,
) -> CriticTargets:
    """From values [B,T] (an estimate of R, e.g. sigmoid of a BCE-trained head), rewards [B], labels.
    The value loss's returns are GAE's whatever the scorer (the value head keeps learning R). With
    `normalization="ema"`, `moments` are the running statistics, updated first when `update_moments`
    (a training micro-batch). `statistics`: the whole step's (`CriticWeighting.step_statistics`),
    used instead of this micro-batch's own."""
    step_mask = response_step_mask(labels)
    advantages, returns = gae_advantages(values, rewards, step_mask, gamma=gamma, lam=lam)
    if scorer == "critic_delta":
        advantages = critic_delta_scores(values, rewards, step_mask)
    elif scorer != "gae":
        raise ValueError(f"unknown scorer {scorer!r} (expected gae or critic_delta)")
    if normalization == "ema" and update_moments and moments is not None and statistics is None:
        moments.update(advantages[step_mask.bool()])
    raw = transformed_scores(
        advantages, step_mask, temperature=temperature, normalization=normalization, transform=transform,
        moments=moments, center=None if statistics is None else statistics.center,
    )  # fmt: skip
    token_weights = clipped_weights(
        raw, step_mask, clip_min=clip_min, clip_max=clip_max, weight_normalization=weight_normalization,
        divisor=None if statistics is None else statistics.weight_mean,
    )  # fmt: skip
    weights = spread_over_heads(token_weights, n_heads)
    return CriticTargets(advantages, returns, step_mask, token_weights, weights, raw)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over mask; an empty mask gives 0 that still depends on x (so backward works)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float | None
) -> Tensor:
    """PPO-style clipped value loss: 0.5 * mean over mask of max((v-G)^2, (v_clip-G)^2).

    v_clip = old + clamp(v - old, -clip_range, clip_range) keeps the value from moving further
    than clip_range from the values the advantages were computed with; None disables clipping.
    """
    values = values.float()
    returns = returns.detach().float()
    squared_error = (values - returns) ** 2
    if clip_range is not None:
        old_values = old_values.detach().float()
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        squared_error = torch.maximum(squared_error, (clipped - returns) ** 2)
    return 0.5 * _masked_mean(squared_error, mask)


def last_true(mask: Tensor) -> Tensor:
    """[B,T] bool: only the last True position of each row of mask."""
    mask = mask.bool()
    after = mask.flip(-1).cumsum(-1).flip(-1)  # number of True positions at or after p
    return mask & (after == 1)


def critic_pretrain_loss(
    values: Tensor,
    rewards: Tensor,
    mask: Tensor,
    kind: Literal["mse", "bce"] = "mse",
    reward_on: Literal["every_token", "last_token"] = "every_token",
    targets: Tensor | None = None,
) -> Tensor:
    """Stage 1: regress every step's value (or only the last one) onto the sequence reward, or onto
    per-position `targets` [B,T] when given (lambda-returns: `lambda_return_targets`).

    mask is normally `response_step_mask(labels)`. With kind="bce" the head outputs logits and the
    value is sigmoid(logit): pass that to `critic_targets` in stage 2.
    """
    if reward_on == "last_token":
        mask = last_true(mask)
    elif reward_on != "every_token":
        raise ValueError(f"unknown reward_on {reward_on!r} (expected every_token or last_token)")
    values = values.float()
    if targets is None:
        targets = rewards.detach().float().to(values.device)[:, None].expand_as(values)
    else:
        targets = targets.detach().float().to(values.device)
    if kind == "mse":
        per_position = (values - targets) ** 2
    elif kind == "bce":
        per_position = F.binary_cross_entropy_with_logits(values, targets, reduction="none")
    else:
        raise ValueError(f"unknown critic loss {kind!r} (expected mse or bce)")
    return _masked_mean(per_position, mask)


@torch.no_grad()
def lambda_return_targets(values: Tensor, rewards: Tensor, step_mask: Tensor, *, gamma: float, lam: float) -> Tensor:
    """[B,T] lambda-returns G_i = A_i + V_i from the value head's own (detached) estimates: stage 1
    with `stage1.targets: lambda_return` bootstraps each step's target from the values after it,
    instead of regressing every step onto R. For a BCE head the targets are clamped to [0, 1]."""
    return gae_advantages(values, rewards, step_mask, gamma=gamma, lam=lam)[1]


def pair_margins(values: Tensor, step_mask: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """For the pairs of rows (2i, 2i+1) of a pair batch: the mean value over the steps of the better
    row (higher reward) minus that of the worse one [P], and which pairs count [P] (both rows have a
    step and their rewards differ)."""
    mask = step_mask.bool()
    if mask.shape[0] % 2:
        raise ValueError(f"a pair batch has an even number of rows, got {mask.shape[0]}")
    steps = mask.sum(dim=1)
    mean_values = (values * mask).sum(dim=1) / steps.clamp_min(1)
    first, second = mean_values[0::2], mean_values[1::2]
    reward_first, reward_second = rewards[0::2].to(values.device), rewards[1::2].to(values.device)
    sign = torch.sign(reward_first - reward_second).to(values.dtype)
    counts = (steps[0::2] > 0) & (steps[1::2] > 0) & (sign != 0)
    return sign * (first - second), counts


def pairwise_value_loss(values: Tensor, step_mask: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Bradley-Terry (Ouyang et al. 2022's reward-model loss) on same-problem pairs: the sum over the
    counted pairs of -log sigmoid(mean V(better) - mean V(worse)), and the number of counted pairs."""
    margins, counts = pair_margins(values, step_mask, rewards)
    return (F.softplus(-margins) * counts).sum(), counts.sum()


DEFAULTS = ValueWeightingConfig()  # stage2.value_weighting: the one place its defaults are set


class CriticWeighting:
    """The knobs of `stage2.value_weighting`: turns the critic's values into scores, returns and
    token weights (`targets`)."""

    def __init__(
        self,
        *,
        scorer: Literal["gae", "critic_delta"] = DEFAULTS.scorer,
        gamma: float = DEFAULTS.gae_gamma,
        lam: float = DEFAULTS.gae_lambda,
        temperature: float = DEFAULTS.weight_temperature,
        normalization: Literal["zscore", "none", "ema"] = DEFAULTS.td_error_normalization,
        transform: Literal["exp", "softmax"] = DEFAULTS.transform,
        clip_min: float = DEFAULTS.weight_clip_min,
        clip_max: float = DEFAULTS.weight_clip_max,
        weight_normalization: Literal["mean1", "none"] = DEFAULTS.weight_normalization,
        ema_momentum: float = DEFAULTS.ema_momentum,
        ema_warmup: int = DEFAULTS.ema_warmup,
        statistics: Literal["step", "micro_batch"] = DEFAULTS.statistics,
    ) -> None:
        self.scorer, self.gamma, self.lam, self.temperature = scorer, gamma, lam, temperature
        self.normalization, self.transform = normalization, transform
        self.clip_min, self.clip_max, self.weight_normalization = clip_min, clip_max, weight_normalization
        self.ema_momentum, self.ema_warmup = ema_momentum, ema_warmup
        self.statistics = statistics

    def new_moments(self) -> ScoreMoments | None:
        """Fresh running statistics when the scores are normalised by them (`ema`), else None."""
        return ScoreMoments(self.ema_momentum, self.ema_warmup) if self.normalization == "ema" else None

    @classmethod
    def from_config(cls, config: Config) -> CriticWeighting:
        section = config.stage2.value_weighting
        return cls(
            scorer=section.scorer,
            gamma=section.gae_gamma,
            lam=section.gae_lambda,
            temperature=section.weight_temperature,
            normalization=section.td_error_normalization,
            transform=section.transform,
            clip_min=section.weight_clip_min,
            clip_max=section.weight_clip_max,
            weight_normalization=section.weight_normalization,
            ema_momentum=section.ema_momentum,
            ema_warmup=section.ema_warmup,
            statistics=section.statistics,
        )

    def targets(
        self,
        values: Tensor,
        rewards: Tensor,
        labels: Tensor,
        *,
        n_heads: int,
        moments: ScoreMoments | None = None,
        update_moments: bool = False,
        statistics: StepStatistics | None = None,
    ) -> CriticTargets:
        return critic_targets(
            values,
            rewards,
            labels,
            n_heads=n_heads,
            scorer=self.scorer,
            gamma=self.gamma,
            lam=self.lam,
            temperature=self.temperature,
            normalization=self.normalization,
            transform=self.transform,
            clip_min=self.clip_min,
            clip_max=self.clip_max,
            weight_normalization=self.weight_normalization,
            moments=moments,
            update_moments=update_moments,
            statistics=statistics,
        )

    def uses_step_statistics(self) -> bool:
        """Whether the weights depend on statistics over the batch, to be taken over the whole step."""
        return self.statistics == "step" and (self.normalization != "none" or self.weight_normalization == "mean1")

    def scores(self, values: Tensor, rewards: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(scores [B,T], step mask [B,T]): what the weights are made from, before any statistics."""
        step_mask = response_step_mask(labels)
        if self.scorer == "critic_delta":
            return critic_delta_scores(values, rewards, step_mask), step_mask
        return gae_advantages(values, rewards, step_mask, gamma=self.gamma, lam=self.lam)[0], step_mask

    def step_statistics(
        self,
        scores: list[tuple[Tensor, Tensor]],
        reduce_sum: Callable[[dict[str, float]], dict[str, float]],
        moments: ScoreMoments | None = None,
    ) -> StepStatistics:
        """The statistics of a step's scores ((scores, step mask) per micro-batch on this rank),
        summed over the ranks with `reduce_sum`: two passes for the mean and the population std (in
        float64), a third for the mean of the clipped weights. With `ema` the running moments are
        updated once with the step's mean and variance."""
        steps = [s[m.bool()].double() for s, m in scores]
        totals = reduce_sum({"n": float(sum(v.numel() for v in steps)), "sum": float(sum(v.sum() for v in steps))})
        n = max(totals["n"], 1.0)
        mean = totals["sum"] / n
        var = reduce_sum({"ss": float(sum(((v - mean) ** 2).sum() for v in steps))})["ss"] / n
        center: tuple[float, float] | None = (mean, math.sqrt(var))
        if self.normalization == "ema":
            assert moments is not None
            moments.update_from(mean, var)
            if moments.updates > moments.warmup:
                center = (moments.mean, math.sqrt(moments.var))
        elif self.normalization == "none":
            center = None
        weight_mean = None
        if self.weight_normalization == "mean1":
            total, count = 0.0, 0.0
            for s, m in scores:
                raw = transformed_scores(
                    s, m, temperature=self.temperature, normalization=self.normalization, transform=self.transform,
                    moments=moments, center=center,
                )  # fmt: skip
                clipped = clipped_weights(
                    raw, m, clip_min=self.clip_min, clip_max=self.clip_max, weight_normalization="none"
                )
                total += float(clipped[m.bool()].double().sum())
                count += float(m.sum())
            sums = reduce_sum({"weights": total, "n": count})
            weight_mean = sums["weights"] / max(sums["n"], 1.0)
        return StepStatistics(center, weight_mean)

    def stats(self, targets: CriticTargets, mask: Tensor) -> dict[str, float]:
        """Weight statistics over the valid targets (`mask` [B,T,n]) and the fraction of steps
        whose weight was clipped at either end."""
        stats = weight_stats(targets.weights, mask)
        unclipped = targets.unclipped.detach()[targets.step_mask.bool()]
        if unclipped.numel():
            stats["clipped_low"] = float((unclipped <= self.clip_min).float().mean())
            stats["clipped_high"] = float((unclipped >= self.clip_max).float().mean())
        return stats
