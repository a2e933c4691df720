"""One tokenizer interface over the three places a tokenizer comes from.

- `tokenizer.json` (Hugging Face), with `tokenizer_config.json` beside it for special tokens and the
  chat template;
- a GGUF file's metadata (byte-level BPE: vocabulary, merges, token types, special ids, chat template),
  rebuilt as a `tokenizers` BPE with the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`;
- a SentencePiece `tokenizer.model` (Meta's LLaMA / MTP releases), run by `sentencepiece` itself.

BOS is never added implicitly: callers say `add_bos=True` where the model wants it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from weighted_mtp.errors import CheckpointError
from weighted_mtp.io import atomic_write, atomic_write_json

# Tokens that end a turn or a document in the families we load; generation stops at any of them.
STOP_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>")

# llama.cpp's pre-tokenizer split expressions, by the name GGUF stores in `tokenizer.ggml.pre`.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_SPLIT_BY_PRE = {
    "default": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "gpt2": _GPT2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


class Tokenizer:
    """Encode, decode and render chat prompts; the same interface whatever the source file."""

    def __init__(
        self,
        backend: Any,
        *,
        source: str,
        bos_token: str | None,
        eos_token: str,
        pad_token: str | None = None,
        chat_template: str | None = None,
        wants_bos: bool = False,
    ) -> None:
        self._backend = backend
        self.source = source
        self.vocab_size: int = backend.vocab_size()
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token or eos_token
        self.bos_id: int | None = self._require_id(bos_token) if bos_token else None
        self.eos_id: int = self._require_id(eos_token)
        self.pad_id: int = self._require_id(pad_token) if pad_token else self.eos_id
        self.chat_template = chat_template
        # Whether the model was trained with BOS first (Meta's LLaMA: yes; SmolLM2: no). Callers pass
        # `add_bos=tokenizer.wants_bos` when they encode a whole prompt.
        self.wants_bos = wants_bos and self.bos_id is not None
        self.stop_ids: list[int] = sorted(
            {self.eos_id} | {i for i in map(backend.token_to_id, STOP_TOKENS) if i is not None}
        )

    def _require_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"{self.source}: special token {token!r} is not in the vocabulary")
        return token_id

    # -- encoding

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids = self._backend.encode(text)
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False) -> list[list[int]]:
        batches = self._backend.encode_batch(list(texts))
        if add_bos and self.bos_id is not None:
            return [[self.bos_id, *ids] for ids in batches]
        return batches

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # -- chat

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise CheckpointError(f"{self.source}: this tokenizer has no chat template")
        return _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token,
        )

    # -- files

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer file and a `tokenizer_config.json` that transformers reads as well."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer_class = self._backend.save(directory)
        config = {
            "tokenizer_class": tokenizer_class,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.wants_bos,
            "chat_template": self.chat_template,
        }
        atomic_write_json(
            directory / "tokenizer_config.json", {k: v for k, v in config.items() if v is not None}
        )

    # -- construction

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """A `tokenizer.json`, `tokenizer.model`, `.gguf` file, or a directory holding one of them."""
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.json", "tokenizer.model"):
                if (path / name).is_file():
                    return cls.from_file(path / name)
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return cls.from_file(ggufs[0])
            raise CheckpointError(
                f"{path}: no tokenizer.json, tokenizer.model or .gguf file in this directory"
            )
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        if path.suffix == ".gguf":
            return _from_gguf(path)
        if path.suffix == ".json":
            return _from_tokenizer_json(path)
        if path.suffix == ".model":
            return _from_sentencepiece(path)
        raise CheckpointError(
            f"{path}: not a tokenizer file (expected tokenizer.json, tokenizer.model or .gguf)"
        )


# ----------------------------------------------------------------------------- backends


class _HFBackend:
    """A `tokenizers.Tokenizer`; special-token post-processing is off so BOS stays the caller's choice."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def save(self, directory: Path) -> str:
        with atomic_write(directory / "tokenizer.json") as handle:
            handle.write(self.tokenizer.to_str())
        return "PreTrainedTokenizerFast"


