"""The critic, verifiable and Rho-1 objectives against straightforward references on a tiny model."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from weighted_mtp.data import Batch
from weighted_mtp.losses import IGNORE_INDEX, mtp_loss_naive
from weighted_mtp.models.transformer import build_micro_model
from weighted_mtp.models.value_head import MLPValueHead
from weighted_mtp.objectives import (
    CriticObjective,
    Rho1Objective,
    VerifiableObjective,
)
from weighted_mtp.objectives.critic import roc_auc
from weighted_mtp.weighting import CriticWeighting, Rho1Weighting, critic_targets, value_loss

VOCAB = 61


def make_batch(seed: int, rewards=(1.0, 0.0, 1.0, 0.0), length: int = 14) -> Batch:
    """Right-padded rows: a prompt without loss, a response, padding; pairs of (correct, incorrect)."""
    gen = torch.Generator().manual_seed(seed)
    rows = len(rewards)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX)
    rng = random.Random(seed)
    for row in range(rows):
        used = rng.randint(length - 5, length)
        prompt = rng.randint(2, 5)
        attention_mask[row, :used] = 1
        labels[row, prompt:used] = input_ids[row, prompt:used]
    return Batch(
        input_ids, attention_mask, labels, torch.tensor(rewards), [f"p{r // 2}" for r in range(rows)], True
    )


def tiny_model(n_heads: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_micro_model(VOCAB, n_future_tokens=n_heads, seed=seed)


def last_step_values_loop(values: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Value at the last position p whose next token p+1 has a label, row by row."""
    out = []
    for row in range(labels.shape[0]):
        steps = [p for p in range(labels.shape[1] - 1) if labels[row, p + 1] != IGNORE_INDEX]
        out.append(float(values[row, steps[-1]]))
    return out


def test_roc_auc_is_the_fraction_of_correctly_ordered_pairs():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        scores = torch.round(torch.rand(40, generator=gen) * 8) / 8  # many ties
        labels = torch.rand(40, generator=gen) > 0.6
        pos, neg = scores[labels], scores[~labels]
        pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in pos for n in neg]
        assert roc_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])) != roc_auc(
        torch.tensor([0.1, 0.2]), torch.tensor([True, True])
    )  # NaN with one class


@pytest.mark.parametrize("loss,reward_on", [("mse", "every_token"), ("bce", "last_token")])
def test_critic_value_loss_decreases_on_a_fixed_batch_and_trains_only_the_value_head(loss, reward_on):
    model = tiny_model().requires_grad_(False)
    head = MLPValueHead(model.args.dim)
    objective = CriticObjective(head, loss=loss, reward_on=reward_on)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    batch = make_batch(0)
    losses = []
    for _ in range(25):
        optimizer.zero_grad()
        losses.append(objective.forward_backward(model, batch, loss_scale=1.0)["loss"])
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in head.parameters())


def test_critic_validation_summary_is_the_auc_of_last_step_values_over_the_whole_pass():
    model = tiny_model()
    head = MLPValueHead(model.args.dim)
    objective = CriticObjective(head, loss="bce")
    batches = [make_batch(1), make_batch(2, rewards=(1.0, 1.0, 0.0, 0.0))]
    values, passed = [], []
    for batch in batches:
        objective.evaluate(model, batch)
        with torch.no_grad():
            estimates = torch.sigmoid(
                head(model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask))
            )
        values += last_step_values_loop(estimates, batch.labels)
        passed += [bool(r) for r in batch.rewards]
    summary = objective.evaluation_summary()
    expected = roc_auc(torch.tensor(values), torch.tensor(passed))
    assert summary["value/auc"] == pytest.approx(expected)
    accuracy = sum((v > 0.5) == p for v, p in zip(values, passed)) / len(values)
    assert summary["value/accuracy"] == pytest.approx(accuracy)
    assert objective.evaluation_summary() == {}  # the pass's values were consumed


def verifiable_setup(train_values: bool = True):
    model = tiny_model(n_heads=3)
    head = MLPValueHead(model.args.dim)
    with torch.no_grad():  # a critic that already tells rows apart, so advantages vary
        head.net[-1].bias.fill_(0.5)
    weighting = CriticWeighting(gamma=1.0, lam=0.9, temperature=0.7, clip_min=0.2, clip_max=2.5)
    objective = VerifiableObjective(
        head,
        weighting,
        value_loss_coefficient=0.5,
        value_clip_range=0.05,
        train_values=train_values,
        head_weights=[1.0, 0.8, 0.64],
        chunk_size=5,
    )
    return model, head, objective


