"""Fixtures for the data layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_helpers import BPETokenizer, mbpp_texts, synthetic_problems


@pytest.fixture(scope="session")
def tokenizer(shared_data: Path) -> BPETokenizer:
    return BPETokenizer(mbpp_texts(shared_data))


@pytest.fixture
def synthetic_index(tmp_path: Path, tokenizer: BPETokenizer):
    from weighted_mtp.data.prepare import write_processed_split

    return write_processed_split(synthetic_problems(), tmp_path / "processed", "train", tokenizer, dataset="synthetic")
