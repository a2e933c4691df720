"""prepare: raw files -> processed JSONL + index, read back exactly; every source; atomic writes."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from data_helpers import codecontests_rows, write_codecontests

from weighted_mtp.data.index import SplitIndex
from weighted_mtp.data.prepare import prepare_dataset
from weighted_mtp.data.sources import DATASETS


def test_all_sources_are_registered():
    assert {"mbpp", "humaneval", "codecontests", "rollouts"} <= set(DATASETS)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_mbpp_round_trip(shared_data, tmp_path, tokenizer, split):
    index = prepare_dataset("mbpp", raw_dir=shared_data, datasets_dir=tmp_path, split=split, tokenizer=tokenizer)
    raw = [json.loads(line) for line in open(shared_data / "mbpp" / f"{split}.jsonl", encoding="utf-8")]
    assert index.paths.jsonl == tmp_path / "mbpp" / "processed" / f"{split}.jsonl"
    assert len(index) == index.n_problems == len(raw)
    records = index.read(np.arange(len(index))[::-1])[::-1]  # any order of lines gives the same records
    for row, record in zip(raw, records):
        assert record["problem_id"] == f"mbpp/{row['task_id']}"
        assert record["instruction"] == row["text"]
        assert record["input"] == "\n".join(row["test_list"])
        assert record["output"] == row["code"].replace("\r\n", "\n").rstrip()
        assert record["is_correct"] is True
        problem = index.problem(record["problem_id"])
        assert problem["tests"]["cases"] == row["test_list"]
        assert problem["tests"]["setup"] == row["test_setup_code"]
        assert record["tests_ref"] == f"{split}_problems.jsonl#{record['problem_id']}"
    # token lengths are the tokenizer's, line by line
    assert index.token_lengths.tolist() == [len(tokenizer.encode(r["output"])) for r in records]
    # byte offsets point at line starts
    data = index.paths.jsonl.read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == ord("\n")][:-1]
    assert index.rows["offset"].tolist() == starts


def test_humaneval_from_the_offline_copy(shared_data, tmp_path, tokenizer):
    index = prepare_dataset("humaneval", raw_dir=shared_data, datasets_dir=tmp_path, split="test", tokenizer=tokenizer)
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as handle:
        raw = [json.loads(line) for line in handle]
    assert len(index) == 164
    first = index.read([0])[0]
    assert first["problem_id"] == raw[0]["task_id"]
    assert first["output"] == raw[0]["prompt"] + raw[0]["canonical_solution"].rstrip()
    assert index.problem(raw[0]["task_id"])["tests"]["entry_point"] == raw[0]["entry_point"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_codecontests_fixture_round_trip(tmp_path, tokenizer, fmt):
    rows = codecontests_rows()
    write_codecontests(tmp_path / "raw", "valid", rows, fmt)
    index = prepare_dataset(
        "codecontests", raw_dir=tmp_path / "raw", datasets_dir=tmp_path / "ds", split="valid", tokenizer=tokenizer
    )
    assert index.n_problems == len(rows)
    records = index.read(range(len(index)))
    for number, row in enumerate(rows):
        pid = f"codecontests/{row['name']}"
        mine = [r for r in records if r["problem_id"] == pid]

        def python3(solutions):
            return [s for lang, s in zip(solutions["language"], solutions["solution"]) if lang == 3]

        assert [r["output"] for r in mine if r["is_correct"]] == python3(row["solutions"])
        assert [r["output"] for r in mine if not r["is_correct"]] == python3(row["incorrect_solutions"])
        assert all(r["instruction"] == row["description"] and r["difficulty"] == row["difficulty"] for r in mine)
        assert index.difficulty[number] == row["difficulty"]
        problem = index.problem(pid)
        assert problem["tests"]["kind"] == "stdio"
        assert problem["tests"]["public"] == [{"input": "1 2\n", "output": "3\n"}]
        assert [t["output"] for t in problem["tests"]["private"]] == row["private_tests"]["output"]
        assert problem["tests"]["time_limit_s"] == 2.0
        assert problem["cf_rating"] == row["cf_rating"]
    # no C++, Java or Python 2 survived
    assert not any("#include" in r["output"] or "class Main" in r["output"] or "print '" in r["output"] for r in records)


def test_codecontests_language_names_and_list_layout(tmp_path, tokenizer):
    row = codecontests_rows(1)[0]
    row["solutions"] = [{"language": "PYTHON3", "solution": "print(3)\n"}, {"language": "CPP", "solution": "int main(){}"}]
    row["incorrect_solutions"] = [{"language": 3, "solution": "print(4)\n"}]
    write_codecontests(tmp_path / "raw", "test", [row], "jsonl")
    index = prepare_dataset("codecontests", raw_dir=tmp_path / "raw", datasets_dir=tmp_path / "ds", split="test",
                            tokenizer=tokenizer)
    assert [r["output"] for r in index.read([0, 1])] == ["print(3)\n", "print(4)\n"]


def test_rollouts_group_by_problem(tmp_path, tokenizer):
    samples = [
        {"problem_id": "mbpp/2", "instruction": "t2", "output": "a", "is_correct": False, "tests": {"kind": "assert"}},
        {"problem_id": "mbpp/1", "instruction": "t1", "output": "b", "is_correct": True},
        {"problem_id": "mbpp/2", "instruction": "t2", "output": "c", "is_correct": True},
    ]
    (tmp_path / "raw" / "rollouts").mkdir(parents=True)
    (tmp_path / "raw" / "rollouts" / "step_10.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    index = prepare_dataset("rollouts", raw_dir=tmp_path / "raw" / "rollouts", datasets_dir=tmp_path / "ds", split="step_10",
                            tokenizer=tokenizer)
    records = index.read(range(3))
    assert [(r["problem_id"], r["output"], r["is_correct"]) for r in records] == [
        ("mbpp/2", "c", True), ("mbpp/2", "a", False), ("mbpp/1", "b", True)
    ]
    assert index.correct_lines(0).tolist() == [0] and index.incorrect_lines(0).tolist() == [1]
    assert index.problem("mbpp/2")["tests"] == {"kind": "assert"}


def test_reprepare_replaces_atomically(shared_data, tmp_path, tokenizer):
    first = prepare_dataset("mbpp", raw_dir=shared_data, datasets_dir=tmp_path, split="validation", tokenizer=tokenizer)
    second = prepare_dataset("mbpp", raw_dir=shared_data, datasets_dir=tmp_path, split="validation", tokenizer=tokenizer)
    assert first.paths.jsonl.read_bytes() == second.paths.jsonl.read_bytes()
    assert not [p for p in first.directory.iterdir() if p.name.startswith(".")]  # no temporary files left
    SplitIndex(first.directory, "validation")