class _SentencePieceBackend:
    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts)

    def decode(self, ids: list[int], skip_special: bool) -> str:
        if skip_special:
            ids = [i for i in ids if not self.processor.is_control(i)]
        return self.processor.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.processor.piece_to_id(token)
        return (
            None
            if token_id == self.processor.unk_id() and token != self.processor.id_to_piece(token_id)
            else token_id
        )

    def id_to_token(self, token_id: int) -> str | None:
        return self.processor.id_to_piece(token_id) if 0 <= token_id < self.vocab_size() else None

    def save(self, directory: Path) -> str:
        with atomic_write(directory / "tokenizer.model", "wb") as handle:
            handle.write(self.processor.serialized_model_proto())
        return "LlamaTokenizer"


# ----------------------------------------------------------------------------- sources


def _from_gguf(path: Path) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from weighted_mtp.models.checkpoints.gguf import read_gguf

    metadata = read_gguf(path, tensors=False).metadata

    def field(key: str, default: Any = None) -> Any:
        return metadata.get(key, default)

    kind = field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' is); "
            "point model.tokenizer at a tokenizer.json or tokenizer.model"
        )
    tokens: list[str] = field("tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in field("tokenizer.ggml.merges", [])]
    token_types: list[int] = field("tokenizer.ggml.token_type", [1] * len(tokens))
    pre = field("tokenizer.ggml.pre", "default")

    tokenizer = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _DIGITS_THEN_GPT2:
        split = [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Split(Regex(_GPT2_SPLIT), "isolated"),
        ]
    elif pre in _SPLIT_BY_PRE:
        split = [pre_tokenizers.Split(Regex(_SPLIT_BY_PRE[pre]), "isolated")]
    else:
        known = ", ".join(sorted([*_SPLIT_BY_PRE, *_DIGITS_THEN_GPT2]))
        raise CheckpointError(f"{path}: unknown GGUF pre-tokenizer {pre!r} (known: {known})")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*split, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (type 3) are matched whole and skipped in decoding; user-defined ones (4) matched whole.
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == 3]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types) if kind == 4]
    )

    def special(name: str) -> str | None:
        token_id = field(f"tokenizer.ggml.{name}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    eos = special("eos")
    if eos is None:
        raise CheckpointError(f"{path}: GGUF metadata has no tokenizer.ggml.eos_token_id")
    return Tokenizer(
        _HFBackend(tokenizer),
        source=str(path),
        bos_token=special("bos"),
        eos_token=eos,
        pad_token=special("padding"),
        chat_template=field("tokenizer.chat_template"),
        wants_bos=bool(field("tokenizer.ggml.add_bos_token", False)),
    )


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _from_tokenizer_json(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tokenizer = HFTokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- tokenizers raises a bare Exception for a bad file
        raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from None
    config_path = path.with_name("tokenizer_config.json")
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    chat_template = config.get("chat_template")
    template_file = path.with_name("chat_template.jinja")
    if chat_template is None and template_file.is_file():
        chat_template = template_file.read_text(encoding="utf-8")
    if isinstance(chat_template, list):  # several named templates: take the default one
        chat_template = next((t["template"] for t in chat_template if t.get("name") == "default"), None)
    eos = _token_text(config.get("eos_token")) or next(
        (t for t in STOP_TOKENS if tokenizer.token_to_id(t) is not None), None
    )
    if eos is None:
        raise CheckpointError(
            f"{path}: no eos_token in tokenizer_config.json and none of {STOP_TOKENS} in the vocab"
        )
    return Tokenizer(
        _HFBackend(tokenizer),
        source=str(path),
        bos_token=_token_text(config.get("bos_token")),
        eos_token=eos,
        pad_token=_token_text(config.get("pad_token")),
        chat_template=chat_template,
        wants_bos=bool(config.get("add_bos_token", False)),
    )


def _from_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a SentencePiece model ({exc})") from None
    piece = processor.id_to_piece
    return Tokenizer(
        _SentencePieceBackend(processor),
        source=str(path),
        bos_token=piece(processor.bos_id()) if processor.bos_id() >= 0 else None,
        eos_token=piece(processor.eos_id()),
        pad_token=piece(processor.pad_id()) if processor.pad_id() >= 0 else None,
        wants_bos=True,  # Meta's LLaMA tokenizer always prepends BOS
    )


# ----------------------------------------------------------------------------- chat templates


def _raise_template_error(message: str) -> None:
    raise CheckpointError(f"chat template: {message}")


def _compile_template(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The conventions chat templates are written for: trimmed block lines, and two helper functions.
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)