def naive_verifiable_step(reference_model, reference_head, batch, old, clipped_value_loss):
    """The verifiable objective by hand, with `verifiable_setup`'s settings: critic targets from the old
    values, the naive weighted MTP loss plus 0.5 x the clipped value loss; backward already run."""
    targets = critic_targets(
        old,
        batch.rewards,
        batch.labels,
        n_heads=3,
        scorer="gae",
        gamma=1.0,
        lam=0.9,
        temperature=0.7,
        normalization="zscore",
        transform="exp",
        clip_min=0.2,
        clip_max=2.5,
        weight_normalization="mean1",
    )

    def clipped(hidden):
        return 0.5 * clipped_value_loss(reference_head(hidden), old, targets.returns, targets.step_mask, 0.05)

    total, out = mtp_loss_naive(
        reference_model,
        batch.input_ids,
        batch.labels,
        attention_mask=batch.attention_mask,
        weights=targets.weights,
        head_weights=[1.0, 0.8, 0.64],
        trunk_loss_fn=clipped,
    )
    total.backward()
    return total, out, targets


def test_verifiable_gradients_equal_the_naive_weighted_loss_with_the_clipped_value_loss():
    model, head, objective = verifiable_setup()
    reference_model, reference_head = copy.deepcopy(model), copy.deepcopy(head)
    batch = make_batch(4)
    metrics = objective.forward_backward(model, batch, loss_scale=1.0)

    with torch.no_grad():
        old = reference_head(
            reference_model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        )
    total, out, targets = naive_verifiable_step(reference_model, reference_head, batch, old, value_loss)
    assert metrics["loss"] == pytest.approx(float(total.detach()), rel=1e-5)
    for (name, p), q in zip(
        [*model.named_parameters(), *head.named_parameters()],
        [*reference_model.parameters(), *reference_head.parameters()],
    ):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)

    steps = targets.token_weights[targets.step_mask]  # clipped to [0.2, 2.5], then rescaled to mean 1
    assert float(steps.mean()) == pytest.approx(1.0, abs=1e-6)
    assert float(steps.max() / steps.min()) <= 2.5 / 0.2 + 1e-6
    assert steps.std() > 0.05  # not all equal
    assert 0 < metrics["weights/min"] < metrics["weights/max"]
    assert metrics["value/loss"] == pytest.approx(float(out.aux_loss) / 0.5, rel=1e-5)


def test_verifiable_without_value_learning_leaves_the_value_head_untouched():
    model, head, objective = verifiable_setup(train_values=False)
    metrics = objective.forward_backward(model, make_batch(5), loss_scale=1.0)
    assert all(p.grad is None for p in head.parameters())
    assert "value/loss" not in metrics
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_rho1_selects_the_configured_fraction_by_head1_excess_loss(ratio):
    model = tiny_model(n_heads=2, seed=0)
    reference = tiny_model(n_heads=1, seed=1).requires_grad_(False)
    objective = Rho1Objective(reference, Rho1Weighting(ratio=ratio, per_head=False), chunk_size=7)
    reference_model = copy.deepcopy(model)
    batch = make_batch(6)
    metrics = objective.forward_backward(model, batch, loss_scale=1.0)

    # independent: excess = model CE - reference CE of head 1 from full logits; the top fraction by
    # excess (row-major ties) gets N / n_keep, head 2 reuses the weight of the same target token
    with torch.no_grad():
        logits = reference_model(
            batch.input_ids, attention_mask=batch.attention_mask, return_all_heads=True
        ).logits
        ref_logits = reference(batch.input_ids, attention_mask=batch.attention_mask).logits[:, :, 0]
    targets = torch.full_like(batch.labels, IGNORE_INDEX)
    targets[:, :-1] = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    safe = targets.clamp_min(0)
    ce = F.cross_entropy(logits[:, :, 0].flatten(0, 1), safe.flatten(), reduction="none").view_as(safe)
    ref_ce = F.cross_entropy(ref_logits.flatten(0, 1), safe.flatten(), reduction="none").view_as(safe)
    excess = (ce - ref_ce)[mask]
    n, n_keep = int(mask.sum()), max(1, int(ratio * int(mask.sum()) + 0.5))
    chosen = torch.zeros(n)
    chosen[torch.argsort(excess, descending=True, stable=True)[:n_keep]] = n / n_keep
    head1 = torch.zeros(mask.shape)
    head1[mask] = chosen
    weights = torch.zeros(*mask.shape, 2)
    weights[:, :, 0] = head1
    weights[:, :-1, 1] = head1[:, 1:]
    total, _ = mtp_loss_naive(
        reference_model, batch.input_ids, batch.labels, attention_mask=batch.attention_mask, weights=weights
    )
    total.backward()
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # head 1 keeps exactly n_keep of its n targets; head 2 (one target fewer per row) about as many
    assert metrics["weights/selected"] == pytest.approx(ratio, abs=0.1)
    assert float((head1[mask] > 0).float().mean()) == pytest.approx(n_keep / n)
    assert all(p.grad is None for p in reference.parameters())


