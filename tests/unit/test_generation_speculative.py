"""Self-speculative decoding gives plain greedy's tokens, with random heads and with trained ones."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from weighted_mtp.eval.generation import (
    SpeculativeStats,
    generate_ids,
    sampling_distribution,
    speculative_generate_ids,
    speculative_sample_ids,
)
from weighted_mtp.losses import mtp_forward_backward
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer

VOCAB = 24
WORDS = [[3, 7, 1, 9, 4, 12], [5, 2, 8, 8, 6], [10, 11, 13, 3, 2, 7, 1]]  # fixed "words" in random order


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(n_future_tokens: int = 4, seed: int = 0, std: float = 0.1) -> MTPTransformer:
    args = ModelArgs(dim=48, n_layers=2 + n_future_tokens, n_heads=6, n_kv_heads=2, vocab_size=VOCAB,
                     ffn_hidden_dim=96, rope_theta=1000.0, n_future_tokens=n_future_tokens)
    model = MTPTransformer(args)
    model.init_weights(seed, std=std)
    return model.eval()


def word_sequences(n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """Words drawn at random, so tokens inside a word are predictable and the word after it is not."""
    rows = []
    for _ in range(n):
        row: list[int] = []
        while len(row) < length:
            row += WORDS[int(torch.randint(0, len(WORDS), (1,), generator=generator))]
        rows.append(row[:length])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def trained_model() -> MTPTransformer:
    """A model whose extra heads have learned the words, so most drafts inside a word are accepted."""
    torch.manual_seed(0)
    model = small_model(std=0.02).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        batch = word_sequences(8, 32, generator)
        optimizer.zero_grad()
        mtp_forward_backward(model, batch, batch.clone())
        optimizer.step()
    return model.eval()


def greedy(model: MTPTransformer, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    return generate_ids(model, [prompt], max_new_tokens=max_new_tokens, **kwargs)[0].token_ids


def test_random_heads_give_plain_greedy_tokens_for_every_number_of_heads() -> None:
    model = small_model(seed=1)
    generator = torch.Generator().manual_seed(1)
    for n_heads in (1, 2, 4):
        for length in (1, 5, 11):
            prompt = torch.randint(0, VOCAB, (length,), generator=generator).tolist()
            result, stats = speculative_generate_ids(model, prompt, max_new_tokens=30, n_heads=n_heads)
            assert result.token_ids == greedy(model, prompt, 30), (n_heads, length)
            assert result.finish_reason == "length"
            assert stats.new_tokens == 30 and len(stats.acceptance_rates) == n_heads - 1
    # one head: nothing to draft, so exactly one forward per token
    assert speculative_generate_ids(model, [1, 2], max_new_tokens=7, n_heads=1)[1].forwards == 7


def test_trained_heads_are_accepted_and_output_is_still_plain_greedy(trained_model: MTPTransformer) -> None:
    total = SpeculativeStats(trained_model.n_future_tokens)
    generator = torch.Generator().manual_seed(5)
    for prompt in word_sequences(4, 9, generator).tolist():
        result, stats = speculative_generate_ids(trained_model, prompt, max_new_tokens=60)
        assert result.token_ids == greedy(trained_model, prompt, 60)
        total.add(stats)
    rates = total.acceptance_rates
    # mostly accepted, but word boundaries reject some drafts: both branches of verification ran
    assert rates[0] > 0.6 and min(rates) < 1.0, rates
    accepted = total.accepted
    assert all(a >= b for a, b in pairwise(accepted))  # a later draft needs every earlier one
    assert total.tokens_per_forward > 2.0, total.to_dict()
    assert total.new_tokens == 4 * 60


def test_tokens_counted_per_forward_add_up(trained_model: MTPTransformer) -> None:
    prompt = WORDS[0] + WORDS[1]
    result, stats = speculative_generate_ids(trained_model, prompt, max_new_tokens=50)
    # the prefill yields one token; each verification yields its accepted drafts plus head 1's token,
    # except the last one, which may stop at the budget before using head 1's token
    verifications = stats.forwards - 1
    produced = 1 + verifications + sum(stats.accepted)
    assert produced - 1 <= stats.new_tokens <= produced
    assert stats.new_tokens == len(result.token_ids) == 50


def test_stops_and_budget_match_plain_greedy(trained_model: MTPTransformer) -> None:
    prompt = WORDS[2] + WORDS[0][:2]
    plain = greedy(trained_model, prompt, 40)
    for max_new_tokens in (1, 2, 3, 5, 9):  # budgets that end in the middle of a drafted block
        result, _ = speculative_generate_ids(trained_model, prompt, max_new_tokens=max_new_tokens)
        assert result.token_ids == plain[:max_new_tokens] and result.finish_reason == "length"
    stop_token = plain[13]
    result, _ = speculative_generate_ids(trained_model, prompt, max_new_tokens=40, stop_ids={stop_token})
    assert result.token_ids == greedy(trained_model, prompt, 40, stop_ids={stop_token})
    assert result.finish_reason == "eos" and result.token_ids[-1] == stop_token
    result, _ = speculative_generate_ids(trained_model, prompt, max_new_tokens=40,
                                         stop_when=lambda row, ids: len(ids) >= 2 and ids[-2:] == plain[10:12])
    assert result.finish_reason == "stop" and result.token_ids == plain[:12]


def test_bad_arguments_are_rejected() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="n_heads"):
        speculative_generate_ids(model, [1], n_heads=5)
    with pytest.raises(ValueError, match="at least one token"):
        speculative_generate_ids(model, [])


def recomputed_speculative(model: MTPTransformer, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Blockwise decoding without a cache: every step runs the whole model over the whole sequence.

    Returns the tokens and, per verification, how many drafts it checked and accepted: what the cached decoder
    must reproduce if its draft heads' caches hold exactly the accepted tokens' keys and values.
    """
    sequence, generated, verifications = list(prompt), [], []
    all_heads = model(torch.tensor([sequence]), return_all_heads=True).logits[0, -1].argmax(-1).tolist()
    next_token, drafts = all_heads[0], all_heads[1:]
    while True:
        generated.append(next_token)
        if len(generated) == max_new_tokens:
            return generated, verifications
        drafts = drafts[: max_new_tokens - len(generated) - 1]
        block = [next_token, *drafts]
        greedy = model(torch.tensor([sequence + block]), return_all_heads=True).logits[0, len(sequence):].argmax(-1)
        n_accepted = 0
        while n_accepted < len(drafts) and drafts[n_accepted] == greedy[n_accepted, 0]:
            n_accepted += 1
        verifications.append((len(drafts), n_accepted))
        generated += drafts[:n_accepted]
        if len(generated) >= max_new_tokens:
            return generated[:max_new_tokens], verifications
        sequence += block[: n_accepted + 1]
        next_token, drafts = int(greedy[n_accepted, 0]), greedy[n_accepted, 1:].tolist()


