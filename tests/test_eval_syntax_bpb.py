"""Syntax validity of samples and bits per byte, checked against known snippets and hand sums."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from codeling.config import ModelConfig
from codeling.data.shards import load_split, prepare_source, read_manifest
from codeling.errors import CodelingError
from codeling.evaluation.bits_per_byte import bits_per_byte, evaluate_prepared_source
from codeling.evaluation.syntax import (bash_syntax_ok, python_syntax_ok, syntax_ok,
                                        syntax_validity)
from codeling.inference.generate import Generator
from codeling.models.decoder import CodeModel

# -- syntax ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "valid"), [
    ("def f(x):\n    return x\n", True),
    ("print('a')", True),
    ("x = '\\d'\n", True),  # an invalid escape is only a SyntaxWarning
    ("def f(x)\n    return x\n", False),
    ("def f(x):\nreturn x\n", False),
    ("x = (1,\n", False),
    ("x = 1\0", False),
    ("(" * 300 + ")" * 300, False),  # nesting beyond the tokenizer's limit of 200
    ("not " * 20_000 + "x", False),  # nesting too deep for the parser (MemoryError)
    ("-" * 50_000 + "1", False),
])
def test_python_syntax_cases(source, valid):
    assert python_syntax_ok(source) is valid


def test_python_syntax_rejects_huge_source():
    source = "x = 1\n" * 10
    assert python_syntax_ok(source, max_chars=len(source))
    assert not python_syntax_ok(source, max_chars=len(source) - 1)


@pytest.mark.parametrize(("script", "valid"), [
    ("echo hi\n", True),
    ("if true; then echo x; fi\n", True),
    ("exit 3\n", True),  # parsed, not executed: a run would exit with status 3
    ("for i in 1 2; do echo $i; done\n", True),
    ("if true; then echo x\n", False),
    ("for i in 1 2; do\n", False),
    ("echo (\n", False),
    ("case x in\n", False),
])
def test_bash_syntax_cases(script, valid):
    assert bash_syntax_ok(script) is valid


def test_syntax_ok_rejects_unknown_language():
    with pytest.raises(CodelingError, match="unknown language"):
        syntax_ok("ruby", "puts 1")


@pytest.fixture(scope="module")
def generator(small_tokenizer) -> Generator:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, d_model=32, n_layers=2,
                         n_heads=2, max_seq_len=64)
    return Generator(CodeModel(config), small_tokenizer, torch.device("cpu"), bf16=False)


def test_syntax_validity_end_to_end(generator):
    prompts = [("python", "def add(a, b):\n"), ("python", "x = 1\n"),
               ("bash", "#!/bin/bash\necho ")]
    result = syntax_validity(generator, prompts, n_samples=3, max_new_tokens=6)
    assert set(result["rates"]) == {"python", "bash", "all"}
    assert result["rates"]["python"]["samples"] == 6
    assert result["rates"]["bash"]["samples"] == 3
    assert result["rates"]["all"]["samples"] == 9
    assert len(result["results"]) == 3
    for entry in result["results"]:
        assert entry["samples"] == 3
        assert len(entry["completions"]) == 3
        for sample in entry["completions"]:
            source = entry["prompt"] + sample["completion"]
            assert sample["valid"] is syntax_ok(entry["language"], source)
        assert entry["valid"] == sum(sample["valid"] for sample in entry["completions"])
    for language in ("python", "bash"):
        rate = result["rates"][language]
        valid = sum(entry["valid"] for entry in result["results"]
                    if entry["language"] == language)
        assert rate["valid"] == valid
        assert rate["rate"] == pytest.approx(valid / rate["samples"])


def test_syntax_validity_rejects_bad_input(generator):
    with pytest.raises(CodelingError, match="unknown language"):
        syntax_validity(generator, [("ruby", "puts ")], n_samples=1)
    with pytest.raises(CodelingError, match="shorten the prompt"):
        syntax_validity(generator, [("python", "x = 1\n" * 200)], n_samples=1)


# -- bits per byte --------------------------------------------------------------------------------


class BigramModel(nn.Module):
    """Logits depend only on the previous token, so the loss sum is easy to compute by hand."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = nn.Parameter(torch.tensor(table))
        self.config = SimpleNamespace(vocab_size=len(table), max_seq_len=16)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


BIGRAM_TABLE = [
    [0.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, -1.0, 2.0, 0.0, 1.0],
    [1.0, 0.0, -0.5, 3.0, 0.0],
    [0.0, 2.0, 0.0, 0.0, -1.0],
    [0.2, 1.5, 0.0, 0.3, 0.7],
]
EOS = 1


def _bigram_nats(previous: int, following: int) -> float:
    row = BIGRAM_TABLE[previous]
    return math.log(sum(math.exp(value) for value in row)) - row[following]


