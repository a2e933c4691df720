"""A step's loss is that of its whole batch, however the batch is cut into micro-batches.

One call on the whole batch against the sum of calls on an uneven split of its rows (each piece
trimmed to its own length, as a loader pads per batch), every piece normalised by the whole batch's
counts: loss, per-head metrics and every parameter's gradient agree to 1e-6 (fp32). The old rule,
each piece's own mean averaged over pieces, gives something else on the same data, so the tests can
tell the two apart.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import Tensor, nn

from weighted_mtp.data import Batch
from weighted_mtp.losses import IGNORE_INDEX, head_target_counts, mtp_forward_backward
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer, build_micro_model
from weighted_mtp.models.value_head import MLPValueHead
from weighted_mtp.objectives import BaselineObjective, CriticObjective, Rho1Objective, VerifiableObjective
from weighted_mtp.objectives.base import local_sums
from weighted_mtp.weighting import CriticWeighting, Rho1Weighting, head_target_mask

VOCAB, ROWS, SEQ = 61, 6, 15
SPLIT = (1, 3, 2)  # uneven pieces of the six rows
PAIR_SPLIT = (2, 4)  # a pairwise loss needs whole pairs (the trainer's split keeps them together)


def split_of(name: str) -> tuple[int, ...]:
    return PAIR_SPLIT if "pairwise" in name else SPLIT
TOL = {"rtol": 1e-5, "atol": 1e-6}


def make_batch(seed: int) -> Batch:
    """Right-padded rows of very different lengths, prompts masked, pairs (correct, incorrect)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
    attention_mask = torch.zeros(ROWS, SEQ, dtype=torch.long)
    labels = torch.full((ROWS, SEQ), IGNORE_INDEX)
    for row in range(ROWS):
        length = rng.randint(4, SEQ)
        prompt = rng.randint(1, length - 2)
        attention_mask[row, :length] = 1
        labels[row, prompt:length] = input_ids[row, prompt:length]
        input_ids[row, length:] = 0
    rewards = torch.tensor([1.0, 0.0] * (ROWS // 2))
    return Batch(input_ids, attention_mask, labels, rewards, [f"p{r // 2}" for r in range(ROWS)], True)


def pieces(batch: Batch, sizes=SPLIT) -> list[Batch]:
    """Rows cut into pieces of `sizes`, each trimmed to its longest row."""
    out, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        width = int(batch.attention_mask[rows].sum(1).max())
        out.append(
            Batch(
                batch.input_ids[rows, :width],
                batch.attention_mask[rows, :width],
                batch.labels[rows, :width],
                batch.rewards[rows],
                batch.problem_ids[rows],
                batch.is_pair,
            )
        )
        start += size
    assert start == len(batch.input_ids)
    return out


def grads(modules: list[nn.Module]) -> dict[str, Tensor]:
    out = {}
    for i, module in enumerate(modules):
        for name, p in module.named_parameters():
            if p.requires_grad:
                out[f"{i}.{name}"] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
                p.grad = None
    return out


def assert_same_grads(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


# ----------------------------------------------------------------------------- the MTP loss


def model_with_heads(n: int, *, tie: bool) -> MTPTransformer:
    args = ModelArgs(
        dim=32, n_layers=2 + n, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_hidden_dim=48,
        n_future_tokens=n, tie_embeddings=tie,
    )  # fmt: skip
    model = MTPTransformer(args)
    model.init_weights(n, std=0.2)
    return model


@pytest.mark.parametrize("n,tie", [(1, True), (2, False), (4, True)])
def test_mtp_loss_of_the_whole_batch_is_the_sum_over_micro_batches_with_global_counts(n, tie):
    model = model_with_heads(n, tie=tie)
    value_head = MLPValueHead(model.args.dim)
    gen = torch.Generator().manual_seed(n)
    batch = make_batch(n)
    weights = torch.rand(ROWS, SEQ, n, generator=gen) * 2  # random per-token, per-head weights
    head_weights = [1.0, 0.7, 0.5, 0.3][:n]
    returns = torch.rand(ROWS, SEQ, generator=gen)

    def value_share(total_steps: float):
        """A value loss over the positions with a head-1 target, as its share of the whole batch's."""

        def loss_fn(hidden: Tensor, rows: slice, labels: Tensor) -> Tensor:
            steps = step_mask_by_hand(labels)
            error = (value_head(hidden) - returns[rows, : labels.shape[1]]) ** 2
            return (error * steps).sum() / total_steps

        return loss_fn

    def call(piece: Batch, rows: slice, counts, loss_scale: float = 1.0):
        width = piece.input_ids.shape[1]
        total_steps = float(head_target_counts(batch.labels, 1)[0]) if counts is not None else None
        own_steps = float(head_target_counts(piece.labels, 1)[0])
        value = value_share(total_steps if total_steps is not None else own_steps)
        hidden = model.trunk_forward(piece.input_ids, attention_mask=piece.attention_mask)
        return mtp_forward_backward(
            model,
            piece.input_ids,
            piece.labels,
            attention_mask=piece.attention_mask,
            weights=weights[rows, :width],
            head_weights=head_weights,
            chunk_size=4,
            loss_scale=loss_scale,
            h_trunk=hidden,
            trunk_loss=value(hidden, rows, piece.labels),
            target_counts=counts,
        )

    whole = call(batch, slice(None), None)
    expected = grads([model, value_head])

    counts = head_target_counts(batch.labels, n)
    starts = [sum(SPLIT[:i]) for i in range(len(SPLIT))]
    row_slices = [slice(s, s + size) for s, size in zip(starts, SPLIT)]
    outs = [call(piece, rows, counts) for piece, rows in zip(pieces(batch), row_slices)]
    accumulated = grads([model, value_head])

    assert_same_grads(accumulated, expected)
    torch.testing.assert_close(sum(o.loss for o in outs), whole.loss, **TOL)
    for field in ("head_losses", "head_ce", "head_accuracy"):
        torch.testing.assert_close(sum(getattr(o, field) for o in outs), getattr(whole, field), **TOL)
    assert torch.equal(sum(o.head_tokens for o in outs), whole.head_tokens)
    assert torch.equal(whole.head_tokens.double(), counts)

    # the old rule: each piece's own means, averaged over the pieces
    old = [
        call(piece, rows, None, loss_scale=1 / len(SPLIT)) for piece, rows in zip(pieces(batch), row_slices)
    ]
    averaged = grads([model, value_head])
    assert max_difference(averaged, expected) > 1e-3
    assert abs(float(sum(o.loss for o in old)) / len(SPLIT) - float(whole.loss)) > 1e-3


def step_mask_by_hand(labels: Tensor) -> Tensor:
    """[B,T]: positions whose next token has a label (head 1's targets), written out by hand."""
    mask = torch.zeros(labels.shape, dtype=torch.float32)
    mask[:, :-1] = (labels[:, 1:] != IGNORE_INDEX).float()
    return mask


def test_head_target_counts_count_each_heads_targets():
    batch = make_batch(5)
    counts = head_target_counts(batch.labels, 5)
    for k in range(1, 6):
        by_hand = sum(
            1 for b in range(ROWS) for t in range(SEQ - k) if batch.labels[b, t + k] != IGNORE_INDEX
        )
        assert counts[k - 1] == by_hand
    assert counts[0] > counts[-1]  # later heads lose the first targets of each response
    with pytest.raises(ValueError, match="3 entries for 2 heads"):
        mtp_forward_backward(
            model_with_heads(2, tie=True), batch.input_ids, batch.labels, target_counts=[1.0, 2.0, 3.0]
        )


# ----------------------------------------------------------------------------- every objective


def tiny_model(n_heads: int) -> MTPTransformer:
    return build_micro_model(VOCAB, n_future_tokens=n_heads, seed=n_heads)


def critic_head(model: MTPTransformer) -> MLPValueHead:
    torch.manual_seed(0)
    head = MLPValueHead(model.args.dim)
    with torch.no_grad():  # a critic that already tells positions apart, so advantages vary
        head.net[-1].bias.fill_(0.5)
    return head


def baseline():
    model = tiny_model(3)
    return model, [model], BaselineObjective(chunk_size=5, head_weights=[1.0, 0.5, 0.25])


def critic(reward_on: str, loss: str = "bce", pairwise_coefficient: float = 0.0):
    model = tiny_model(1)
    head = critic_head(model)
    objective = CriticObjective(head, loss=loss, reward_on=reward_on, pairwise_coefficient=pairwise_coefficient)
    return model, [model, head], objective


def verifiable(normalization: str = "none", weight_normalization: str = "none", scorer: str = "gae"):
    model = tiny_model(2)
    head = critic_head(model)
    # without batch statistics the weights are per row; with them (z-score, mean 1) prepare_step takes
    # them over the whole step: either way a split cannot change the weights
    weighting = CriticWeighting(
        scorer=scorer, gamma=1.0, lam=0.9, temperature=0.7, normalization=normalization, clip_min=0.2, clip_max=2.5,
        weight_normalization=weight_normalization,
    )
    objective = VerifiableObjective(
        head,
        weighting,
        value_loss_coefficient=0.5,
        value_clip_range=None,
        head_weights=[1.0, 0.8],
        chunk_size=5,
    )
    with torch.no_grad():  # the learning head has moved from the snapshot its targets come from
        head.net[0].weight.add_(
            0.1 * torch.randn(head.net[0].weight.shape, generator=torch.Generator().manual_seed(2))
        )
    return model, [model, head], objective


def rho1_over_the_step(weighting: Rho1Weighting):
    model = tiny_model(2)
    reference = build_micro_model(VOCAB, n_future_tokens=2, seed=7).requires_grad_(False)
    return model, [model], Rho1Objective(reference, weighting, head_weights=[1.0, 0.5], chunk_size=5)


SETUPS = {
    "baseline": baseline,
    "critic_every_token": lambda: critic("every_token"),
    "critic_last_token": lambda: critic("last_token"),
    "critic_pairwise": lambda: critic("every_token", loss="pairwise"),
    "critic_mse_plus_pairwise": lambda: critic("last_token", loss="mse", pairwise_coefficient=0.5),
    "verifiable": verifiable,
    "verifiable_step_statistics": lambda: verifiable("zscore", "mean1"),
    "verifiable_step_statistics_delta": lambda: verifiable("zscore", "mean1", scorer="critic_delta"),
    "rho1_step_top_k": lambda: rho1_over_the_step(Rho1Weighting(ratio=0.5, per_head=True)),
    "rho1_step_soft_head1": lambda: rho1_over_the_step(Rho1Weighting(selection="soft", temperature=0.7, per_head=False)),
}


PER_BATCH_WEIGHTS = {"rho1", "verifiable_step_statistics", "verifiable_step_statistics_delta", "rho1_step_top_k",
                     "rho1_step_soft_head1"}  # in validation


def step(objective, model: nn.Module, micro: list[Batch], *, global_counts: bool) -> dict[str, float]:
    """What the trainer does on one rank: global counts, then each piece's share; metrics summed."""
    counts: dict[str, float] = {}
    for piece in micro:
        for key, value in objective.token_counts(model, piece).items():
            counts[key] = counts.get(key, 0.0) + value
    if global_counts:
        objective.prepare_step(model, micro, local_sums)  # statistics over the whole step, as the trainer does
    metrics: dict[str, float] = {}
    scale = 1.0 if global_counts else 1.0 / len(micro)
    for piece in micro:
        out = objective.forward_backward(
            model, piece, loss_scale=scale, global_counts=counts if global_counts else None
        )
        for key, value in out.items():
            metrics[key] = metrics.get(key, 0.0) + float(value) * (1.0 if global_counts else scale)
    return metrics


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_every_objective_gives_the_whole_batch_loss_and_gradients_when_split(name):
    model, modules, objective = SETUPS[name]()
    batch = make_batch(11)

    whole = objective.forward_backward(model, batch, loss_scale=1.0)
    expected = grads(modules)
    split = step(objective, model, pieces(batch, split_of(name)), global_counts=True)
    accumulated = grads(modules)

    assert_same_grads(accumulated, expected)
    assert split.keys() == whole.keys()
    exact = [
        key
        for key in whole
        if key == "loss" or key.endswith(("/loss", "/ce", "/accuracy")) or key == "value/mean"
    ]
    assert "loss" in exact and len(exact) > 1
    for key in exact:
        assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key

    old = step(objective, model, pieces(batch, split_of(name)), global_counts=False)
    assert max_difference(grads(modules), expected) > 1e-4
    assert abs(old["loss"] - whole["loss"]) > 1e-4


def rho1():
    model = tiny_model(2)
    reference = build_micro_model(VOCAB, n_future_tokens=2, seed=7).requires_grad_(False)
    objective = Rho1Objective(
        reference, Rho1Weighting(ratio=0.5, per_head=True), head_weights=[1.0, 0.5], chunk_size=5
    )
    return model, [model], objective


@pytest.mark.parametrize("name", [*sorted(SETUPS), "rho1"])
def test_every_objective_evaluates_the_whole_set_when_batches_share_its_counts(name):
    """Validation as the trainer runs it: counts over every batch, then each batch's shares, summed.
    (Rho-1 selects tokens per batch, and validation z-scores critic weights per batch, so for those
    only the unweighted cross-entropy and accuracy are exact.)"""
    model, _, objective = (rho1 if name == "rho1" else SETUPS[name])()
    batch = make_batch(17)
    whole = objective.evaluate(model, batch)
    split = pieces(batch, split_of(name))
    counts: dict[str, float] = {}
    for piece in split:
        for key, value in objective.token_counts(model, piece).items():
            counts[key] = counts.get(key, 0.0) + value
    summed: dict[str, float] = {}
    own_means: dict[str, float] = {}
    for piece in split:
        for key, value in objective.evaluate(model, piece, global_counts=counts).items():
            summed[key] = summed.get(key, 0.0) + value
        for key, value in objective.evaluate(model, piece).items():
            own_means[key] = own_means.get(key, 0.0) + value / len(split)
    assert summed.keys() == whole.keys()
    exact = [
        key
        for key in whole
        if key.endswith(("/ce", "/accuracy"))
        or (name not in PER_BATCH_WEIGHTS and (key == "loss" or key.endswith("/loss") or key == "value/mean"))
    ]
    assert len(exact) > 1
    for key in exact:
        assert summed[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    assert max(abs(own_means[key] - whole[key]) for key in exact) > 1e-4  # the old rule differs


def test_rho1_divides_each_heads_loss_by_the_global_count():
    """Rho-1 picks tokens within each micro-batch (so a split changes which), but every piece's loss
    is still its sum over the global count: its share is its own mean times its fraction of the targets."""
    model = tiny_model(2)
    reference = build_micro_model(VOCAB, n_future_tokens=2, seed=7).requires_grad_(False)
    objective = Rho1Objective(
        reference, Rho1Weighting(ratio=0.5, per_head=True), head_weights=[1.0, 0.5], chunk_size=5
    )
    batch = make_batch(13)
    piece = pieces(batch)[1]
    own = objective.forward_backward(model, piece, loss_scale=1.0)
    own_grads = grads([model])
    counts = objective.token_counts(model, batch)
    local = objective.token_counts(model, piece)
    shared = objective.forward_backward(model, piece, loss_scale=1.0, global_counts=counts)
    shared_grads = grads([model])
    for k in (1, 2):
        fraction = local[f"head{k}"] / counts[f"head{k}"]
        assert fraction < 0.9
        for metric in ("loss", "ce", "accuracy"):
            key = f"head{k}/{metric}"
            assert shared[key] == pytest.approx(own[key] * fraction, rel=1e-5, abs=1e-7), key
    expected_total = (
        own["head1/loss"] * local["head1"] / counts["head1"]
        + 0.5 * own["head2/loss"] * local["head2"] / counts["head2"]
    ) / 1.5
    assert shared["loss"] == pytest.approx(expected_total, rel=1e-5)
    assert max_difference(shared_grads, own_grads) > 1e-4


def test_per_micro_batch_critic_statistics_are_an_option_that_a_split_changes():
    model, modules, objective = verifiable("zscore", "mean1")
    objective.weighting.statistics = "micro_batch"
    batch = make_batch(11)
    objective.forward_backward(model, batch, loss_scale=1.0)
    whole = grads(modules)
    step(objective, model, pieces(batch), global_counts=True)
    assert objective.step_statistics is None  # nothing prepared: each micro-batch z-scores itself
    assert max_difference(grads(modules), whole) > 1e-4


def test_critic_weights_over_the_step_have_mean_one_when_dropout_changes_every_trunk_pass():
    """A trunk with dropout (LoRA's, in training) gives every pass other hidden states: the weights
    must come from the old values whose scores gave the step's z-score and mean-1 divisor."""
    model, _, objective = verifiable("zscore", "mean1")
    torch.manual_seed(5)
    model.layers[0].register_forward_hook(lambda module, args, out: nn.functional.dropout(out, 0.3, module.training))
    model.train()
    metrics = step(objective, model, pieces(make_batch(11)), global_counts=True)
    assert metrics["weights/mean"] == pytest.approx(1.0, abs=1e-6)


def test_rho1_per_micro_batch_selects_in_each_piece_alone():
    """`rho1.statistics: micro_batch`, the documented option: a split changes the selection, and each
    piece's weights are its own top-k (mean 1 over the piece)."""
    model, modules, objective = rho1_over_the_step(Rho1Weighting(ratio=0.5, per_head=True, statistics="micro_batch"))
    batch = make_batch(11)
    objective.forward_backward(model, batch, loss_scale=1.0)
    expected = grads(modules)
    step(objective, model, pieces(batch), global_counts=True)
    assert objective.step_statistics is None and max_difference(grads(modules), expected) > 1e-4
    for piece in pieces(batch):
        weights = objective.token_weights(model, piece).weights
        mask = head_target_mask(piece.labels, 2)
        for k0 in range(2):
            if mask[..., k0].any():
                assert float(weights[..., k0][mask[..., k0]].mean()) == pytest.approx(1.0)