@torch.inference_mode()
def test_drafts_and_acceptances_match_a_decoder_without_cache(trained_model: MTPTransformer) -> None:
    generator = torch.Generator().manual_seed(9)
    for prompt in word_sequences(3, 7, generator).tolist():
        tokens, verifications = recomputed_speculative(trained_model, prompt, 45)
        result, stats = speculative_generate_ids(trained_model, prompt, max_new_tokens=45)
        assert result.token_ids == tokens
        assert stats.forwards == 1 + len(verifications)
        expected = SpeculativeStats(trained_model.n_future_tokens)
        for n_drafts, n_accepted in verifications:
            expected.record(n_drafts, n_accepted)
        assert (stats.drafted, stats.accepted) == (expected.drafted, expected.accepted)


# ----------------------------------------------------------------------------- speculative sampling


def tiny_peaked_model() -> MTPTransformer:
    """Four tokens, three heads, weights large enough that the distributions are far from uniform and
    the draft heads disagree with head 1 (so drafts are both accepted and rejected)."""
    args = ModelArgs(dim=16, n_layers=4, n_heads=2, n_kv_heads=1, vocab_size=4, ffn_hidden_dim=32,
                     n_future_tokens=3, tie_embeddings=False)
    model = MTPTransformer(args)
    model.init_weights(seed=11, std=0.6)
    return model.double().eval()


