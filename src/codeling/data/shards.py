"""Tokenize a source into flat train/val token files with a manifest.

Layout of a prepared source directory:

- `train.bin`, `val.bin`: token ids of every document, each followed by the
  eos id, as one flat array of `manifest["dtype"]` (uint16 when the vocabulary
  fits, else uint32) in native byte order. Load them with `load_split`.
- `val.jsonl`: the held-out documents as `{"text": ...}` lines, for evaluation.
- `manifest.json`: the source spec, per-split counts, dtype and tokenizer
  fingerprint. It is written last, so a directory without it is incomplete.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np

from codeling.data.sources import (iter_documents, iter_limited, iter_unique, split_of,
                                   validation_spec)
from codeling.errors import CodelingError
from codeling.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
VAL_DOCUMENTS_FILE = "val.jsonl"
SPLITS = ("train", "val")
MANIFEST_FORMAT_VERSION = 1
# Documents are tokenized in batches of about this many characters.
BATCH_CHARACTERS = 4_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned dtype that can store every id of a vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_file(out_dir: str | os.PathLike[str], split: str) -> Path:
    """Return the path of a split's token file."""
    return Path(out_dir) / f"{split}.bin"


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the manifest of a prepared source directory."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CodelingError(
            f"no prepared data in {out_dir} ({MANIFEST_FILE} not found); "
            "run `codeling data prepare` first"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CodelingError(
            f"invalid manifest {path} ({error}); run `codeling data prepare` again"
        ) from error


