"""Turn a source's problems into the processed JSONL and its index, in one streaming pass.

Every file is written under a temporary name and renamed into place; the metadata goes last and
records the size, mtime and hash of the others, so an interrupted prepare leaves either the old
split or an index that refuses to open, never a half-written file that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from weighted_mtp.data.index import FORMAT_VERSION, ROW_DTYPE, SplitIndex, SplitPaths, file_record
from weighted_mtp.data.sources import Problem, get_source
from weighted_mtp.errors import DataError
from weighted_mtp.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FINGERPRINT_PROBE = "def add(a, b):\n    return a + b  # sum, ünïcode\n"


class TextEncoder(Protocol):
    vocab_size: int

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...


def tokenizer_fingerprint(tokenizer: TextEncoder) -> dict[str, Any]:
    """Identifies the tokenizer whose lengths the index holds (lengths differ between tokenizers)."""
    ids = tokenizer.encode(FINGERPRINT_PROBE)
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
    return {"vocab_size": int(tokenizer.vocab_size), "fingerprint": digest}


class _HashingWriter:
    """Writes bytes, counting the offset and hashing the content as it goes."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.offset = 0
        self.sha = hashlib.sha256()

    def write_line(self, obj: dict[str, Any]) -> int:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"
        start = self.offset
        self.handle.write(data)
        self.sha.update(data)
        self.offset += len(data)
        return start


def write_processed_split(
    problems: Iterable[Problem],
    out_dir: str | os.PathLike,
    split: str,
    tokenizer: TextEncoder,
    *,
    dataset: str,
    source_files: Iterable[str | os.PathLike] = (),
) -> SplitIndex:
    """Write `<split>.jsonl`, `<split>_problems.jsonl`, `<split>_rows.npy` and `<split>_metadata.json`."""
    paths = SplitPaths.of(out_dir, split)
    offsets, lengths, problem_numbers, correct = array("q"), array("i"), array("i"), array("B")
    problem_map: list[dict[str, Any]] = []
    with atomic_write(paths.jsonl, "wb") as solutions_file, atomic_write(paths.problems, "wb") as problems_file:
        solutions, problem_lines = _HashingWriter(solutions_file), _HashingWriter(problems_file)
        for number, problem in enumerate(problems):
            tests_ref = f"{paths.problems.name}#{problem.problem_id}"
            problem_offset = problem_lines.write_line(
                {
                    "problem_id": problem.problem_id,
                    "instruction": problem.instruction,
                    "input": problem.input,
                    "difficulty": problem.difficulty,
                    "n_correct": len(problem.correct),
                    "n_incorrect": len(problem.incorrect),
                    "tests": problem.tests,
                    **problem.extra,
                }
            )
            problem_map.append(
                {
                    "problem_id": problem.problem_id,
                    "difficulty": problem.difficulty,
                    "first_line": len(offsets),
                    "n_correct": len(problem.correct),
                    "n_incorrect": len(problem.incorrect),
                    "problems_offset": problem_offset,
                    "prompt_tokens": len(tokenizer.encode(_prompt_text(problem))),
                }
            )
            for is_correct, outputs in ((True, problem.correct), (False, problem.incorrect)):
                lengths.extend(len(ids) for ids in _encode_all(tokenizer, outputs))
                for output in outputs:
                    offsets.append(
                        solutions.write_line(
                            {
                                "problem_id": problem.problem_id,
                                "instruction": problem.instruction,
                                "input": problem.input,
                                "output": output,
                                "is_correct": is_correct,
                                "difficulty": problem.difficulty,
                                "tests_ref": tests_ref,
                            }
                        )
                    )
                    problem_numbers.append(number)
                    correct.append(int(is_correct))
        if not offsets:
            where = ", ".join(str(p) for p in source_files) or str(out_dir)
            raise DataError(f"{where}: split {split!r} has no solutions to prepare (empty selection)")
        solutions_sha, problems_sha = solutions.sha.hexdigest(), problem_lines.sha.hexdigest()

    rows = np.empty(len(offsets), dtype=ROW_DTYPE)
    rows["offset"] = np.frombuffer(offsets, dtype=np.int64)
    rows["length"] = np.frombuffer(lengths, dtype=np.int32)
    rows["problem"] = np.frombuffer(problem_numbers, dtype=np.int32)
    rows["correct"] = np.frombuffer(correct, dtype=np.uint8)
    with atomic_write(paths.rows, "wb") as handle:
        np.save(handle, rows, allow_pickle=False)
    rows_sha = hashlib.sha256(paths.rows.read_bytes()).hexdigest()

    n_correct = int(rows["correct"].sum())
    atomic_write_json(
        paths.metadata,
        {
            "format": FORMAT_VERSION,
            "dataset": dataset,
            "split": split,
            "n_problems": len(problem_map),
            "n_solutions": len(rows),
            "n_correct": n_correct,
            "n_incorrect": len(rows) - n_correct,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "source_files": [str(p) for p in source_files],
            "jsonl": file_record(paths.jsonl, solutions_sha),
            "problems_file": file_record(paths.problems, problems_sha),
            "rows_file": file_record(paths.rows, rows_sha),
            "problems": problem_map,
        },
        indent=None,
    )
    return SplitIndex(out_dir, split)


def _encode_all(tokenizer: TextEncoder, texts: list[str]) -> list[list[int]]:
    """One call for a problem's solutions when the tokenizer can batch (the Rust tokenizer runs them in parallel)."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    if encode_batch is not None and texts:
        return encode_batch(texts)
    return [tokenizer.encode(text) for text in texts]


def _prompt_text(problem: Problem) -> str:
    return f"{problem.instruction}\n{problem.input}" if problem.input else problem.instruction


def processed_dir(datasets_dir: str | os.PathLike, name: str) -> Path:
    return Path(datasets_dir) / name / "processed"


def prepare_dataset(
    name: str,
    *,
    raw_dir: str | os.PathLike,
    datasets_dir: str | os.PathLike,
    split: str,
    tokenizer: TextEncoder,
) -> SplitIndex:
    """Read `<raw_dir>/<name>/` through its source in `DATASETS` and write `<datasets_dir>/<name>/processed/`."""
    source = get_source(name)
    raw_dir = Path(raw_dir)
    files = source.source_files(raw_dir, split)
    log.info("preparing %s/%s from %s", name, split, ", ".join(str(f) for f in files))
    index = write_processed_split(
        source.read(raw_dir, split),
        processed_dir(datasets_dir, name),
        split,
        tokenizer,
        dataset=name,
        source_files=files,
    )
    log.info("wrote %s (%d solutions, %d problems)", index.paths.jsonl, len(index), index.n_problems)
    return index
