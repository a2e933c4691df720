"""Batched generation: cached greedy equals repeated full forwards, padding, nucleus sampling, seeds, stops."""

from __future__ import annotations

import pytest
import torch

from weighted_mtp.eval.generation import (
    Completion,
    generate,
    generate_ids,
    length_batches,
    nucleus_mask,
    row_seed,
    sample_next,
)
from weighted_mtp.models.tokenizer import Tokenizer
from weighted_mtp.models.transformer import ModelArgs, MTPTransformer

VOCAB = 97


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: threads only add contention (and this machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(vocab_size: int = VOCAB, n_future_tokens: int = 2, seed: int = 0) -> MTPTransformer:
    args = ModelArgs(dim=48, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=vocab_size, ffn_hidden_dim=80,
                     rope_theta=500.0, n_future_tokens=n_future_tokens)
    model = MTPTransformer(args)
    model.init_weights(seed, std=0.1)
    return model.eval()


@torch.no_grad()
def greedy_by_full_forward(model: MTPTransformer, prompt: list[int], max_new_tokens: int,
                           stop_ids: set[int] = frozenset()) -> list[int]:
    """The straightforward reference: no cache, no padding, the whole sequence through the model each step."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([tokens])).logits[0, -1, 0].argmax())
        tokens.append(token)
        if token in stop_ids:
            break
    return tokens[len(prompt):]


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A small real byte-level BPE (the kind SmolLM2 uses), fitted in milliseconds to some code."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20
    backend.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    backend.save(str(path))
    return Tokenizer.from_file(path)


# ----------------------------------------------------------------------------- padding and greedy


@torch.no_grad()
def test_left_padded_prompt_gives_the_same_logits_as_alone_while_decoding() -> None:
    model = small_model()
    short, long = random_prompts([4, 9])
    pad = len(long) - len(short)
    batch = torch.tensor([[0] * pad + short, long])
    mask = torch.ones(2, len(long) + 3, dtype=torch.long)
    mask[0, :pad] = 0
    cache = model.new_cache(2, len(long) + 3)
    padded_steps = [model(batch, cache=cache, attention_mask=mask).logits[0, -1, 0]]
    alone = list(short)
    expected = [model(torch.tensor([alone])).logits[0, -1, 0]]
    for step in range(3):
        token = int(expected[-1].argmax())
        alone.append(token)
        expected.append(model(torch.tensor([alone])).logits[0, -1, 0])
        step_tokens = torch.tensor([[token], [token]])
        padded_steps.append(model(step_tokens, start_pos=len(long) + step, cache=cache, attention_mask=mask).logits[0, -1, 0])
    torch.testing.assert_close(torch.stack(padded_steps), torch.stack(expected), atol=1e-4, rtol=1e-4)


def test_greedy_with_cache_and_padding_equals_repeated_full_forward() -> None:
    model = small_model()
    prompts = random_prompts([3, 8, 5, 1])
    results = generate_ids(model, prompts, max_new_tokens=10, temperature=0.0, pad_id=0)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == greedy_by_full_forward(model, prompt, 10)
        assert result.finish_reason == "length"


def test_rows_stop_at_their_stop_token_and_the_rest_continue() -> None:
    model = small_model()
    prompts = random_prompts([6, 2, 7], seed=3)
    plain = [greedy_by_full_forward(model, p, 12) for p in prompts]
    stop_token = plain[0][4]  # ends row 0 early (and any other row that produces it)
    results = generate_ids(model, prompts, max_new_tokens=12, stop_ids={stop_token})
    for prompt, result in zip(prompts, results):
        expected = greedy_by_full_forward(model, prompt, 12, stop_ids={stop_token})
        assert result.token_ids == expected
        assert result.finish_reason == ("eos" if expected[-1] == stop_token else "length")
    assert results[0].finish_reason == "eos" and len(results[0].token_ids) <= 5


def test_stop_when_hook_ends_only_its_row() -> None:
    model = small_model()
    prompts = random_prompts([4, 4, 6], seed=5)
    results = generate_ids(model, prompts, max_new_tokens=8, stop_when=lambda row, ids: row == 1 and len(ids) == 3)
    assert [len(r.token_ids) for r in results] == [8, 3, 8]
    assert [r.finish_reason for r in results] == ["length", "stop", "length"]
    assert results[2].token_ids == greedy_by_full_forward(model, prompts[2], 8)


@pytest.fixture(scope="module")
def compiled_model() -> MTPTransformer:
    """One model for the compiled-step tests, so that its step compiles once (about 15 s)."""
    return small_model(seed=2)


def test_compiled_decoding_equals_repeated_full_forward(compiled_model) -> None:
    model = compiled_model
    prompts = random_prompts([6, 2, 7], seed=11)
    stop_token = greedy_by_full_forward(model, prompts[0], 12)[4]  # row 0 finishes early and decodes on, unread
    results = generate_ids(model, prompts, max_new_tokens=12, stop_ids={stop_token}, compiled=True)
    for prompt, result in zip(prompts, results):
        expected = greedy_by_full_forward(model, prompt, 12, stop_ids={stop_token})
        assert result.token_ids == expected
        assert result.finish_reason == ("eos" if expected[-1] == stop_token else "length")
    assert results[0].finish_reason == "eos"


def test_compiled_sampling_draws_what_the_eager_step_draws(compiled_model) -> None:
    prompts = random_prompts([5, 3, 8], seed=12)
    eager = generate_ids(compiled_model, prompts, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=4)
    compiled = generate_ids(compiled_model, prompts, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=4, compiled=True)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]


def test_bad_arguments_are_rejected() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[1, 2], []])
    with pytest.raises(ValueError, match="top_p"):
        generate_ids(model, [[1, 2]], top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(model, [[1, 2]], max_new_tokens=0)
    assert generate_ids(model, []) == []


# ----------------------------------------------------------------------------- sampling rule


def nucleus_reference(probs: list[float], top_p: float) -> set[int]:
    """Tokens of the smallest most-likely-first set whose mass reaches top_p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


def test_nucleus_mask_matches_a_plain_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    for top_p in (0.05, 0.3, 0.9, 0.999, 1.0):
        probs = torch.softmax(torch.randn(6, 40, generator=generator) * 2, dim=-1).double()
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = nucleus_mask(sorted_probs, top_p)
        for row in range(6):
            assert set(order[row][keep[row]].tolist()) == nucleus_reference(probs[row].tolist(), top_p)


def test_sampling_inverts_the_nucleus_cdf_at_the_rows_own_draw() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 30, generator=generator) * 3
    temperature, top_p = 0.7, 0.8
    seeds = [11, 12, 13, 14, 15]
    picked = sample_next(logits, temperature=temperature, top_p=top_p,
                         generators=[torch.Generator().manual_seed(s) for s in seeds])
    for row, seed in enumerate(seeds):
        probs = torch.softmax(logits[row].double() / temperature, dim=-1).tolist()
        kept = sorted(nucleus_reference(probs, top_p), key=lambda i: -probs[i])
        total = sum(probs[i] for i in kept)
        draw = float(torch.rand(1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)) * total
        cumulative, expected = 0.0, kept[-1]
        for i in kept:
            cumulative += probs[i]
            if cumulative > draw:
                expected = i
                break
        assert int(picked[row]) == expected


