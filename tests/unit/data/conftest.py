"""Fixtures for the data layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import mbpp_texts, synthetic_problems, train_bpe


@pytest.fixture(scope="session")
def tokenizer_file(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json (+ config with a chat template) of a byte-level BPE trained here on MBPP text."""
    return train_bpe(mbpp_texts(shared_data), tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file: Path):
    """The project's Tokenizer over that BPE: real and fast."""
    from weighted_mtp.models.tokenizer import Tokenizer

    return Tokenizer.from_file(tokenizer_file)


@pytest.fixture
def synthetic_index(tmp_path: Path, tokenizer):
    from weighted_mtp.data.prepare import write_processed_split

    return write_processed_split(synthetic_problems(), tmp_path / "processed", "train", tokenizer, dataset="synthetic")
