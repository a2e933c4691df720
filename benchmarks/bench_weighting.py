"""Cost of computing token weights next to the training step they feed.

For a right-padded batch it times: the critic targets (GAE + z-score/exp/clip + head mapping), GAE
alone as a matmul (the library's) against a reverse column scan and the plain Python double loop,
the Rho-1 selection over every head, and one `mtp_forward_backward` step of a
micro model on the same batch.

    .venv/bin/python benchmarks/bench_weighting.py [--batch 8 --length 512 --heads 4 --repeats 5]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

from weighted_mtp.losses import mtp_forward_backward
from weighted_mtp.models.transformer import build_micro_model
from weighted_mtp.weighting import Rho1Weighting, critic_targets, gae_advantages, response_step_mask


class Batch:
    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, rewards: torch.Tensor) -> None:
        self.input_ids, self.labels, self.rewards = input_ids, labels, rewards


def make_batch(batch: int, length: int, vocab: int, seed: int = 0) -> Batch:
    rng = random.Random(seed)
    input_ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))
    labels = torch.full_like(input_ids, -100)
    for b in range(batch):
        prompt = rng.randint(length // 8, length // 4)
        end = rng.randint(prompt + 1, length)
        labels[b, prompt:end] = input_ids[b, prompt:end]
    return Batch(input_ids, labels, torch.tensor([float(rng.random() < 0.5) for _ in range(batch)]))


def python_gae(values: list, rewards: list, labels: list, gamma: float, lam: float) -> None:
    for b in range(len(labels)):
        steps = [p for p in range(len(labels[b]) - 1) if labels[b][p + 1] != -100]
        v = [values[b][p] for p in steps] + [0.0]
        r = [0.0] * (len(steps) - 1) + [rewards[b]]
        deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(steps))]
        [sum((gamma * lam) ** l * deltas[i + l] for l in range(len(steps) - i)) for i in range(len(steps))]


def scan_gae(values: torch.Tensor, rewards: torch.Tensor, step_mask: torch.Tensor, gamma: float, lam: float):
    """The alternative to the matmul: a reverse scan over the columns, B rows at a time."""
    advantages = torch.zeros_like(values)
    next_value, next_advantage = values.new_zeros(len(values)), values.new_zeros(len(values))
    unpaid = rewards.clone()
    for p in reversed(step_mask.any(dim=0).nonzero().flatten().tolist()):
        is_step = step_mask[:, p]
        advantage = unpaid + gamma * next_value - values[:, p] + gamma * lam * next_advantage
        advantages[:, p] = torch.where(is_step, advantage, 0.0)
        next_value = torch.where(is_step, values[:, p], next_value)
        next_advantage = torch.where(is_step, advantage, next_advantage)
        unpaid = torch.where(is_step, 0.0, unpaid)
    return advantages


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    batch = make_batch(args.batch, args.length, args.vocab)
    n = args.heads
    values = torch.rand(batch.labels.shape)
    reference_ce = torch.rand(*batch.labels.shape, n) * 5
    model_ce = torch.rand(*batch.labels.shape, n) * 5
    selection = Rho1Weighting(selection="top_k", ratio=0.6)

    def rho1() -> None:
        selection.weights(model_ce, reference_ce, batch.labels, n_heads=n)

    model = build_micro_model(args.vocab, n, seed=0)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        mtp_forward_backward(model, batch.input_ids, batch.labels)

    step_mask = response_step_mask(batch.labels)
    lists = (values.tolist(), batch.rewards.tolist(), batch.labels.tolist())
    rows = {
        "critic targets (GAE + weights)": best_of(
            lambda: critic_targets(values, batch.rewards, batch.labels, n_heads=n, scorer="gae", gamma=1.0, lam=0.95,
                                   temperature=1.0, normalization="zscore", transform="exp", clip_min=0.0,
                                   clip_max=float("inf"), weight_normalization="mean1"),
            args.repeats,
        ),
        "GAE only (matmul)": best_of(
            lambda: gae_advantages(values, batch.rewards, step_mask, gamma=1.0, lam=0.95), args.repeats
        ),
        "GAE only, reverse column scan": best_of(
            lambda: scan_gae(values, batch.rewards, step_mask, 1.0, 0.95), args.repeats
        ),
        "GAE only, plain Python double loop": best_of(lambda: python_gae(*lists, 1.0, 0.95), 1),
        "rho1 top-k, all heads": best_of(rho1, args.repeats),
        "micro model mtp_forward_backward": best_of(step, args.repeats),
    }
    torch.testing.assert_close(
        scan_gae(values, batch.rewards, step_mask, 1.0, 0.95),
        gae_advantages(values, batch.rewards, step_mask, gamma=1.0, lam=0.95)[0], atol=1e-4, rtol=1e-4,
    )
    steps = int(step_mask.sum())
    threads = torch.get_num_threads()
    print(f"batch {args.batch} x {args.length}, {n} heads, {steps} response tokens, {threads} threads")
    step_time = rows["micro model mtp_forward_backward"]
    gae_time = rows["GAE only (matmul)"]
    for name, seconds in rows.items():
        ratios = f"{seconds / step_time:8.3f} x step   {seconds / gae_time:8.2f} x GAE matmul"
        print(f"{name:<36} {seconds * 1e3:10.2f} ms   {ratios}")


if __name__ == "__main__":
    main()
