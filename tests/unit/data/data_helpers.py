"""Helpers for the data tests: a small real BPE tokenizer, and dataset writers."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

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


LANGUAGES = {"UNKNOWN_LANGUAGE": 0, "PYTHON": 1, "CPP": 2, "PYTHON3": 3, "JAVA": 4}


def codecontests_rows(n_problems: int = 6, seed: int = 0) -> list[dict]:
    """Problems in the published CodeContests schema, with solutions in every language."""
    rng = random.Random(seed)
    rows = []
    for p in range(n_problems):
        def solutions(correct: bool) -> dict:
            languages, programs = [], []
            for k in range(rng.randint(1, 4)):
                op = "+" if correct else "-"
                languages.append(LANGUAGES["PYTHON3"])
                programs.append(f"a, b = map(int, input().split())\nprint(a {op} b{' + 0' * k})\n")
            languages += [LANGUAGES["CPP"], LANGUAGES["PYTHON"], LANGUAGES["JAVA"]]
            programs += ["#include <cstdio>\nint main(){}\n", "print 'py2'\n", "class Main {}\n"]
            order = list(range(len(languages)))
            rng.shuffle(order)
            return {"language": [languages[i] for i in order], "solution": [programs[i] for i in order]}

        rows.append(
            {
                "name": f"{100 + p}_A. Sum {p}",
                "description": f"Problem {p}: read two integers a and b and print a + b.\n\nExample\n\nInput\n\n1 2\n\nOutput\n\n3\n",
                "public_tests": {"input": ["1 2\n"], "output": ["3\n"]},
                "private_tests": {"input": ["5 7\n", "0 0\n"], "output": ["12\n", "0\n"]},
                "generated_tests": {"input": ["10 -3\n"], "output": ["7\n"]},
                "source": 2,
                "difficulty": [1, 2, 7, 8, 11, 3][p % 6],
                "solutions": solutions(True),
                "incorrect_solutions": solutions(False),
                "cf_contest_id": 100 + p,
                "cf_index": "A",
                "cf_points": 500.0,
                "cf_rating": 800 + 100 * p,
                "cf_tags": ["math"],
                "is_description_translated": False,
                "untranslated_description": "",
                "time_limit": {"seconds": 2, "nanos": 0},
                "memory_limit_bytes": 256000000,
                "input_file": "",
                "output_file": "",
            }
        )
    return rows


def write_codecontests(raw_dir: Path, split: str, rows: list[dict], fmt: str) -> Path:
    """Write rows as `<raw>/codecontests/<split>.jsonl` or the hub's `data/<split>-00000-of-00001.parquet`."""
    root = raw_dir / "codecontests"
    if fmt == "jsonl":
        path = root / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


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