def test_bits_per_byte_bigram_hand_sum():
    # Two documents, [2, 3] and [4, 4], each followed by eos; the text is 7 UTF-8 bytes.
    tokens = [2, 3, EOS, 4, 4, EOS]
    pairs = [(EOS, 2), (2, 3), (3, EOS), (EOS, 4), (4, 4), (4, EOS)]  # eos is put in front
    nats = sum(_bigram_nats(previous, following) for previous, following in pairs)
    model = BigramModel(BIGRAM_TABLE)
    for seq_len in (1, 2, 4, 5, 16):
        for batch_size in (1, 2):
            result = bits_per_byte(model, np.array(tokens, dtype=np.uint16), 7,
                                   batch_size=batch_size, seq_len=seq_len)
            assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / 7, rel=1e-6)
            assert result["loss"] == pytest.approx(nats / 6, rel=1e-6)
            assert result["tokens"] == 6
            assert result["eos_tokens"] == 2
            assert result["bytes"] == 7
            assert not result["bytes_estimated"]


def test_bits_per_byte_max_tokens_scales_bytes():
    model = BigramModel(BIGRAM_TABLE)
    result = bits_per_byte(model, [2, 3, EOS, 4, 4, EOS], 7, seq_len=4, max_tokens=3)
    nats = _bigram_nats(EOS, 2) + _bigram_nats(2, 3) + _bigram_nats(3, EOS)
    assert result["tokens"] == 3
    assert result["bytes"] == pytest.approx(3.5)
    assert result["bytes_estimated"]
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / 3.5, rel=1e-6)


def test_bits_per_byte_rejects_bad_input():
    model = BigramModel(BIGRAM_TABLE)
    with pytest.raises(CodelingError):
        bits_per_byte(model, [], 7)
    with pytest.raises(CodelingError):
        bits_per_byte(model, [2, 3], 0)
    with pytest.raises(CodelingError):
        bits_per_byte(model, [2, 3], 7, seq_len=17)
    with pytest.raises(CodelingError, match="token ids"):
        bits_per_byte(model, [2, 9], 7)


def _uniform_model(vocab_size: int, max_seq_len: int = 32) -> CodeModel:
    """A CodeModel with zero output weights: every prediction is uniform, ln(V) nats."""
    config = ModelConfig(vocab_size=vocab_size, d_model=16, n_layers=1, n_heads=2,
                         max_seq_len=max_seq_len)
    model = CodeModel(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_bits_per_byte_uniform_code_model():
    vocab_size = 300
    tokens = np.random.default_rng(0).integers(16, vocab_size, size=37)
    result = bits_per_byte(_uniform_model(vocab_size), tokens, 100, batch_size=3, seq_len=8)
    assert result["bits_per_byte"] == pytest.approx(37 * math.log2(vocab_size) / 100, rel=1e-5)
    assert result["bits_per_token"] == pytest.approx(math.log2(vocab_size), rel=1e-5)


def test_evaluate_prepared_source(tmp_path, small_tokenizer):
    documents = [f"def function_{index}(value):\n    return value * {index} + 'é'\n" * (index % 4 + 1)
                 for index in range(40)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents),
                      encoding="utf-8")
    data_dir = tmp_path / "prepared"
    prepare_source(f"jsonl:{source}", small_tokenizer, data_dir, val_fraction=0.5)
    manifest = read_manifest(data_dir)
    val = manifest["splits"]["val"]
    assert val["documents"] >= 3

    vocab_size = small_tokenizer.vocab_size
    model = _uniform_model(vocab_size)
    bits_per_token = math.log2(vocab_size)
    result = evaluate_prepared_source(model, data_dir, batch_size=4, seq_len=32,
                                      tokenizer_fingerprint=small_tokenizer.fingerprint)
    assert result["tokens"] == val["tokens"]
    assert result["bytes"] == val["bytes"]
    assert result["eos_tokens"] == val["documents"]
    assert result["bits_per_byte"] == pytest.approx(
        val["tokens"] * bits_per_token / val["bytes"], rel=1e-5)

    # A cut inside the third document keeps the first two whole and counts their exact bytes.
    tokens = load_split(data_dir, "val")
    ends = np.flatnonzero(np.asarray(tokens) == manifest["eos_id"])
    val_texts = [json.loads(line)["text"]
                 for line in (data_dir / "val.jsonl").read_text(encoding="utf-8").splitlines()]
    cut = int(ends[1]) + 3
    result = evaluate_prepared_source(model, data_dir, seq_len=32, max_tokens=cut)
    expected_bytes = sum(len(text.encode("utf-8")) for text in val_texts[:2])
    assert result["tokens"] == int(ends[1]) + 1
    assert result["bytes"] == expected_bytes
    assert not result["bytes_estimated"]
    assert result["bits_per_byte"] == pytest.approx(
        (int(ends[1]) + 1) * bits_per_token / expected_bytes, rel=1e-5)


def test_evaluate_prepared_source_checks_vocabulary(tmp_path, small_tokenizer):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"x = {i}\n"}) + "\n" for i in range(40)),
                      encoding="utf-8")
    prepare_source(f"jsonl:{source}", small_tokenizer, tmp_path / "prepared", val_fraction=0.5)
    with pytest.raises(CodelingError, match="vocabulary"):
        evaluate_prepared_source(_uniform_model(100), tmp_path / "prepared")