def test_sampled_frequencies_follow_the_renormalised_nucleus() -> None:
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])
    n = 20_000
    temperature, top_p = 1.3, 0.85
    picks = sample_next(logits.expand(n, -1), temperature=temperature, top_p=top_p,
                        generators=[torch.Generator().manual_seed(row_seed(0, i, 0)) for i in range(n)])
    probs = torch.softmax(logits / temperature, dim=-1)
    kept = sorted(nucleus_reference(probs.tolist(), top_p))
    expected = torch.zeros_like(probs)
    expected[kept] = probs[kept] / probs[kept].sum()
    observed = torch.bincount(picks, minlength=6).double() / n
    assert set(picks.unique().tolist()) == set(kept)
    torch.testing.assert_close(observed, expected.double(), atol=0.015, rtol=0)
    unfiltered = sample_next(logits.expand(n, -1), temperature=temperature, top_p=1.0,
                             generators=[torch.Generator().manual_seed(row_seed(1, i, 0)) for i in range(n)])
    torch.testing.assert_close(torch.bincount(unfiltered, minlength=6).double() / n, probs.double(), atol=0.015, rtol=0)


def test_greedy_is_argmax_and_sampling_needs_a_generator_per_row() -> None:
    logits = torch.randn(3, 10)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    with pytest.raises(ValueError, match="one generator per row"):
        sample_next(logits, temperature=1.0, generators=[torch.Generator()])


# ----------------------------------------------------------------------------- text


