"""The metadata index of a processed split: what samplers read instead of the data.

A prepared split is four files in `<datasets>/<name>/processed/`:

- `<split>.jsonl`: one solution a line (problem_id, instruction, input, output, is_correct,
  difficulty, tests_ref), grouped by problem, each problem's correct solutions first.
- `<split>_problems.jsonl`: one problem a line, with its tests (what `tests_ref` points to).
- `<split>_rows.npy`: per solution line its byte offset, response token length, problem number and
  correctness; a fixed-width table that is memory-mapped, so opening it costs no memory.
- `<split>_metadata.json`: counts, the tokenizer used for lengths, the size, mtime and SHA-256 of
  the files above (checked on open), and the problem map: per problem its id, difficulty, first line
  and number of correct and incorrect solutions. With the grouping above, a problem's correct
  solutions are lines `[first_line, first_line + n_correct)` and its incorrect ones follow; their
  byte offsets and token lengths are those lines of the rows table.

Samplers choose line numbers from the index alone; `SplitIndex.read` then seeks to just those lines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from weighted_mtp.errors import DataError

FORMAT_VERSION = 1
ROW_DTYPE = np.dtype([("offset", "<i8"), ("length", "<i4"), ("problem", "<i4"), ("correct", "u1")])
REQUIRED_FIELDS = ("problem_id", "instruction", "output", "is_correct")


@dataclass(frozen=True)
class SplitPaths:
    jsonl: Path
    problems: Path
    rows: Path
    metadata: Path

    @classmethod
    def of(cls, directory: str | os.PathLike, split: str) -> SplitPaths:
        directory = Path(directory)
        return cls(
            jsonl=directory / f"{split}.jsonl",
            problems=directory / f"{split}_problems.jsonl",
            rows=directory / f"{split}_rows.npy",
            metadata=directory / f"{split}_metadata.json",
        )


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: Path, sha256: str) -> dict[str, Any]:
    """What the metadata remembers of a file to notice later changes."""
    stat = path.stat()
    return {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}


def check_file(path: Path, record: dict[str, Any], metadata_path: Path) -> None:
    """Raise if `path` is not the file the index was built from.

    Size and mtime are compared first; a changed mtime alone (a copy that did not keep times)
    falls back to comparing the SHA-256, so a faithful copy is still accepted.
    """
    hint = f"; run `wmtp data prepare` again to rebuild {metadata_path.name}"
    if not path.is_file():
        raise DataError(f"{path}: missing, but {metadata_path} refers to it{hint}")
    stat = path.stat()
    if stat.st_size != record["size"]:
        raise DataError(
            f"{path}: changed since it was indexed ({stat.st_size} bytes, the index in {metadata_path} "
            f"recorded {record['size']}){hint}"
        )
    if stat.st_mtime_ns != record["mtime_ns"] and file_sha256(path) != record["sha256"]:
        raise DataError(f"{path}: content changed since it was indexed in {metadata_path}{hint}")


class SplitIndex:
    """An opened, verified index of one processed split."""

    def __init__(self, directory: str | os.PathLike, split: str) -> None:
        self.directory = Path(directory)
        self.split = split
        self.paths = SplitPaths.of(self.directory, split)
        if not self.paths.metadata.is_file():
            available = sorted(p.name.removesuffix("_metadata.json") for p in self.directory.glob("*_metadata.json"))
            raise DataError(
                f"{self.paths.metadata}: no prepared split {split!r} in {self.directory} "
                f"(prepared: {', '.join(available) or 'none'}); run `wmtp data prepare <dataset> --split {split}`"
            )
        try:
            self.metadata: dict[str, Any] = json.loads(self.paths.metadata.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{self.paths.metadata}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        if self.metadata.get("format") != FORMAT_VERSION:
            raise DataError(
                f"{self.paths.metadata}: field 'format' is {self.metadata.get('format')!r}, this version reads "
                f"{FORMAT_VERSION}; run `wmtp data prepare` again"
            )
        try:
            self._load_tables()
        except KeyError as exc:
            raise DataError(f"{self.paths.metadata}: missing field {exc.args[0]!r}; run `wmtp data prepare` again") from None

    def _load_tables(self) -> None:
        for key, path in (("jsonl", self.paths.jsonl), ("problems_file", self.paths.problems), ("rows_file", self.paths.rows)):
            check_file(path, self.metadata[key], self.paths.metadata)
        self.rows: np.ndarray = np.load(self.paths.rows, mmap_mode="r")
        if self.rows.dtype != ROW_DTYPE or len(self.rows) != self.metadata["n_solutions"]:
            raise DataError(f"{self.paths.rows}: does not match {self.paths.metadata} (dtype or row count)")
        problems = self.metadata["problems"]
        self.problem_ids: list[str] = [p["problem_id"] for p in problems]
        self.difficulty = np.array([p["difficulty"] for p in problems], dtype=np.int64)
        self.first_line = np.array([p["first_line"] for p in problems], dtype=np.int64)
        self.n_correct = np.array([p["n_correct"] for p in problems], dtype=np.int64)
        self.n_incorrect = np.array([p["n_incorrect"] for p in problems], dtype=np.int64)
        self._problem_offsets = [p["problems_offset"] for p in problems]
        self._problem_number = {pid: i for i, pid in enumerate(self.problem_ids)}

    # ---- what samplers use

    @property
    def dataset(self) -> str:
        return self.metadata["dataset"]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_problems(self) -> int:
        return len(self.problem_ids)

    @property
    def is_correct(self) -> np.ndarray:
        return self.rows["correct"].astype(bool)

    @property
    def token_lengths(self) -> np.ndarray:
        return np.asarray(self.rows["length"], dtype=np.int64)

    @property
    def problem_of_line(self) -> np.ndarray:
        return np.asarray(self.rows["problem"], dtype=np.int64)

    def correct_lines(self, problem: int) -> np.ndarray:
        start = int(self.first_line[problem])
        return np.arange(start, start + int(self.n_correct[problem]), dtype=np.int64)

    def incorrect_lines(self, problem: int) -> np.ndarray:
        start = int(self.first_line[problem] + self.n_correct[problem])
        return np.arange(start, start + int(self.n_incorrect[problem]), dtype=np.int64)

    # ---- reading records

    def read(self, lines: Sequence[int] | np.ndarray) -> list[dict[str, Any]]:
        """The records at these 0-based line numbers, in the order given, read by byte offset."""
        lines = np.asarray(lines, dtype=np.int64)
        if len(lines) and (lines.min() < 0 or lines.max() >= len(self.rows)):
            raise IndexError(f"line number out of range 0..{len(self.rows) - 1}")
        records: dict[int, dict[str, Any]] = {}
        with open(self.paths.jsonl, "rb") as handle:
            for line in sorted(set(lines.tolist())):  # in file order: sequential reads
                handle.seek(int(self.rows[line]["offset"]))
                records[line] = self._parse(handle.readline(), line)
        return [records[line] for line in lines.tolist()]

    def _parse(self, raw: bytes, line: int) -> dict[str, Any]:
        where = f"{self.paths.jsonl}:{line + 1}"
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{where}: malformed JSON ({exc})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        for name in REQUIRED_FIELDS:
            if name not in record:
                raise DataError(f"{where}: missing required field {name!r}")
        expected = self.problem_ids[int(self.rows[line]["problem"])]
        if record["problem_id"] != expected:
            raise DataError(f"{where}: problem_id {record['problem_id']!r} but the index says {expected!r}; re-prepare")
        return record

    def problem(self, problem_id: str) -> dict[str, Any]:
        """A problem's line of `<split>_problems.jsonl` (statement, tests), read by byte offset."""
        try:
            number = self._problem_number[problem_id]
        except KeyError:
            raise DataError(f"{self.paths.problems}: no problem {problem_id!r}") from None
        with open(self.paths.problems, "rb") as handle:
            handle.seek(self._problem_offsets[number])
            return json.loads(handle.readline())

    def summary(self) -> dict[str, Any]:
        lengths = self.token_lengths
        correct = self.is_correct
        diffs, counts = np.unique(self.difficulty, return_counts=True)
        return {
            "dataset": self.dataset,
            "split": self.split,
            "problems": self.n_problems,
            "solutions": len(self),
            "correct": int(correct.sum()),
            "incorrect": int((~correct).sum()),
            "problems_with_pairs": int(((self.n_correct > 0) & (self.n_incorrect > 0)).sum()),
            "response_tokens_mean": float(lengths.mean()) if len(lengths) else 0.0,
            "response_tokens_max": int(lengths.max()) if len(lengths) else 0,
            "difficulty_histogram": {int(d): int(c) for d, c in zip(diffs, counts)},
            "tokenizer": self.metadata.get("tokenizer", {}),
            "prepared_from": self.metadata.get("source_files", []),
        }


def open_split(directory: str | os.PathLike, split: str) -> SplitIndex:
    return SplitIndex(directory, split)
