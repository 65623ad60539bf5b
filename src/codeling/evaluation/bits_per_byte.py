"""Bits per byte on held-out tokens: a language-model loss comparable across tokenizers.

    bits per byte = (sum of next-token cross-entropies in nats) / ln 2 / (UTF-8 bytes)

Loss per token depends on how much text a token covers, so two tokenizers give incomparable
losses. Dividing the total by the bytes of the text instead of the token count removes that.

What is counted, for a token array laid out like a prepared `val.bin` (each document's tokens
followed by one eos):

- One eos is put in front of the array as context, so every token of the array is predicted
  exactly once, the first one included, as if an earlier document had just ended.
- The loss includes the eos predictions. Predicting where a document ends is part of modeling
  the text, and every tokenizer emits exactly one eos per document, so the total stays
  comparable across tokenizers.
- The bytes are the UTF-8 bytes of the documents, the `bytes` of the manifest's val split.
  Eos tokens cover no bytes.
- The tokens are cut into windows of `seq_len` predictions. Each window starts with an empty
  context, so the score depends on `seq_len`: longer windows give more context on average.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codeling.data.shards import VAL_DOCUMENTS_FILE, load_split, read_manifest
from codeling.errors import CodelingError
from codeling.tokenizer import SPECIAL_TOKENS
from codeling.training.device import autocast, resolve_device

EOS_ID = SPECIAL_TOKENS.index("<|eos|>")


def bits_per_byte(model: nn.Module, tokens: np.ndarray | torch.Tensor | list[int],
                  utf8_bytes: int, batch_size: int = 8, seq_len: int | None = None,
                  device: str | torch.device = "cpu", bf16: bool = False,
                  max_tokens: int | None = None, eos_id: int = EOS_ID) -> dict[str, Any]:
    """Compute bits per byte of `model` over a flat array of document tokens.

    `utf8_bytes` is the number of UTF-8 bytes that the whole `tokens` array covers. With
    `max_tokens` smaller than the array, only its first `max_tokens` tokens are scored and the
    bytes are scaled by the same fraction, an estimate that the result marks with
    `bytes_estimated`. `evaluate_prepared_source` cuts at a document boundary instead and
    counts those bytes exactly. `model` maps token ids (B, T) to logits (B, T, V), as
    `CodeModel` does, and has a `config.max_seq_len`; `seq_len` defaults to it.

    Returns bits_per_byte, loss (mean nats per predicted token), bits_per_token, tokens
    (predicted), bytes, eos_tokens, seq_len and bytes_estimated.
    """
    array = _as_array(tokens)
    if array.size == 0:
        raise CodelingError("bits_per_byte got no tokens; pass a non-empty token array")
    if utf8_bytes <= 0:
        raise CodelingError(f"utf8_bytes must be positive, got {utf8_bytes}")
    if batch_size < 1:
        raise CodelingError(f"batch_size must be at least 1, got {batch_size}")
    max_seq_len = model.config.max_seq_len
    seq_len = seq_len or max_seq_len
    if not 1 <= seq_len <= max_seq_len:
        raise CodelingError(f"seq_len {seq_len} must be between 1 and the model's context "
                            f"{max_seq_len}")

    bytes_estimated = False
    byte_count: float = utf8_bytes
    if max_tokens is not None:
        if max_tokens < 1:
            raise CodelingError(f"max_tokens must be at least 1, got {max_tokens}")
        if max_tokens < array.size:
            byte_count = utf8_bytes * max_tokens / array.size
            bytes_estimated = True
            array = array[:max_tokens]

    target_device = resolve_device(device) if isinstance(device, str) else device
    total_nats = _sum_losses(model, array, seq_len, batch_size, target_device, bf16, eos_id)
    count = int(array.size)
    return {
        "bits_per_byte": total_nats / math.log(2) / byte_count,
        "loss": total_nats / count,
        "bits_per_token": total_nats / count / math.log(2),
        "tokens": count,
        "bytes": byte_count,
        "eos_tokens": int(np.count_nonzero(array == eos_id)),
        "seq_len": seq_len,
        "bytes_estimated": bytes_estimated,
    }


def evaluate_prepared_source(model: nn.Module, data_dir: str | os.PathLike[str],
                             batch_size: int = 8, seq_len: int | None = None,
                             device: str | torch.device = "cpu", bf16: bool = False,
                             max_tokens: int | None = None,
                             tokenizer_fingerprint: str | None = None) -> dict[str, Any]:
    """Compute bits per byte on the val split of a prepared source directory.

    The bytes come from the manifest. With `max_tokens`, the tokens are cut after the last
    whole document that fits, and the bytes of those documents are counted from val.jsonl,
    so the result stays exact. Only when the first document alone is longer than
    `max_tokens` is it cut inside, with its bytes scaled by the share of its tokens scored
    (`bytes_estimated` is then True). Pass `tokenizer_fingerprint` to check that the shards
    were made with the model's tokenizer.
    """
    manifest = read_manifest(data_dir)
    tokens = load_split(data_dir, "val", tokenizer_fingerprint)
    if tokens.size == 0:
        raise CodelingError(f"the val split in {data_dir} is empty; run `codeling data prepare` "
                            "with a val_fraction above 0")
    vocab_size = model.config.vocab_size
    if manifest["vocab_size"] > vocab_size:
        raise CodelingError(f"the shards in {data_dir} use a vocabulary of "
                            f"{manifest['vocab_size']} tokens but the model has {vocab_size}; "
                            "evaluate with the model's own data")
    eos_id = manifest["eos_id"]
    utf8_bytes = manifest["splits"]["val"]["bytes"]
    bytes_estimated = False
    if max_tokens is not None and max_tokens < tokens.size:
        if max_tokens < 1:
            raise CodelingError(f"max_tokens must be at least 1, got {max_tokens}")
        tokens, utf8_bytes, bytes_estimated = _whole_document_prefix(
            Path(data_dir), tokens, max_tokens, eos_id)

    result = bits_per_byte(model, tokens, utf8_bytes, batch_size=batch_size, seq_len=seq_len,
                           device=device, bf16=bf16, eos_id=eos_id)
    result["bytes_estimated"] = bytes_estimated
    result["source"] = manifest["source"]
    result["data_dir"] = str(data_dir)
    return result


def _as_array(tokens: np.ndarray | torch.Tensor | list[int]) -> np.ndarray:
    if isinstance(tokens, torch.Tensor):
        return tokens.detach().cpu().numpy().reshape(-1)
    return np.asarray(tokens).reshape(-1)


def _windows(length: int, seq_len: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """Yield (first window start, window count, window length) for batches of equal windows.

    Positions index the stream eos + tokens, which has length + 1 entries. A window starting
    at s takes inputs stream[s : s + L] and targets stream[s + 1 : s + L + 1].
    """
    full_windows = length // seq_len
    for first in range(0, full_windows, batch_size):
        count = min(batch_size, full_windows - first)
        yield first * seq_len, count, seq_len
    remainder = length - full_windows * seq_len
    if remainder:
        yield full_windows * seq_len, 1, remainder


def _stream_slice(tokens: np.ndarray, start: int, stop: int, eos_id: int) -> np.ndarray:
    """Return stream[start:stop] of the stream eos + tokens as int64."""
    if start == 0:
        return np.concatenate([[eos_id], tokens[:stop - 1]]).astype(np.int64)
    return np.asarray(tokens[start - 1:stop - 1], dtype=np.int64)


@torch.inference_mode()
def _sum_losses(model: nn.Module, tokens: np.ndarray, seq_len: int, batch_size: int,
                device: torch.device, bf16: bool, eos_id: int) -> float:
    """Return the summed next-token cross-entropy in nats over every token of the array."""
    vocab_size = model.config.vocab_size
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start, count, length in _windows(tokens.size, seq_len, batch_size):
            stream = _stream_slice(tokens, start, start + count * length + 1, eos_id)
            if stream.max() >= vocab_size or stream.min() < 0:
                raise CodelingError(f"token ids must lie in [0, {vocab_size}) for this model, "
                                    f"found {int(stream.min())}..{int(stream.max())}; use data "
                                    "made with the model's tokenizer")
            stream_tensor = torch.from_numpy(stream).to(device)
            inputs = stream_tensor[:-1].view(count, length)  # (B, T)
            targets = stream_tensor[1:].view(count, length)  # (B, T)
            with autocast(device, bf16):
                logits = model(inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                   targets.reshape(-1), reduction="sum")
            total += float(loss.double().item())
    finally:
        model.train(was_training)
    return total


def _whole_document_prefix(data_dir: Path, tokens: np.ndarray, max_tokens: int,
                           eos_id: int) -> tuple[np.ndarray, int | float, bool]:
    """Cut tokens after the last whole document within max_tokens; return them and their bytes."""
    ends = np.flatnonzero(np.asarray(tokens[:max_tokens]) == eos_id)
    if ends.size:
        documents = _document_bytes(data_dir, int(ends.size))
        return tokens[:int(ends[-1]) + 1], sum(documents), False
    first_end = np.flatnonzero(np.asarray(tokens) == eos_id)
    first_length = int(first_end[0]) + 1 if first_end.size else tokens.size
    first_bytes = _document_bytes(data_dir, 1)[0]
    return tokens[:max_tokens], first_bytes * max_tokens / first_length, True


def _document_bytes(data_dir: Path, count: int) -> list[int]:
    """Return the UTF-8 byte counts of the first `count` documents in val.jsonl."""
    path = data_dir / VAL_DOCUMENTS_FILE
    sizes: list[int] = []
    try:
        with open(path, encoding="utf-8") as file:
            for line in file:
                sizes.append(len(json.loads(line)["text"].encode("utf-8")))
                if len(sizes) == count:
                    return sizes
    except FileNotFoundError:
        raise CodelingError(f"{path} not found; run `codeling data prepare` again") from None
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as error:
        raise CodelingError(f"invalid {path} ({error}); run `codeling data prepare` again") \
            from error
    raise CodelingError(f"{path} has {len(sizes)} documents but val.bin has at least {count}; "
                        "run `codeling data prepare` again")