# ----------------------------------------------------------------------------- PPO old values


def ppo_value_loss_by_hand(values, old_values, returns, mask, clip_range):
    """0.5 * mean over the masked steps of max((v - G)^2, (v_old + clip(v - v_old) - G)^2), term by term."""
    terms = []
    for row in range(values.shape[0]):
        for p in range(values.shape[1]):
            if not mask[row, p]:
                continue
            v, old, g = values[row, p], float(old_values[row, p]), float(returns[row, p])
            unclipped = (v - g) ** 2
            if clip_range is None:
                terms.append(unclipped)
                continue
            clipped = old + torch.clamp(v - old, -clip_range, clip_range)
            terms.append(torch.maximum(unclipped, (clipped - g) ** 2))
    return 0.5 * torch.stack(terms).mean()


def move_value_head(head, shift: float = 0.3) -> None:
    """The learning head after some updates: its output moves by `shift` at every position."""
    with torch.no_grad():
        head.net[-1].bias.add_(shift)


def test_old_values_come_from_a_frozen_snapshot_of_the_starting_head():
    model, head, objective = verifiable_setup()
    snapshot = objective.old_value_head
    assert snapshot is not head and not snapshot.training
    assert all(not p.requires_grad for p in snapshot.parameters())
    for p, q in zip(head.parameters(), snapshot.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    move_value_head(head)
    objective.forward_backward(model, make_batch(7), loss_scale=1.0)
    assert all(p.grad is None for p in snapshot.parameters())
    assert torch.equal(snapshot.net[-1].bias, torch.full_like(snapshot.net[-1].bias, 0.5))


def test_moved_head_gradients_equal_a_hand_written_ppo_value_loss_around_the_snapshot():
    model, head, objective = verifiable_setup()
    snapshot = copy.deepcopy(head)  # the head the advantages must come from
    with torch.no_grad():  # moved by a different amount at each position: some beyond the clip range
        noise = torch.randn(head.net[-1].weight.shape, generator=torch.Generator().manual_seed(1))
        head.net[-1].weight.add_(0.12 * noise)
    reference_model, reference_head = copy.deepcopy(model), copy.deepcopy(head)
    batch = make_batch(8)
    metrics = objective.forward_backward(model, batch, loss_scale=1.0)

    with torch.no_grad():
        hidden = reference_model.trunk_forward(batch.input_ids, attention_mask=batch.attention_mask)
        old = snapshot.eval()(hidden)
    total, out, targets = naive_verifiable_step(
        reference_model, reference_head, batch, old, ppo_value_loss_by_hand
    )
    assert metrics["loss"] == pytest.approx(float(total.detach()), rel=1e-5)
    assert metrics["value/loss"] == pytest.approx(float(out.aux_loss) / 0.5, rel=1e-5)
    for (name, p), q in zip(
        [*model.named_parameters(), *head.named_parameters()],
        [*reference_model.parameters(), *reference_head.parameters()],
    ):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        moved = (reference_head(hidden) - old).abs()[targets.step_mask]
    assert metrics["value/clip_fraction"] == pytest.approx(float((moved > 0.05).float().mean()))
    assert 0.0 < metrics["value/clip_fraction"] < 1.0  # both sides of the clip are exercised


def value_head_gradients(clip_range, moved: bool):
    model, head, objective = verifiable_setup()
    objective.value_clip_range = clip_range
    if moved:
        move_value_head(head)
    metrics = objective.forward_backward(model, make_batch(9), loss_scale=1.0)
    return [p.grad.clone() for p in head.parameters()], metrics


def test_clip_range_changes_the_gradient_once_the_head_has_moved_from_the_snapshot():
    # at the snapshot the clip cannot bind: V = V_old, so the clipped and plain losses agree
    at_snapshot_clipped, _ = value_head_gradients(0.05, moved=False)
    at_snapshot_plain, _ = value_head_gradients(None, moved=False)
    for clipped, plain in zip(at_snapshot_clipped, at_snapshot_plain):
        torch.testing.assert_close(clipped, plain)

    # moved 0.3 > clip_range at every step: where the move went toward the return the clipped term
    # is larger and has no gradient, so the gradient differs from the plain squared error's
    moved_clipped, metrics = value_head_gradients(0.05, moved=True)
    moved_plain, _ = value_head_gradients(None, moved=True)
    assert metrics["value/clip_fraction"] == 1.0
    assert any(not torch.allclose(c, p, atol=1e-6) for c, p in zip(moved_clipped, moved_plain))


def test_snapshot_refreshes_exactly_every_n_optimizer_steps():
    model, head, objective = verifiable_setup()
    objective.old_values_refresh_every = 3
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    start = [p.detach().clone() for p in head.parameters()]
    reference = start
    for step in range(1, 8):
        optimizer.zero_grad()
        objective.forward_backward(model, make_batch(10 + step), loss_scale=1.0)
        optimizer.step()
        objective.on_step_end(step)
        if step % 3 == 0:
            reference = [p.detach().clone() for p in head.parameters()]
        for p, q in zip(reference, objective.old_value_head.parameters()):
            assert torch.equal(p, q), step
        moved_since_refresh = [
            not torch.equal(p, q) for p, q in zip(head.parameters(), objective.old_value_head.parameters())
        ]
        assert any(moved_since_refresh) == (step % 3 != 0), step
    assert not all(torch.equal(p, q) for p, q in zip(start, reference))  # it did refresh (steps 3 and 6)


def test_without_refresh_the_loaded_critic_stays_the_reference_and_state_round_trips():
    model, head, objective = verifiable_setup()
    start = copy.deepcopy(objective.old_value_head.state_dict())
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    for step in range(1, 4):
        optimizer.zero_grad()
        objective.forward_backward(model, make_batch(20 + step), loss_scale=1.0)
        optimizer.step()
        objective.on_step_end(step)
    for name, tensor in objective.old_value_head.state_dict().items():
        assert torch.equal(tensor, start[name])

    objective.refresh_old_values()
    saved = objective.state_dict()
    _, _, fresh = verifiable_setup()
    fresh.load_state_dict(saved)
    for p, q in zip(fresh.old_value_head.parameters(), head.parameters()):
        assert torch.equal(p, q)


def test_refresh_folds_a_lora_adapted_value_head_into_the_plain_snapshot():
    from torch import nn

    from weighted_mtp.models.lora import inject_lora, lora_scaling

    head = MLPValueHead(16)
    objective = VerifiableObjective(head, CriticWeighting(), lora_scaling=lora_scaling(4, 8))
    linear = [name for name, module in head.named_modules() if isinstance(module, nn.Linear)]
    inject_lora(head, linear, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, param in head.named_parameters():
            if "lora_B" in name:  # 0 when injected: give the adapters something to merge
                param.normal_(generator=torch.Generator().manual_seed(2))
    objective.refresh_old_values()
    hidden = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(objective.old_value_head(hidden), head.eval()(hidden))


def test_a_verifiable_step_unembeds_once_per_head(monkeypatch):
    """The weights come from the objective's own trunk pass: no extra unembedding pass to find them."""
    import weighted_mtp.losses as losses

    calls = {"fused": 0, "plain": 0}
    fused, plain = losses._FusedWeightedCrossEntropy.apply, losses._ChunkedCrossEntropy.apply

    def count_fused(*args):
        calls["fused"] += 1
        return fused(*args)

    def count_plain(*args):
        calls["plain"] += 1
        return plain(*args)

    monkeypatch.setattr(losses._FusedWeightedCrossEntropy, "apply", count_fused)
    monkeypatch.setattr(losses._ChunkedCrossEntropy, "apply", count_plain)
    model, _, objective = verifiable_setup()
    objective.forward_backward(model, make_batch(4), loss_scale=1.0)
    assert calls == {"fused": model.n_future_tokens, "plain": 0}
