"""Byte-level BPE tokenizer for code, trained from scratch and saved in the Hugging Face format.

Every byte has a token, so any text survives `encode` then `decode` unchanged.
Special tokens get ids 0..15 in the order of `SPECIAL_TOKENS`.

Special token strings that appear in input text, such as a literal "<|eos|>"
inside a source file, are encoded as ordinary text and never as the special id.
Code that builds prompts or training sequences inserts special tokens by id
(`token_id`, `bos_id`, `eos_id`).

The saved `tokenizer_config.json` carries the chat template (`codeling.chat.CHAT_TEMPLATE`).
It leaves `split_special_tokens` off, as chat models on the Hugging Face hub do, because
`apply_chat_template` and serving runtimes render the template to text and rely on the
tokenizer to turn the special-token strings in it into their ids. So `transformers` encodes
text without special-token strings exactly as `encode` does; for text that contains them, pass
`split_special_tokens=True` to get codeling's ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from codeling.errors import CodelingError

SPECIAL_TOKENS: list[str] = [
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool_call|>",
    "<|tool_result|>",
    "<|end_turn|>",
    *(f"<|reserved_{index}|>" for index in range(7)),
]

TOKENIZER_FILE = "tokenizer.json"
BYTE_ALPHABET_SIZE = 256

# Pre-tokenizer regex (Oniguruma syntax, as used by `tokenizers`). BPE merges
# never cross the boundaries of these pieces. Compared with the GPT-2 regex it
# keeps line breaks apart from the indentation that follows them, drops the
# English contraction rule (which splits 'test' in code into 't + est) and
# caps digit runs at three. The alternatives are tried in order at each position:
CODE_SPLIT_PATTERN = "|".join(
    [
        # A word with at most one leading space or symbol: " return", ".append", "_name".
        r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+",
        # Digits in groups of at most three.
        r"\p{N}{1,3}",
        # Operators and punctuation, with an optional leading space and the line breaks after them.
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        # Line breaks, with any whitespace before them.
        r"\s*[\r\n]+",
        # Indentation and runs of spaces or tabs, leaving the last space to the word that follows.
        r"\s+(?!\S)",
        # Trailing whitespace at the end of the text.
        r"\s+",
    ]
)


def _build_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CODE_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _canonical_json(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Tokenizer:
    """A byte-level BPE tokenizer with the codeling special tokens at ids 0..15."""

    def __init__(self, backend: tokenizers.Tokenizer):
        self._backend = backend
        # Encode special token strings found in text as ordinary text. This flag
        # is not stored in tokenizer.json, so it is set on every construction.
        self._backend.encode_special_tokens = True
        missing = [name for name in SPECIAL_TOKENS if backend.token_to_id(name) is None]
        if missing:
            raise CodelingError(
                f"tokenizer is missing special tokens {missing}; "
                "train a new one with `codeling tokenizer train`"
            )
        wrong_ids = [
            name for index, name in enumerate(SPECIAL_TOKENS) if backend.token_to_id(name) != index
        ]
        if wrong_ids:
            raise CodelingError(
                f"tokenizer has special tokens {wrong_ids} at unexpected ids; "
                "train a new one with `codeling tokenizer train`"
            )
        self._fingerprint = hashlib.sha256(
            _canonical_json(backend.to_str()).encode("utf-8")
        ).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer from a directory containing tokenizer.json or from the file itself."""
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILE
        if not file.is_file():
            raise CodelingError(
                f"tokenizer file not found: {file}; run `codeling tokenizer train` to create it"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as error:  # tokenizers raises a plain Exception for any parse error
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise CodelingError(
                f"invalid tokenizer file {file} ({first_line}); "
                "run `codeling tokenizer train` to create it again"
            ) from error
        try:
            return cls(backend)
        except CodelingError as error:
            raise CodelingError(f"{file}: {error}") from error

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        """Id of `<|bos|>`."""
        return SPECIAL_TOKENS.index("<|bos|>")

    @property
    def eos_id(self) -> int:
        """Id of `<|eos|>`, appended after every document in the data shards."""
        return SPECIAL_TOKENS.index("<|eos|>")

    @property
    def pad_id(self) -> int:
        """Id of `<|pad|>`."""
        return SPECIAL_TOKENS.index("<|pad|>")

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex digest of the canonical tokenizer.json (sorted keys, compact separators)."""
        return self._fingerprint

    def token_id(self, name: str) -> int:
        """Return the id of a token string such as "<|user|>"."""
        token_id = self._backend.token_to_id(name)
        if token_id is None:
            raise CodelingError(
                f"unknown token {name!r}; special tokens are {', '.join(SPECIAL_TOKENS)}"
            )
        return token_id

    def encode(self, text: str) -> list[int]:
        """Encode text to ids without adding special tokens."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts on the `tokenizers` thread pool, without adding special tokens."""
        # encode_batch_fast (tokenizers 0.21+) skips computing character offsets.
        encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text, writing special tokens as their strings."""
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to directory."""
        from codeling.chat import CHAT_TEMPLATE  # chat imports this module
        out_dir = Path(directory)
        out_dir.mkdir(parents=True, exist_ok=True)
        special_map = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "additional_special_tokens": [
                name for name in SPECIAL_TOKENS if name not in special_map.values()
            ],
            # Off, so that a rendered chat template gets its special tokens (see the module notes).
            "split_special_tokens": False,
            "chat_template": CHAT_TEMPLATE,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        files = {
            TOKENIZER_FILE: self._backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(special_map, indent=2),
        }
        for name, text in files.items():
            temporary = out_dir / f".{name}.tmp"
            temporary.write_text(text + "\n", encoding="utf-8")
            os.replace(temporary, out_dir / name)
        return out_dir


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer with the codeling special tokens on an iterable of texts."""
    minimum = len(SPECIAL_TOKENS) + BYTE_ALPHABET_SIZE
    if vocab_size <= minimum:
        raise CodelingError(
            f"vocab_size {vocab_size} is too small: it must exceed {minimum} "
            f"({len(SPECIAL_TOKENS)} special tokens + {BYTE_ALPHABET_SIZE} bytes); "
            "use a larger vocab_size such as 4096"
        )
    if min_frequency < 1:
        raise CodelingError(f"min_frequency {min_frequency} is invalid; use 1 or more")

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = _build_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend)


def bytes_per_token(tokenizer: Tokenizer, texts: Iterable[str]) -> float:
    """Compute the UTF-8 bytes per token over texts, a measure of compression."""
    total_bytes = 0
    total_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal total_tokens
        total_tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
        batch.clear()

    for text in texts:
        total_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) >= 256:
            flush()
    flush()
    if total_tokens == 0:
        raise CodelingError("bytes_per_token got no tokens; pass at least one non-empty text")
    return total_bytes / total_tokens
