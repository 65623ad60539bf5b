"""Tests for the byte-level BPE tokenizer: round trips, special tokens, saving and compatibility."""

from __future__ import annotations

from pathlib import Path

import pytest

from codeling.errors import CodelingError
from codeling.tokenizer import (
    SPECIAL_TOKENS,
    Tokenizer,
    _build_pre_tokenizer,
    bytes_per_token,
    train_tokenizer,
)

CODE_SAMPLE = (
    "class Stack:\n"
    "    def __init__(self):\n"
    "        self._items = []  # trailing spaces   \n"
    "\n"
    "\tdef push(self, item):\r\n"
    "\t\tself._items.append(item)\r\n"
    "            \n"
    "x  =   1;\t\ty = 'it''s'\n"
    "\n\n\n"
    "if True:\n"
    "        return   0x1234567890\n"
    "   "
)

UNICODE_SAMPLE = (
    "héllo wörld — Привет, мир! 你好，世界 こんにちは 안녕하세요 مرحبا שלום "
    "emoji: 😀🎉👩‍💻🇫🇷 combining: é ñ\u0301 zero-width:\u200b\u200d "
    "controls: \x00\x01\x07\x08\x0b\x0c\x1b[31mred\x1b[0m\x7f\r\r\n\x85\u2028\u2029 "
    "surrogate-free astral: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010fffd"
)


def test_special_tokens_have_ids_0_to_15(small_tokenizer: Tokenizer) -> None:
    assert len(SPECIAL_TOKENS) == 16
    assert len(set(SPECIAL_TOKENS)) == 16
    for index, name in enumerate(SPECIAL_TOKENS):
        assert small_tokenizer.token_id(name) == index
    assert small_tokenizer.bos_id == 0
    assert small_tokenizer.eos_id == 1
    assert small_tokenizer.pad_id == 2
    assert small_tokenizer.token_id("<|end_turn|>") == 8


def test_unknown_token_name_raises(small_tokenizer: Tokenizer) -> None:
    with pytest.raises(CodelingError, match="<|nope|>"):
        small_tokenizer.token_id("<|nope|>")


def test_vocab_size_matches_request(small_tokenizer: Tokenizer) -> None:
    assert small_tokenizer.vocab_size == 512


def test_code_round_trip_is_exact(small_tokenizer: Tokenizer) -> None:
    ids = small_tokenizer.encode(CODE_SAMPLE)
    assert small_tokenizer.decode(ids) == CODE_SAMPLE


def test_unicode_and_control_round_trip(small_tokenizer: Tokenizer) -> None:
    ids = small_tokenizer.encode(UNICODE_SAMPLE)
    assert small_tokenizer.decode(ids) == UNICODE_SAMPLE


def test_every_latin1_character_round_trips(small_tokenizer: Tokenizer) -> None:
    text = "".join(chr(code) for code in range(256))
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", ["", " ", "\n", "\t", "\r\n", "    ", "\x00", "😀", "a" * 5000])
def test_edge_texts_round_trip(small_tokenizer: Tokenizer, text: str) -> None:
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_stdlib_sample_round_trips(small_tokenizer: Tokenizer, stdlib_sample: list[str]) -> None:
    encoded = small_tokenizer.encode_batch(stdlib_sample)
    for document, ids in zip(stdlib_sample, encoded):
        assert small_tokenizer.decode(ids) == document


def test_encode_batch_matches_encode(small_tokenizer: Tokenizer) -> None:
    texts = [CODE_SAMPLE, UNICODE_SAMPLE, "", "x = 1\n"]
    assert small_tokenizer.encode_batch(texts) == [small_tokenizer.encode(text) for text in texts]


def test_special_strings_in_text_stay_text(small_tokenizer: Tokenizer) -> None:
    for name in SPECIAL_TOKENS:
        text = f"before {name} after"
        ids = small_tokenizer.encode(text)
        assert all(token_id >= len(SPECIAL_TOKENS) for token_id in ids), name
        assert small_tokenizer.decode(ids) == text


def test_decode_shows_special_tokens(small_tokenizer: Tokenizer) -> None:
    ids = [small_tokenizer.bos_id, *small_tokenizer.encode("x = 1"), small_tokenizer.eos_id]
    assert small_tokenizer.decode(ids) == "<|bos|>x = 1<|eos|>"


def test_pre_tokenizer_keeps_indentation_runs() -> None:
    pieces = [
        piece
        for piece, _ in _build_pre_tokenizer().pre_tokenize_str(
            "if x:\n        return  y\n\tz = 1234567"
        )
    ]
    # ByteLevel shows a space as "Ġ", a newline as "Ċ" and a tab as "ĉ".
    assert pieces == [
        "if",
        "Ġx",
        ":Ċ",
        "ĠĠĠĠĠĠĠ",
        "Ġreturn",
        "Ġ",
        "Ġy",
        "Ċ",
        "ĉz",
        "Ġ=",
        "Ġ",
        "123",
        "456",
        "7",
    ]


