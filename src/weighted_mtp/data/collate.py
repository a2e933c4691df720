"""Tokenised examples and the `Batch` the trainer consumes.

Labels follow the HF convention the MTP loss uses: aligned with input_ids, -100 where there is no
loss (prompt and padding), so one mask drives every head's targets. Padding is on the right.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

IGNORE_INDEX = -100


class EncodingTokenizer(Protocol):
    eos_id: int
    pad_id: int

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 for real tokens
    labels: torch.Tensor  # [B, T] long, -100 for prompt and padding
    rewards: torch.Tensor  # [B] float, 1 correct, 0 incorrect
    problem_ids: list[str]
    is_pair: bool = False  # rows (2i, 2i+1) are (correct, incorrect) of one problem

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device, non_blocking=non_blocking),
            attention_mask=self.attention_mask.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            rewards=self.rewards.to(device, non_blocking=non_blocking),
            problem_ids=list(self.problem_ids),
            is_pair=self.is_pair,
        )

    def pin_memory(self) -> Batch:
        return Batch(
            self.input_ids.pin_memory(),
            self.attention_mask.pin_memory(),
            self.labels.pin_memory(),
            self.rewards.pin_memory(),
            list(self.problem_ids),
            self.is_pair,
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens get no loss
    reward: float
    problem_id: str


def encode_example(
    prompt: str,
    response: str,
    tokenizer: EncodingTokenizer,
    max_length: int,
    *,
    reward: float,
    problem_id: str,
    add_bos: bool = True,
) -> Example:
    """Tokenise prompt and response (+ EOS) separately, so the loss mask falls exactly on the response.

    Too long: the response keeps at least half of max_length and the prompt loses its beginning
    (its end, right before the response, matters most); then the response is cut at the end.
    """
    prompt_ids = tokenizer.encode(prompt, add_bos=add_bos)
    response_ids = tokenizer.encode(response) + [tokenizer.eos_id]
    if len(prompt_ids) + len(response_ids) > max_length:
        keep_response = min(len(response_ids), max(max_length - len(prompt_ids), max_length // 2))
        keep_prompt = max_length - keep_response
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :] if keep_prompt else []
        response_ids = response_ids[:keep_response]
    return Example(prompt_ids + response_ids, len(prompt_ids), float(reward), problem_id)


def collate(examples: Sequence[Example], pad_id: int, *, is_pair: bool = False) -> Batch:
    """One row per example, right-padded to the longest."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, example.n_prompt : len(ids)] = ids[example.n_prompt :]
    rewards = torch.tensor([e.reward for e in examples], dtype=torch.float32)
    return Batch(input_ids, attention_mask, labels, rewards, [e.problem_id for e in examples], is_pair)


def pack(examples: Sequence[Example], max_length: int, pad_id: int) -> Batch:
    """Concatenate examples into rows of at most max_length tokens (in order, a new row when one is full).

    Packed examples attend to earlier ones in the same row (the model takes a key mask, not a
    block-diagonal one); each keeps its own loss mask. A row's reward is the lowest of its examples
    and its problem id joins theirs with ','.
    """
    rows: list[list[Example]] = [[]]
    for example in examples:
        if rows[-1] and sum(len(e.input_ids) for e in rows[-1]) + len(example.input_ids) > max_length:
            rows.append([])
        rows[-1].append(example)
    merged = [
        Example(
            input_ids=[t for e in row for t in e.input_ids],
            n_prompt=0,
            reward=min(e.reward for e in row),
            problem_id=",".join(e.problem_id for e in row),
        )
        for row in rows
    ]
    batch = collate(merged, pad_id)
    for b, row in enumerate(rows):
        start = 0
        for e in row:
            batch.labels[b, start : start + e.n_prompt] = IGNORE_INDEX
            start += len(e.input_ids)
    return batch


def example_from_record(record: dict[str, Any], prompt: str, response: str, tokenizer, max_length: int,
                        add_bos: bool = True) -> Example:
    return encode_example(
        prompt,
        response,
        tokenizer,
        max_length,
        reward=1.0 if record["is_correct"] else 0.0,
        problem_id=str(record["problem_id"]),
        add_bos=add_bos,
    )