def test_same_seed_same_samples_whatever_the_batch_size(char_tokenizer: Tokenizer) -> None:
    model = small_model(vocab_size=char_tokenizer.vocab_size)
    prompts = ["def add(a, b):", "for i in", "print(i)\n"]
    kwargs = {"n_samples": 3, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8}
    first = generate(model, char_tokenizer, prompts, seed=7, **kwargs)
    again = generate(model, char_tokenizer, prompts, seed=7, batch_size=2, **kwargs)
    other = generate(model, char_tokenizer, prompts, seed=8, **kwargs)

    def ids(result):
        return [[c.token_ids for c in samples] for samples in result]

    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert all(len(samples) == 3 for samples in first)
    assert len({tuple(c.token_ids) for samples in first for c in samples}) > 3  # samples differ


def test_greedy_samples_repeat_and_match_generate_ids(char_tokenizer: Tokenizer) -> None:
    model = small_model(vocab_size=char_tokenizer.vocab_size)
    result = generate(model, char_tokenizer, ["def add(a, b):", "x"], n_samples=2, max_new_tokens=6)
    for prompt, (a, b) in zip(["def add(a, b):", "x"], result):
        assert isinstance(a, Completion) and a == b
        expected = greedy_by_full_forward(model, char_tokenizer.encode(prompt), 6, set(char_tokenizer.stop_ids))
        assert a.token_ids == expected and a.n_tokens == len(expected)
        assert a.text == char_tokenizer.decode(expected)
        assert a.to_dict() == {"text": a.text, "n_tokens": len(expected), "finish_reason": a.finish_reason}


def test_stop_sequences_cut_the_text_and_end_the_row(char_tokenizer: Tokenizer) -> None:
    model = small_model(vocab_size=char_tokenizer.vocab_size, seed=2)
    prompts = ["def add(a, b):", "for i"]
    full = generate(model, char_tokenizer, prompts, max_new_tokens=24)
    text = full[0][0].text
    assert len(text) > 12, text
    stop = text[8:11]
    stopped = generate(model, char_tokenizer, prompts, max_new_tokens=24, stop=[stop, "\x00never"])
    first = stopped[0][0]
    assert first.finish_reason == "stop"
    assert first.text == text[: text.find(stop)]
    assert first.token_ids == full[0][0].token_ids[: first.n_tokens]
    # it stopped at the first token whose text completes the stop sequence
    assert stop in char_tokenizer.decode(first.token_ids)
    assert stop not in char_tokenizer.decode(first.token_ids[:-1])
    # the other row is unaffected unless it produces the same stop sequence
    if stop not in full[1][0].text:
        assert stopped[1][0] == full[1][0]


def test_speculative_generate_gives_the_same_completions(char_tokenizer: Tokenizer) -> None:
    model = small_model(vocab_size=char_tokenizer.vocab_size, n_future_tokens=3, seed=4)
    prompts = ["def add(a, b):", "for i in range"]
    plain = generate(model, char_tokenizer, prompts, n_samples=2, max_new_tokens=16, stop=["\n\n", "ab"])
    fast = generate(model, char_tokenizer, prompts, n_samples=2, max_new_tokens=16, stop=["\n\n", "ab"],
                    speculative=True)
    assert fast == plain


def test_generation_dtype_is_bf16_only_where_the_device_computes_it(monkeypatch):
    import torch

    import weighted_mtp.models.loading as loading
    from weighted_mtp.config.schema import Config

    cpu = torch.device("cpu")
    assert loading.generation_dtype(Config(generation_dtype="float32"), cpu) == "float32"
    monkeypatch.setattr(loading, "native_bf16", lambda device: True)
    assert loading.generation_dtype(Config(), cpu) == "bfloat16"
    monkeypatch.setattr(loading, "native_bf16", lambda device: False)
    assert loading.generation_dtype(Config(dtype="float16"), cpu) == "float16"
    assert loading.native_bf16(torch.device("mps")) is False


@pytest.mark.parametrize("seed", range(5))
def test_length_batches_bound_rows_and_padded_prompt_tokens(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    lengths = sorted((int(n) for n in torch.randint(1, 400, (60,), generator=generator)), reverse=True)
    lengths[0] = 3733  # an outlier, as in MBPP test
    batch_size, max_tokens = 16, 1024
    batches = length_batches(lengths, batch_size, max_tokens)
    # a straightforward reference: grow each batch one row at a time while both bounds hold
    expected, start = [], 0
    while start < len(lengths):
        end = start + 1
        while end < len(lengths) and end - start < batch_size and (end + 1 - start) * lengths[start] <= max_tokens:
            end += 1
        expected.append((start, end))
        start = end
    assert [(b.start, b.stop) for b in batches] == expected
    assert lengths[batches[0]] == [3733]  # alone: 2 x 3733 is over the budget
    assert sum(b.stop - b.start for b in batches) == len(lengths)