def load_split(
    out_dir: str | os.PathLike[str], split: str, tokenizer_fingerprint: str | None = None
) -> np.ndarray:
    """Memory-map the token ids of one split, checking the manifest and the tokenizer fingerprint.

    An empty split returns an empty in-memory array, because an empty file cannot be memory-mapped.
    """
    if split not in SPLITS:
        raise CodelingError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    manifest = read_manifest(out_dir)
    if (
        tokenizer_fingerprint is not None
        and manifest["tokenizer_fingerprint"] != tokenizer_fingerprint
    ):
        raise CodelingError(
            f"the shards in {out_dir} were made with another tokenizer "
            f"(fingerprint {manifest['tokenizer_fingerprint'][:12]}, "
            f"expected {tokenizer_fingerprint[:12]}); "
            "run `codeling data prepare` again with the current tokenizer"
        )
    dtype = np.dtype(manifest["dtype"]).newbyteorder(
        "<" if manifest.get("byte_order", "little") == "little" else ">"
    )
    tokens = manifest["splits"][split]["tokens"]
    path = split_file(out_dir, split)
    expected_size = tokens * dtype.itemsize
    actual_size = path.stat().st_size if path.is_file() else None
    if actual_size != expected_size:
        raise CodelingError(
            f"token file {path} has {actual_size} bytes but the manifest expects {expected_size}; "
            "run `codeling data prepare` again"
        )
    if tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def prepare_source(
    spec: str,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    val_fraction: float = 0.05,
    num_workers: int | None = None,
    max_documents: int | None = None,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Deduplicate, split and tokenize a source into train.bin, val.bin, val.jsonl, manifest.json.

    With `num_workers` None or 1 the documents are tokenized in this process by
    `Tokenizer.encode_batch`, which runs on all cores through the `tokenizers`
    thread pool. A larger value tokenizes in that many worker processes.
    Returns the manifest.
    """
    if num_workers is not None and num_workers < 1:
        raise CodelingError(f"num_workers {num_workers} is invalid; use 1 or more")
    split_of("", val_fraction)  # validates val_fraction before any work
    documents = iter_limited(iter_unique(iter_documents(spec)), max_documents, max_bytes)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    counts = {split: {"documents": 0, "tokens": 0, "bytes": 0} for split in SPLITS}
    temporary = {split: out / f".{split}.bin.tmp" for split in SPLITS}
    temporary_val_documents = out / f".{VAL_DOCUMENTS_FILE}.tmp"
    started = time.perf_counter()

    try:
        with (
            open(temporary["train"], "wb") as train_file,
            open(temporary["val"], "wb") as val_file,
            open(temporary_val_documents, "w", encoding="utf-8") as val_documents_file,
        ):
            token_files = {"train": train_file, "val": val_file}
            labeled = _label_documents(spec, documents, val_fraction, max_documents)
            batches = _split_batches(labeled)
            for encoded in _encode_batches(batches, tokenizer, num_workers):
                encoded.tokens.tofile(token_files[encoded.split])
                counts[encoded.split]["documents"] += len(encoded.documents)
                counts[encoded.split]["tokens"] += len(encoded.tokens)
                counts[encoded.split]["bytes"] += encoded.byte_count
                if encoded.split == "val":
                    _write_val_documents(val_documents_file, encoded.documents)
        if counts["train"]["documents"] + counts["val"]["documents"] == 0:
            raise CodelingError(f"source {spec!r} gave no non-empty documents; check the spec")
    except BaseException:
        for path in [*temporary.values(), temporary_val_documents]:
            path.unlink(missing_ok=True)
        raise

    elapsed = time.perf_counter() - started
    if counts["val"]["documents"] == 0 and val_fraction > 0:
        logger.warning(
            "%s: no document fell into the val split; use more documents or a larger val_fraction",
            spec,
        )

    # Remove the old manifest before replacing the data files, so that a run
    # killed between the renames leaves no manifest that describes other files.
    (out / MANIFEST_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        os.replace(temporary[split], split_file(out, split))
    os.replace(temporary_val_documents, out / VAL_DOCUMENTS_FILE)

    total_bytes = counts["train"]["bytes"] + counts["val"]["bytes"]
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "source": spec,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype.name,
        "byte_order": sys.byteorder,
        "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "val_fraction": val_fraction,
        "max_documents": max_documents,
        "max_bytes": max_bytes,
        "splits": counts,
        "tokenize_seconds": round(elapsed, 3),
    }
    _write_json_atomically(out / MANIFEST_FILE, manifest)
    logger.info(
        "%s: wrote %d train and %d val tokens to %s in %.1f s (%.2f MB/s)",
        spec,
        counts["train"]["tokens"],
        counts["val"]["tokens"],
        out,
        elapsed,
        total_bytes / max(elapsed, 1e-9) / 1e6,
    )
    return manifest


def _label_documents(
    spec: str, documents: Iterable[str], val_fraction: float, max_documents: int | None
) -> Iterator[tuple[str, str]]:
    """Yield (split, document): by content hash, or from the source's own validation split."""
    val_spec = validation_spec(spec)
    if val_spec is None:
        for document in documents:
            yield split_of(document, val_fraction), document
        return
    for document in documents:
        yield "train", document
    # A capped run takes a matching share of the validation split (at least 100 documents).
    max_val = max(100, int(max_documents * val_fraction)) if max_documents else None
    for document in iter_limited(iter_unique(iter_documents(val_spec)), max_val, None):
        yield "val", document


def _split_batches(labeled: Iterable[tuple[str, str]]) -> Iterator[tuple[str, list[str]]]:
    """Group (split, document) pairs into (split, batch) pairs of about BATCH_CHARACTERS each."""
    batches: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for split, document in labeled:
        batches[split].append(document)
        sizes[split] += len(document)
        if sizes[split] >= BATCH_CHARACTERS:
            yield split, batches[split]
            batches[split] = []
            sizes[split] = 0
    for split in SPLITS:
        if batches[split]:
            yield split, batches[split]


@dataclass
class _EncodedBatch:
    split: str
    documents: list[str]
    tokens: np.ndarray  # ids of every document, each followed by eos
    byte_count: int  # UTF-8 bytes of the documents


def _encode_batch(tokenizer: Tokenizer, split: str, documents: list[str]) -> _EncodedBatch:
    flat: list[int] = []
    for ids in tokenizer.encode_batch(documents):
        flat.extend(ids)
        flat.append(tokenizer.eos_id)
    tokens = np.asarray(flat, dtype=token_dtype(tokenizer.vocab_size))
    byte_count = sum(len(document.encode("utf-8")) for document in documents)
    return _EncodedBatch(split, documents, tokens, byte_count)


# Each worker process loads its own tokenizer once, from the JSON text.
_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    global _worker_tokenizer
    import tokenizers

    _worker_tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer_json))


def _encode_in_worker(item: tuple[str, list[str]]) -> _EncodedBatch:
    assert _worker_tokenizer is not None, "worker started without _init_worker"
    return _encode_batch(_worker_tokenizer, *item)


def _encode_batches(
    batches: Iterable[tuple[str, list[str]]], tokenizer: Tokenizer, num_workers: int | None
) -> Iterator[_EncodedBatch]:
    """Encode (split, documents) batches, yielding the results in input order."""
    if num_workers is None or num_workers == 1:
        for split, documents in batches:
            yield _encode_batch(tokenizer, split, documents)
        return
    # "spawn" because forking after the tokenizers thread pool has started can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(
        num_workers, initializer=_init_worker, initargs=(tokenizer.backend.to_str(),)
    ) as pool:
        yield from pool.imap(_encode_in_worker, batches)


def _write_val_documents(file: IO[str], batch: list[str]) -> None:
    for document in batch:
        file.write(json.dumps({"text": document}, ensure_ascii=False))
        file.write("\n")


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