def test_indentation_becomes_few_tokens(small_tokenizer: Tokenizer) -> None:
    # The stdlib sample is full of 8-space indentation, so BPE learns it as one or two tokens.
    ids = small_tokenizer.encode("\n        ")
    assert len(ids) <= 3


def test_save_load_keeps_fingerprint(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    small_tokenizer.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert (tmp_path / "tokenizer_config.json").is_file()
    assert (tmp_path / "special_tokens_map.json").is_file()
    from_directory = Tokenizer.load(tmp_path)
    from_file = Tokenizer.load(tmp_path / "tokenizer.json")
    assert from_directory.fingerprint == small_tokenizer.fingerprint
    assert from_file.fingerprint == small_tokenizer.fingerprint
    assert len(small_tokenizer.fingerprint) == 64
    assert from_directory.encode(CODE_SAMPLE) == small_tokenizer.encode(CODE_SAMPLE)
    assert from_directory.encode("<|eos|>") == small_tokenizer.encode("<|eos|>")

    resaved = tmp_path / "again"
    from_directory.save(resaved)
    assert Tokenizer.load(resaved).fingerprint == small_tokenizer.fingerprint


def test_fingerprint_differs_between_tokenizers(
    small_tokenizer: Tokenizer, stdlib_sample: list[str]
) -> None:
    other = train_tokenizer(stdlib_sample[:10], vocab_size=400)
    assert other.fingerprint != small_tokenizer.fingerprint


def test_training_is_deterministic(stdlib_sample: list[str]) -> None:
    first = train_tokenizer(stdlib_sample[:10], vocab_size=400)
    second = train_tokenizer(stdlib_sample[:10], vocab_size=400)
    assert first.fingerprint == second.fingerprint


def test_transformers_loads_same_ids(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    small_tokenizer.save(tmp_path)
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    auto_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in [CODE_SAMPLE, UNICODE_SAMPLE]:
        expected = small_tokenizer.encode(text)
        assert hf_tokenizer.encode(text, add_special_tokens=False) == expected
        assert auto_tokenizer.encode(text, add_special_tokens=False) == expected
        assert hf_tokenizer.decode(expected) == text
    # Special-token strings in text: transformers maps them to their ids unless asked to split
    # them, which gives codeling's ids.
    text = "text with <|eos|> and <|user|> inside"
    assert small_tokenizer.eos_id in hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.encode(text, add_special_tokens=False,
                               split_special_tokens=True) == small_tokenizer.encode(text)
    assert hf_tokenizer.bos_token_id == small_tokenizer.bos_id
    assert hf_tokenizer.eos_token_id == small_tokenizer.eos_id
    assert hf_tokenizer.pad_token_id == small_tokenizer.pad_id
    assert len(hf_tokenizer) == small_tokenizer.vocab_size


def test_load_missing_path_raises(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(CodelingError, match="codeling tokenizer train") as caught:
        Tokenizer.load(missing)
    assert str(missing) in str(caught.value)


def test_load_corrupt_file_raises(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CodelingError, match="codeling tokenizer train") as caught:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(caught.value)
    assert str(tmp_path / "tokenizer.json") in str(caught.value)


def test_load_rejects_foreign_tokenizer(tmp_path: Path) -> None:
    import tokenizers
    from tokenizers import models

    foreign = tokenizers.Tokenizer(models.BPE())
    foreign.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CodelingError, match="missing special tokens"):
        Tokenizer.load(tmp_path)


def test_small_vocab_size_raises() -> None:
    with pytest.raises(CodelingError, match="vocab_size 272"):
        train_tokenizer(["x = 1\n"], vocab_size=272)


def test_bytes_per_token_matches_counts(
    small_tokenizer: Tokenizer, stdlib_sample: list[str]
) -> None:
    texts = stdlib_sample[:5]
    expected_bytes = sum(len(text.encode("utf-8")) for text in texts)
    expected_tokens = sum(len(small_tokenizer.encode(text)) for text in texts)
    assert bytes_per_token(small_tokenizer, texts) == pytest.approx(
        expected_bytes / expected_tokens
    )
    # A trained BPE vocabulary compresses code to well over one byte per token.
    assert bytes_per_token(small_tokenizer, texts) > 1.5


def test_bytes_per_token_without_tokens_raises(small_tokenizer: Tokenizer) -> None:
    with pytest.raises(CodelingError, match="no tokens"):
        bytes_per_token(small_tokenizer, [""])
