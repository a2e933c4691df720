"""Helpers for the data tests: a small real BPE tokenizer, and dataset writers (CodeContests in
`tests/fixtures/codecontests.py`, shared with the evaluation tests)."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from fixtures.codecontests import LANGUAGES, codecontests_rows, write_codecontests  # noqa: F401

SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_bpe(texts: Sequence[str], directory: Path, vocab_size: int = 800) -> Path:
    """Train a byte-level BPE and write tokenizer.json + tokenizer_config.json (what `Tokenizer.from_file` reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": SPECIAL[1], "eos_token": SPECIAL[2], "pad_token": SPECIAL[0], "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory / "tokenizer.json"


def mbpp_texts(shared_data: Path) -> list[str]:
    texts = []
    with open(shared_data / "mbpp" / "train.jsonl", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            texts += [row["text"], row["code"], *row["test_list"]]
    return texts


def synthetic_problems(n_problems: int = 40, seed: int = 0):
    """Problems with random numbers of correct/incorrect solutions of random lengths and difficulties."""
    from weighted_mtp.data.sources import Problem

    rng = random.Random(seed)
    words = ["x", "total", "value", "+=", "1", "return", "for", "i", "in", "range(n)", "\n", "    "]
    problems = []
    for p in range(n_problems):
        def program() -> str:
            return " ".join(rng.choice(words) for _ in range(rng.choice([3, 5, 8, 20, 40, 60])))

        problems.append(
            Problem(
                problem_id=f"synthetic/{p}",
                instruction=f"Task {p}: compute something.",
                input=f"assert f({p}) == {p}",
                difficulty=rng.choice([0, 1, 2, 4, 5, 8, 9, 12, 15]),
                tests={"kind": "assert", "cases": [f"assert f({p}) == {p}"]},
                correct=[program() for _ in range(rng.choice([0, 1, 2, 5, 9]))],
                incorrect=[program() for _ in range(rng.choice([0, 1, 3, 7]))],
            )
        )
    return problems
