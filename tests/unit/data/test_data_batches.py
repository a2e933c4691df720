"""Templates, tokenised examples, collation, packing and the training loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weighted_mtp.config.schema import Config
from weighted_mtp.data.collate import IGNORE_INDEX, Example, collate, encode_example, pack
from weighted_mtp.data.loader import TrainLoader, build_loader
from weighted_mtp.data.samplers import select
from weighted_mtp.data.templates import MBPP_FEWSHOT_EXAMPLES, alpaca_prompt, mbpp_fewshot_prompt, render
from weighted_mtp.errors import DataError

# ----------------------------------------------------------------------------- templates


def test_alpaca_with_and_without_input():
    assert alpaca_prompt("Add.", "assert f(1) == 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\nassert f(1) == 2\n\n### Response:\n"
    )
    assert alpaca_prompt("Add.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd.\n\n### Response:\n"
    )


def test_mbpp_fewshot_prompt_is_the_standard_three_shot():
    prompt = mbpp_fewshot_prompt("Write a function to add.", "assert add(1, 2) == 3")
    blocks = prompt.split("You are an expert Python programmer, and here is your task: ")[1:]
    assert len(blocks) == 4
    for block, example in zip(blocks, MBPP_FEWSHOT_EXAMPLES):
        tests = "\n".join(example["test_list"])
        assert block == f"{example['text']} Your code should pass these tests:\n\n{tests}\n[BEGIN]\n{example['code']}\n[DONE]\n"
    assert blocks[3] == "Write a function to add. Your code should pass these tests:\n\nassert add(1, 2) == 3\n[BEGIN]\n"
    assert [e["code"].split("def ")[1].split("(")[0] for e in MBPP_FEWSHOT_EXAMPLES] == [
        "similar_elements", "is_not_prime", "heap_queue_largest"
    ]
    record = {"instruction": "t", "input": "assert f()", "output": "def f(): pass"}
    assert render("mbpp_fewshot", record)[1] == "def f(): pass\n[DONE]"


def test_chat_template_uses_the_tokenizer(tokenizer):
    prompt, response = render("chat", {"instruction": "Add.", "input": "x", "output": "y"}, tokenizer)
    assert prompt == "<|im_start|>user\nAdd.\n\nx<|im_end|>\n<|im_start|>assistant\n" and response == "y"


# ----------------------------------------------------------------------------- examples and collation


def _reference_row(tokenizer, prompt, response, add_bos=True):
    """Straightforward: prompt ids then response ids + EOS; labels only on the latter."""
    p = tokenizer.encode(prompt, add_bos=add_bos)
    r = tokenizer.encode(response) + [tokenizer.eos_id]
    return p + r, [IGNORE_INDEX] * len(p) + r


def test_collate_right_pads_and_masks_everything_but_the_response(tokenizer):
    pairs = [("Write add.", "def add(a, b):\n    return a + b"), ("Hi", "x = 1"), ("A longer prompt " * 5, "pass")]
    examples = [encode_example(p, r, tokenizer, 512, reward=i % 2, problem_id=f"p{i}") for i, (p, r) in enumerate(pairs)]
    batch = collate(examples, tokenizer.pad_id)
    width = max(len(_reference_row(tokenizer, p, r)[0]) for p, r in pairs)
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape == (3, width)
    for row, (p, r) in enumerate(pairs):
        ids, labels = _reference_row(tokenizer, p, r)
        pad = width - len(ids)
        assert batch.input_ids[row].tolist() == ids + [tokenizer.pad_id] * pad
        assert batch.labels[row].tolist() == labels + [IGNORE_INDEX] * pad
        assert batch.attention_mask[row].tolist() == [1] * len(ids) + [0] * pad
        assert tokenizer.decode(batch.input_ids[row][batch.labels[row] != IGNORE_INDEX].tolist()) == r
    assert batch.rewards.tolist() == [0.0, 1.0, 0.0] and batch.problem_ids == ["p0", "p1", "p2"]
    assert batch.to("cpu").input_ids.dtype == torch.long and len(batch) == 3


@pytest.mark.parametrize("max_length", [16, 40, 64])
def test_truncation_keeps_the_prompt_end_and_half_for_the_response(tokenizer, max_length):
    prompt, response = "describe the task " * 20, "value = total + 1\n" * 20
    example = encode_example(prompt, response, tokenizer, max_length, reward=1, problem_id="p")
    full_prompt = tokenizer.encode(prompt, add_bos=True)
    full_response = tokenizer.encode(response) + [tokenizer.eos_id]
    assert len(example.input_ids) == max_length
    n_response = max_length - example.n_prompt
    assert n_response >= max_length // 2
    assert example.input_ids[: example.n_prompt] == full_prompt[len(full_prompt) - example.n_prompt :]
    assert example.input_ids[example.n_prompt :] == full_response[:n_response]


def test_pack_concatenates_in_order_with_each_loss_mask(tokenizer):
    examples = [
        encode_example(f"task {i}", "x = 1\n" * (i + 1), tokenizer, 64, reward=1, problem_id=f"p{i}") for i in range(6)
    ]
    batch = pack(examples, 48, tokenizer.pad_id)
    flat_ids = [t for e in examples for t in e.input_ids]
    flat_labels = [t for e in examples for t in [IGNORE_INDEX] * e.n_prompt + e.input_ids[e.n_prompt :]]
    got_ids, got_labels = [], []
    for row in range(len(batch)):
        n = int(batch.attention_mask[row].sum())
        assert n <= 48
        got_ids += batch.input_ids[row, :n].tolist()
        got_labels += batch.labels[row, :n].tolist()
        assert (batch.labels[row, n:] == IGNORE_INDEX).all()
    assert got_ids == flat_ids and got_labels == flat_labels
    assert len(batch) < len(examples) and ",".join(batch.problem_ids) == ",".join(e.problem_id for e in examples)


def test_pack_rows_fit_exactly():
    examples = [Example([1, 2, 3], 1, 1.0, "a"), Example([4, 5], 0, 1.0, "b"), Example([6, 7, 8, 9], 2, 1.0, "c")]
    batch = pack(examples, 5, pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch.labels.tolist() == [[-100, 2, 3, 4, 5], [-100, -100, 8, 9, -100]]


# ----------------------------------------------------------------------------- loader


@pytest.fixture
def config(shared_data, tmp_path) -> Config:
    return Config.model_validate(
        {
            "seed": 7,
            "paths": {"raw_data": str(shared_data), "datasets": str(tmp_path / "datasets")},
            "data": {"dataset": "mbpp", "max_length": 96, "sampler": "correct_only", "n_samples": 24},
            "training": {"batch_size": 4},
        }
    )


def _rows(batches):
    return [tuple(map(tuple, b.input_ids.tolist())) for b in batches]


def test_build_loader_prepares_then_yields_batches(config, tokenizer):
    loader = build_loader(config, tokenizer, split="validation")
    assert (config.paths.datasets / "mbpp" / "processed" / "validation_metadata.json").is_file()
    batches = list(loader)
    assert len(batches) == len(loader) == 6
    for batch in batches:
        assert batch.input_ids.shape[0] == 4 and batch.input_ids.shape[1] <= 96
        assert (batch.rewards == 1).all() and not batch.is_pair
        assert ((batch.labels == IGNORE_INDEX) | (batch.labels == batch.input_ids)).all()
        assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
    # epoch 1 comes next on its own, in another order; a fresh loader repeats epoch 0
    assert _rows(list(loader)) != _rows(batches)
    assert _rows(list(build_loader(config, tokenizer, split="validation"))) == _rows(batches)


def test_prefetching_threads_give_the_same_batches(config, tokenizer):
    plain = _rows(list(build_loader(config, tokenizer, split="validation")))
    threaded = config.model_copy(update={"data": config.data.model_copy(update={"num_workers": 2})})
    loader = build_loader(threaded, tokenizer, split="validation")
    assert _rows(list(loader)) == plain
    iterator = iter(loader)  # epoch 1, abandoned after one batch: the pool shuts down cleanly
    next(iterator)
    iterator.close()
    assert loader.state_dict()["batches_done"] == 1


def test_resume_continues_exactly_where_it_stopped(config, tokenizer):
    uninterrupted = _rows(list(build_loader(config, tokenizer, split="validation")))
    first = build_loader(config, tokenizer, split="validation")
    iterator = iter(first)
    head = [next(iterator), next(iterator)]
    state = first.state_dict()
    resumed = build_loader(config, tokenizer, split="validation")
    resumed.load_state_dict(state)
    resumed.set_epoch(0)
    assert _rows(head) + _rows(list(resumed)) == uninterrupted
    assert resumed.state_dict()["epoch"] == 1
    with pytest.raises(DataError, match="seed was 7 when saved but is 8"):
        other = build_loader(config.model_copy(update={"seed": 8}), tokenizer, split="validation")
        other.load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_parts(config, tokenizer, world_size):
    loaders = [build_loader(config, tokenizer, split="validation", rank=r, world_size=world_size)
               for r in range(world_size)]
    per_rank = [[pid for b in loader for pid in b.problem_ids] for loader in loaders]
    assert len({len(loader) for loader in loaders}) == 1
    assert len({len(p) for p in per_rank}) == 1
    flat = [pid for part in per_rank for pid in part]
    assert len(set(flat)) == len(flat) == 24 - 24 % world_size


def test_pair_batches_keep_pairs_aligned(synthetic_index, tokenizer):
    loader = TrainLoader(synthetic_index, tokenizer, batch_size=4, max_length=128, seed=0, sampler="pairs",
                         max_pairs_per_problem=2)
    n_pairs = len(select(synthetic_index, "pairs", seed=0, max_pairs_per_problem=2))
    batches = list(loader)
    assert len(loader) == len(batches) == -(-n_pairs // 2)
    for batch in batches:
        assert batch.is_pair and batch.input_ids.shape[0] % 2 == 0
        assert batch.rewards.tolist() == [1.0, 0.0] * (batch.input_ids.shape[0] // 2)
        assert batch.problem_ids[0::2] == batch.problem_ids[1::2]
    with pytest.raises(DataError, match="batch_size must be even"):
        TrainLoader(synthetic_index, tokenizer, batch_size=3, max_length=64, seed=0, sampler="pairs")


def test_unshuffled_loader_reads_in_file_order(synthetic_index, tokenizer):
    loader = TrainLoader(synthetic_index, tokenizer, batch_size=5, max_length=64, seed=0, sampler="all", shuffle=False)
    ids = [pid for batch in loader for pid in batch.problem_ids]
    expected = [synthetic_index.problem_ids[p] for p in synthetic_index.problem_of_line]
    assert ids == expected


def test_packed_loader(synthetic_index, tokenizer):
    loader = TrainLoader(synthetic_index, tokenizer, batch_size=8, max_length=256, seed=0, pack=True)
    batch = next(iter(loader))
    assert batch.input_ids.shape[1] <= 256 and batch.input_ids.shape[0] <= 8
    assert sum(len(p.split(",")) for p in batch.problem_ids) == 8
    with pytest.raises(DataError, match="data.pack needs a correct-only sampler"):
        TrainLoader(synthetic_index, tokenizer, batch_size=2, max_length=64, seed=0, sampler="all", pack=True)


def test_loader_selection_is_rank_independent(synthetic_index, tokenizer):
    plan = select(synthetic_index, "correct_only", seed=3)
    loader = TrainLoader(synthetic_index, tokenizer, batch_size=2, max_length=64, seed=3, rank=1, world_size=2)
    truncated = plan[: len(plan) - len(plan) % 2]
    assert np.array_equal(loader._units(), truncated[1::2])


def test_a_position_saved_by_two_ranks_continues_on_one_or_three(config, tokenizer):
    """Two ranks that took two batches of four each consumed the selection's first 16 units (every
    second one each); one rank resumed from their state continues with the 17th, exactly as one
    process would; three ranks share the rest (less what does not divide by three) without repeats."""
    single = [row for batch in build_loader(config, tokenizer, split="validation") for row in _rows([batch])[0]]
    assert len(single) == 24
    ranks = [build_loader(config, tokenizer, split="validation", rank=r, world_size=2) for r in range(2)]
    taken = []
    for loader in ranks:
        iterator = iter(loader)
        taken += [row for _ in range(2) for row in _rows([next(iterator)])[0]]
    state = ranks[0].state_dict()
    assert state["units_done"] == 16 and sorted(taken) == sorted(single[:16])

    one = build_loader(config, tokenizer, split="validation")
    one.load_state_dict(state)
    one.set_epoch(0)
    rest = [row for batch in one for row in _rows([batch])[0]]
    assert rest == single[16:]

    three = [build_loader(config, tokenizer, split="validation", rank=r, world_size=3) for r in range(3)]
    for loader in three:
        loader.load_state_dict(state)
        loader.set_epoch(0)
    parts = [[row for batch in loader for row in _rows([batch])[0]] for loader in three]
    flat = [row for part in parts for row in part]
    assert len(flat) == 6 and len(set(flat)) == 6 and set(flat) <= set(single[16:])
    resumed_state = three[0].state_dict()  # the epoch ended: the next one starts from its beginning
    assert resumed_state["epoch"] == 1 and resumed_state["units_done"] == 0
