"""Sampling filters, stop strings and streaming with a real model and tokenizer."""

from __future__ import annotations

import pytest
import torch

from codeling.config import ModelConfig
from codeling.errors import CodelingError
from codeling.inference.generate import (GenerationConfig, Generator, _first_stop,
                                         _longest_stop_prefix)
from codeling.inference.sampling import filter_logits, sample_next
from codeling.models.decoder import CodeModel


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = filter_logits(probs.log(), top_p=0.8).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(probs.log(), top_p=0.81).isfinite()
    assert kept.tolist() == [[True, True, True, False]]


def test_top_p_always_keeps_best_token():
    logits = torch.tensor([[0.0, 10.0, 1.0]])
    assert filter_logits(logits, top_p=0.01).isfinite().tolist() == [[False, True, False]]


def test_greedy_and_seeded_sampling():
    logits = torch.randn(3, 50)
    assert sample_next(logits, temperature=0).tolist() == logits.argmax(-1).tolist()
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(1))
    assert a.tolist() == b.tolist()


def test_stop_helpers():
    assert _first_stop("abc\ndef\n\nx", ("\n\n",)) == 7
    assert _first_stop("abc", ("z",)) is None
    assert _longest_stop_prefix("hello\n", ("\n\nEND",)) == 1
    assert _longest_stop_prefix("hello", ("\n\n",)) == 0


@pytest.fixture(scope="module")
def generator(small_tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, d_model=32, n_layers=2,
                         n_heads=2, max_seq_len=64)
    return Generator(CodeModel(config), small_tokenizer, torch.device("cpu"), bf16=False)


def test_stream_equals_complete_and_respects_limits(generator):
    config = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=4)
    pieces = list(generator.stream("def f(x):", config))
    assert "".join(pieces) == generator.complete("def f(x):", config)
    usage = generator.last_usage
    assert usage["prompt_tokens"] == len(generator.tokenizer.encode("def f(x):"))
    assert 1 <= usage["completion_tokens"] <= 20
    assert "<|" not in "".join(pieces)  # special tokens are never sampled


def test_stop_string_cuts_output(generator):
    config = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=4)
    text = generator.complete("x = ", config)
    assert len(text) > 3
    stop = text[2:4]
    stopped = generator.complete("x = ", GenerationConfig(max_new_tokens=40, temperature=1.0,
                                                          seed=4, stop=(stop,)))
    assert stopped == text[: text.find(stop)]


def test_prompt_longer_than_context(generator):
    with pytest.raises(CodelingError, match="context"):
        generator.complete("word " * 200, GenerationConfig(max_new_tokens=4))


@pytest.mark.parametrize("field, value", [("max_new_tokens", 0), ("temperature", -1.0),
                                          ("top_p", 0.0), ("top_k", -2)])
def test_invalid_settings_rejected(field, value):
    with pytest.raises(CodelingError):
        GenerationConfig(**{field: value}).validate()


def test_complete_many_rows_match_limits(generator):
    config = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=7)
    first = generator.complete_many("def f(x):", 4, config)
    usage = generator.last_usage
    assert len(first) == 4
    assert len(set(first)) > 1  # rows sample independently
    assert usage["completion_tokens"] <= 4 * 12
    assert generator.complete_many("def f(x):", 4, config) == first


def test_complete_many_greedy_rows_equal_single(generator):
    config = GenerationConfig(max_new_tokens=10, temperature=0.0)
    rows = generator.complete_many("import os\n", 3, config)
    assert rows == [generator.complete("import os\n", config)] * 3