@torch.no_grad()
def exact_sequence_probabilities(model, prompt: list[int], length: int, temperature: float, top_p: float) -> dict:
    """P(continuation) for every continuation of `length` tokens, from head 1 alone, by enumeration."""
    out = {(): 1.0}
    for _ in range(length):
        grown = {}
        for prefix, mass in out.items():
            logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1, 0]
            probs = sampling_distribution(logits, temperature=temperature, top_p=top_p)
            for token, p in enumerate(probs.tolist()):
                grown[prefix + (token,)] = mass * p
        out = grown
    return out


def chi_square_p_value(counts: dict, probabilities: dict, n: int) -> float:
    """Pearson's goodness of fit over the outcomes with expected count >= 5 (the rest pooled)."""
    big = [k for k, p in probabilities.items() if p * n >= 5]
    observed = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    expected = [probabilities[k] * n for k in big] + [n * (1 - sum(probabilities[k] for k in big))]
    if expected[-1] < 5:  # nothing worth a pooled cell
        observed, expected = observed[:-1], expected[:-1]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_speculative_sampling_keeps_the_models_distribution(temperature, top_p):
    """4000 four-token continuations drawn speculatively (up to two drafts per verification) fit the exact
    distribution of plain sampling (chi-square p > 0.001, seeded, so the test is deterministic); the
    draft heads' own distribution, which accepting every draft would give, is rejected by the same test."""
    model, prompt, n = tiny_peaked_model(), [1, 2], 4000
    exact = exact_sequence_probabilities(model, prompt, 4, temperature, top_p)
    counts: dict = {}
    stats = SpeculativeStats(3)
    for seed in range(n):
        result, one = speculative_sample_ids(model, prompt, temperature=temperature, top_p=top_p, max_new_tokens=4,
                                             seed=seed)
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
        stats.add(one)
    assert chi_square_p_value(counts, exact, n) > 1e-3
    assert all(0.05 < rate < 0.95 for rate in stats.acceptance_rates)  # drafts of both heads accepted and rejected
    assert stats.tokens_per_forward > 1.1  # plain sampling makes one forward per token

    with torch.inference_mode():  # what accepting every draft would sample: heads 2 and 3 at the prompt
        logits = model(torch.tensor([prompt]), return_all_heads=True).logits[0, -1]
        heads = sampling_distribution(logits, temperature=temperature, top_p=top_p)
    drafted = {(a, b, c, d): float(heads[0, a] * heads[1, b] * heads[2, c]) * exact_next(model, prompt, (a, b, c), d, temperature, top_p)
               for (a, b, c, d) in exact}
    assert chi_square_p_value(counts, drafted, n) < 1e-6


@torch.no_grad()
def exact_next(model, prompt: list[int], prefix: tuple, token: int, temperature: float, top_p: float) -> float:
    logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1, 0]
    return float(sampling_distribution(logits, temperature=temperature, top_p=top_p)[token])


def test_plain_sampling_passes_the_same_test():
    model, prompt, n = tiny_peaked_model(), [1, 2], 4000
    exact = exact_sequence_probabilities(model, prompt, 4, 1.0, 1.0)
    counts: dict = {}
    for seed in range(n):
        (result,) = generate_ids(model, [prompt], max_new_tokens=4, temperature=1.0, seeds=[seed])
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
    assert chi_square_p_value(counts, exact, n) > 1e-3


def test_speculative_sampling_refuses_greedy():
    with pytest.raises(ValueError, match="temperature > 0"):
        speculative_sample_ids(tiny_peaked_model(), [1], temperature=0.0)
