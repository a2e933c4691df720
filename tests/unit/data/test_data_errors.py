"""Bad input gives a DataError naming the file and line or field, and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from data_helpers import codecontests_rows, write_codecontests

from weighted_mtp.data.index import SplitIndex
from weighted_mtp.data.prepare import prepare_dataset
from weighted_mtp.errors import DataError


def _raw_mbpp(shared_data: Path, tmp_path: Path, lines: int = 5) -> Path:
    raw = tmp_path / "raw"
    (raw / "mbpp").mkdir(parents=True)
    with open(shared_data / "mbpp" / "validation.jsonl", encoding="utf-8") as handle:
        head = [next(handle) for _ in range(lines)]
    (raw / "mbpp" / "validation.jsonl").write_text("".join(head), encoding="utf-8")
    return raw


def _prepare(raw: Path, tmp_path: Path, tokenizer, name: str = "mbpp", split: str = "validation"):
    return prepare_dataset(name, raw_dir=raw, datasets_dir=tmp_path / "ds", split=split, tokenizer=tokenizer)


def test_malformed_line_names_file_and_line(shared_data, tmp_path, tokenizer):
    raw = _raw_mbpp(shared_data, tmp_path)
    path = raw / "mbpp" / "validation.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][:40] + "\n"
    path.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        _prepare(raw, tmp_path, tokenizer)


def test_missing_field_names_file_line_and_field(shared_data, tmp_path, tokenizer):
    raw = _raw_mbpp(shared_data, tmp_path)
    path = raw / "mbpp" / "validation.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    del rows[3]["code"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=rf"{path}:4: missing required field 'code'"):
        _prepare(raw, tmp_path, tokenizer)


def test_codecontests_missing_description_in_parquet(tmp_path, tokenizer):
    rows = codecontests_rows(3)
    rows[1]["description"] = None
    path = write_codecontests(tmp_path / "raw", "train", rows, "parquet")
    with pytest.raises(DataError, match=rf"{path}: row 2: missing required field 'description'"):
        _prepare(tmp_path / "raw", tmp_path, tokenizer, "codecontests", "train")


def test_codecontests_mismatched_tests(tmp_path, tokenizer):
    rows = codecontests_rows(1)
    rows[0]["public_tests"] = {"input": ["1\n", "2\n"], "output": ["1\n"]}
    path = write_codecontests(tmp_path / "raw", "train", rows, "jsonl")
    with pytest.raises(DataError, match=rf"{path}:1: field 'public_tests': 2 inputs but 1 outputs"):
        _prepare(tmp_path / "raw", tmp_path, tokenizer, "codecontests", "train")


def test_split_that_does_not_exist(shared_data, tmp_path, tokenizer):
    with pytest.raises(DataError, match="dataset 'mbpp' has no split 'dev'.*train, validation, test"):
        _prepare(shared_data, tmp_path, tokenizer, split="dev")
    with pytest.raises(DataError, match="no files for split 'valid'"):
        _prepare(tmp_path, tmp_path, tokenizer, "codecontests", "valid")
    index = _prepare(shared_data, tmp_path, tokenizer)
    with pytest.raises(DataError, match=r"no prepared split 'train'.*prepared: validation"):
        SplitIndex(index.directory, "train")


def test_empty_selection_at_prepare(tmp_path, tokenizer):
    rows = codecontests_rows(2)
    for row in rows:  # only C++ solutions: nothing survives the Python 3 filter
        for key in ("solutions", "incorrect_solutions"):
            row[key] = {"language": [2], "solution": ["int main(){}"]}
    write_codecontests(tmp_path / "raw", "test", rows, "jsonl")
    with pytest.raises(DataError, match=r"test\.jsonl: split 'test' has no solutions to prepare \(empty selection\)"):
        _prepare(tmp_path / "raw", tmp_path, tokenizer, "codecontests", "test")
    assert not (tmp_path / "ds" / "codecontests" / "processed" / "test.jsonl").exists()


def test_index_that_no_longer_matches_its_jsonl(shared_data, tmp_path, tokenizer):
    index = _prepare(_raw_mbpp(shared_data, tmp_path), tmp_path, tokenizer)
    jsonl = index.paths.jsonl
    original = jsonl.read_bytes()

    jsonl.write_bytes(original + b'{"problem_id": "x"}\n')  # appended
    with pytest.raises(DataError, match=rf"{jsonl}: changed since it was indexed .*run `wmtp data prepare` again"):
        SplitIndex(index.directory, "validation")

    jsonl.write_bytes(original.replace(b"Write a", b"Wrote a", 1))  # same size, other content
    with pytest.raises(DataError, match=rf"{jsonl}: content changed since it was indexed"):
        SplitIndex(index.directory, "validation")

    jsonl.write_bytes(original)  # a faithful copy with a new mtime is accepted (hash matches)
    os.utime(jsonl, ns=(1, 1))
    assert len(SplitIndex(index.directory, "validation")) == 5

    index.paths.rows.unlink()
    with pytest.raises(DataError, match=r"validation_rows\.npy: missing"):
        SplitIndex(index.directory, "validation")


def test_failed_prepare_leaves_the_previous_split_untouched(shared_data, tmp_path, tokenizer):
    raw = _raw_mbpp(shared_data, tmp_path)
    index = _prepare(raw, tmp_path, tokenizer)
    before = {p.name: p.read_bytes() for p in index.directory.iterdir()}
    path = raw / "mbpp" / "validation.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError, match=r":6: malformed JSON"):
        _prepare(raw, tmp_path, tokenizer)
    assert {p.name: p.read_bytes() for p in index.directory.iterdir()} == before  # no temp files, nothing changed
    assert len(SplitIndex(index.directory, "validation")) == 5


def test_unknown_dataset(tmp_path, tokenizer):
    from weighted_mtp.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError, match="unknown dataset 'mbbp'; did you mean 'mbpp'"):
        _prepare(tmp_path, tmp_path, tokenizer, name="mbbp")


def test_copied_dataset_directory_still_opens(shared_data, tmp_path, tokenizer):
    index = _prepare(_raw_mbpp(shared_data, tmp_path), tmp_path, tokenizer)
    copy = tmp_path / "copy"
    shutil.copytree(index.directory, copy, copy_function=shutil.copyfile)  # new mtimes
    assert SplitIndex(copy, "validation").read([4]) == index.read([4])


def test_damaged_metadata(shared_data, tmp_path, tokenizer):
    index = _prepare(_raw_mbpp(shared_data, tmp_path), tmp_path, tokenizer)
    metadata = json.loads(index.paths.metadata.read_text())
    del metadata["problems"]
    index.paths.metadata.write_text(json.dumps(metadata))
    with pytest.raises(DataError, match=r"validation_metadata\.json: missing field 'problems'"):
        SplitIndex(index.directory, "validation")
    index.paths.metadata.write_text("{")
    with pytest.raises(DataError, match=r"validation_metadata\.json:1: malformed JSON"):
        SplitIndex(index.directory, "validation")
