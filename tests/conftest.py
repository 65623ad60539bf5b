"""Shared fixtures: a small tokenizer trained once per test session."""

from __future__ import annotations

import pytest

from codeling.data.sources import load_documents
from codeling.tokenizer import Tokenizer, train_tokenizer

SMALL_VOCAB_SIZE = 512


@pytest.fixture(scope="session")
def stdlib_sample() -> list[str]:
    """About 1 MB of standard-library Python files, in a fixed order."""
    return load_documents("python-stdlib", max_bytes=1_000_000)


@pytest.fixture(scope="session")
def small_tokenizer(stdlib_sample: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer with a 512-token vocabulary trained on stdlib_sample."""
    return train_tokenizer(stdlib_sample, vocab_size=SMALL_VOCAB_SIZE)
