"""Shared fixtures: a small tokenizer trained once per test session."""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run trained for 6 steps by `codeling train`, shared by the whole session."""
    from codeling.cli import main
    from runs import tiny_run_config, write_config

    base = tmp_path_factory.mktemp("tiny")
    config = write_config(base / "run.yaml", tiny_run_config(base / "run"))
    assert main(["train", "--config", str(config)]) == 0
    return base / "run"
