"""Named text sources that yield documents lazily, plus deduplication and the train/val split.

Source specs:

- `python-stdlib`: the .py files of the running interpreter's standard library.
- `python-docs`: English prose that ships with the interpreter: the language reference topics
  of `pydoc_data` and the docstrings of the standard library, one document per topic or module.
- `tinystories`: the TinyStories dataset on the Hugging Face Hub (streamed; needs the network),
  with its own validation split.
- `shell-scripts`: sh/bash/dash/ksh/zsh scripts found in the usual system directories.
- `tool-conversations`: the text of the synthetic function-calling conversations of
  `codeling data tools` (training split, seed 0), one document per conversation. It is meant
  for training a tokenizer that will also see chats; the tools stage reads the same
  conversations as chats through `codeling.data.chat_data`.
- `files:GLOB`: every file matching a recursive glob, such as `files:/data/**/*.py`.
- `jsonl:PATH` or `jsonl:PATH:FIELD`: one document per line, read from FIELD (default `text`).
- `hf:DATASET[:CONFIG][,split=SPLIT][,field=FIELD][,data_dir=DIR]`: a Hugging Face dataset,
  streamed. DATASET is a hub name or a local directory or data file.

All sources except `hf:` with a hub name work offline.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import re
import stat
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from glob import glob
from pathlib import Path

from codeling.errors import CodelingError, SourceUnreachableError

logger = logging.getLogger(__name__)

# python-stdlib and shell-scripts skip files larger than this, because such
# files are mostly generated tables or embedded data rather than hand-written code.
MAX_FILE_BYTES = 1_000_000

SHELL_SCRIPT_ROOTS = (
    "/usr/bin",
    "/bin",
    "/usr/sbin",
    "/sbin",
    "/usr/local/bin",
    "/etc",
    "/usr/share",
    "/usr/lib",
)
SHELL_NAMES = frozenset({"sh", "bash", "dash", "ksh", "zsh"})
SHELL_EXTENSIONS = frozenset({".sh", ".bash"})
# Bounds on the shell-scripts walk so that a large /usr/share or /usr/lib
# cannot make it take minutes: directory depth below each root, and the
# number of files whose first bytes are read.
SHELL_MAX_DEPTH = 8
SHELL_MAX_FILES = 50_000
HEAD_BYTES = 1024

OFFLINE_FORMS = ("python-stdlib, python-docs, shell-scripts, tool-conversations, files:GLOB, "
                 "jsonl:PATH[:FIELD]")
# Named hub datasets: (training split spec, validation split spec).
NAMED_HF_SOURCES = {
    "tinystories": ("hf:roneneldan/TinyStories,split=train",
                    "hf:roneneldan/TinyStories,split=validation"),
}
# Docstrings shorter than this are mostly one-line summaries with little prose.
MIN_DOCSTRING_CHARS = 80
VALID_FORMS = f"{OFFLINE_FORMS}, hf:DATASET[:CONFIG][,split=SPLIT][,field=FIELD][,data_dir=DIR]"

HF_OPTIONS = ("split", "field", "data_dir")
# Builder names of `datasets` for a local data file, by extension.
HF_LOCAL_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
    ".arrow": "arrow",
}


@dataclass(frozen=True)
class HfSpec:
    """The parts of an `hf:` source spec."""

    dataset: str
    config: str | None
    split: str
    field: str
    data_dir: str | None

    @property
    def is_local(self) -> bool:
        """Whether the dataset is a local directory or file rather than a hub name."""
        return os.path.exists(self.dataset)


def iter_documents(spec: str) -> Iterator[str]:
    """Validate a source spec and return a lazy iterator over its documents."""
    spec = spec.strip()
    if spec == "python-stdlib":
        return _iter_python_stdlib()
    if spec == "python-docs":
        return _iter_python_docs()
    if spec in NAMED_HF_SOURCES:
        return iter_documents(NAMED_HF_SOURCES[spec][0])
    if spec == "shell-scripts":
        return _iter_shell_scripts()
    if spec == "tool-conversations":
        return _iter_tool_conversations()
    kind, separator, rest = spec.partition(":")
    if separator and rest:
        if kind == "files":
            return _iter_files(spec, rest)
        if kind == "jsonl":
            path, field = parse_jsonl_spec(rest)
            if not path.is_file():
                raise CodelingError(
                    f"jsonl file not found: {path} (from source {spec!r}); check the path"
                )
            return _iter_jsonl(path, field)
        if kind == "hf":
            return _iter_hf(spec, parse_hf_spec(rest))
    raise CodelingError(f"unknown source {spec!r}; valid forms are {VALID_FORMS}")


def load_documents(
    spec: str, max_documents: int | None = None, max_bytes: int | None = None
) -> list[str]:
    """Load the unique non-empty documents of a source, stopping once either limit is reached.

    The document that makes the UTF-8 total reach `max_bytes` is included.
    """
    return list(iter_limited(iter_unique(iter_documents(spec)), max_documents, max_bytes))


def iter_limited(
    documents: Iterable[str], max_documents: int | None, max_bytes: int | None
) -> Iterator[str]:
    """Yield documents until `max_documents` are out or their UTF-8 total reaches `max_bytes`."""
    if max_documents is not None and max_documents < 1:
        raise CodelingError(f"max_documents {max_documents} is invalid; use 1 or more, or no limit")
    if max_bytes is not None and max_bytes < 1:
        raise CodelingError(f"max_bytes {max_bytes} is invalid; use 1 or more, or no limit")
    count = 0
    total_bytes = 0
    for document in documents:
        if max_documents is not None and count >= max_documents:
            return
        if max_bytes is not None and total_bytes >= max_bytes:
            return
        yield document
        count += 1
        total_bytes += len(document.encode("utf-8"))


def iter_unique(documents: Iterable[str]) -> Iterator[str]:
    """Yield documents, dropping exact duplicates (by content SHA-256) and whitespace-only ones."""
    seen: set[bytes] = set()
    for document in documents:
        if not document.strip():
            continue
        digest = hashlib.sha256(document.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        yield document


def split_of(text: str, val_fraction: float) -> str:
    """Return "train" or "val" for a document from a SHA-256 hash of its content.

    The result depends only on the text and `val_fraction`, so it is the same on
    every run and machine, and a document never moves from val to train when the
    source grows.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CodelingError(
            f"val_fraction {val_fraction} is invalid; use a value in [0, 1), such as 0.05"
        )
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if position < val_fraction else "train"


def source_name(spec: str) -> str:
    """Return a short filesystem-safe name for a source spec, for use as a directory name."""
    spec = spec.strip()
    if spec in ("python-stdlib", "shell-scripts", "python-docs", "tool-conversations") \
            or spec in NAMED_HF_SOURCES:
        return spec
    kind, separator, rest = spec.partition(":")
    if not separator or not rest or kind not in ("files", "jsonl", "hf"):
        raise CodelingError(f"unknown source {spec!r}; valid forms are {VALID_FORMS}")
    slug = re.sub(r"[^a-z0-9]+", "-", rest.lower()).strip("-")
    # Keep the end of long specs because it usually names the file or dataset.
    slug = slug[-40:].lstrip("-")
    digest = hashlib.sha256(spec.encode("utf-8")).hexdigest()[:8]
    return f"{kind}-{slug}-{digest}" if slug else f"{kind}-{digest}"


def parse_jsonl_spec(rest: str) -> tuple[Path, str]:
    """Split the part after `jsonl:` into a path and a field name (default `text`).

    A trailing `:FIELD` is read as a field only when the whole string is not an
    existing file and FIELD contains no path separator.
    """
    whole = Path(rest).expanduser()
    if whole.is_file() or ":" not in rest:
        return whole, "text"
    path, field = rest.rsplit(":", 1)
    if not field or "/" in field or os.sep in field:
        return whole, "text"
    return Path(path).expanduser(), field


def parse_hf_spec(rest: str) -> HfSpec:
    """Parse the part after `hf:`, which is `DATASET[:CONFIG][,key=value]...`."""
    head, *option_parts = rest.split(",")
    options = {"split": "train", "field": "text", "data_dir": None}
    for part in option_parts:
        key, equals, value = part.partition("=")
        key = key.strip()
        if not equals or key not in HF_OPTIONS or not value.strip():
            raise CodelingError(
                f"invalid option {part!r} in source 'hf:{rest}'; "
                f"use key=value with keys {', '.join(HF_OPTIONS)}"
            )
        options[key] = value.strip()
    head = head.strip()
    if os.path.exists(head) or ":" not in head:
        dataset, config = head, None
    else:
        dataset, config = head.split(":", 1)
    if not dataset:
        raise CodelingError(
            f"source 'hf:{rest}' names no dataset; use hf:DATASET such as hf:bigcode/the-stack-smol"
        )
    return HfSpec(
        dataset=dataset,
        config=config or None,
        split=options["split"],
        field=options["field"],
        data_dir=options["data_dir"],
    )


def _read_text_file(path: Path, max_bytes: int | None) -> str | None:
    """Return a file's UTF-8 text, or None when it is unreadable, too large or not UTF-8."""
    try:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def validation_spec(spec: str) -> str | None:
    """Return the spec of a source's own validation split, or None to split by content hash."""
    named = NAMED_HF_SOURCES.get(spec.strip())
    return named[1] if named else None


def _iter_python_docs() -> Iterator[str]:
    """Yield the pydoc topics, then each standard-library module's docstrings as one document."""
    import ast

    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    for source in _iter_python_stdlib():
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError, RecursionError):
            continue
        nodes = [tree] + [node for node in ast.walk(tree) if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        docstrings = [ast.get_docstring(node) for node in nodes]
        prose = [text for text in docstrings if text and len(text) >= MIN_DOCSTRING_CHARS]
        if prose:
            yield "\n\n".join(prose) + "\n"


def _iter_python_stdlib() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = 0
    for directory, dirnames, filenames in os.walk(root):
        # os.walk visits directories in the order left in dirnames, so sorting fixes the order.
        dirnames[:] = sorted(
            name
            for name in dirnames
            if name not in ("site-packages", "dist-packages", "__pycache__")
        )
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            text = _read_text_file(Path(directory) / filename, MAX_FILE_BYTES)
            if text is None:
                skipped += 1
                continue
            yield text
    if skipped:
        logger.info(
            "python-stdlib: skipped %d files that were unreadable, over %d bytes or not UTF-8",
            skipped,
            MAX_FILE_BYTES,
        )


def is_shell_script(path: str | os.PathLike[str], head: bytes) -> bool:
    """Return whether a file is a text shell script, judging by its name and first bytes."""
    if b"\0" in head:
        return False
    if head.startswith(b"#!"):
        words = head[2:].split(b"\n", 1)[0].decode("utf-8", errors="replace").split()
        if words:
            interpreter = os.path.basename(words[0])
            if interpreter == "env":
                # `#!/usr/bin/env bash` or `#!/usr/bin/env -S bash -e`: take the first non-option.
                arguments = [word for word in words[1:] if not word.startswith("-")]
                interpreter = os.path.basename(arguments[0]) if arguments else ""
            if interpreter in SHELL_NAMES:
                return True
    return os.path.splitext(os.fspath(path))[1] in SHELL_EXTENSIONS


def iter_shell_script_paths(
    roots: Iterable[str] = SHELL_SCRIPT_ROOTS,
    max_depth: int = SHELL_MAX_DEPTH,
    max_files: int = SHELL_MAX_FILES,
) -> Iterator[Path]:
    """Walk the roots in sorted order and yield the paths of shell scripts, each real file once.

    Only files that are executable, have no extension or have a shell extension
    get their first bytes read. This keeps a cold-cache walk of /usr/share and
    /usr/lib short, and misses only the rare non-executable script with another
    extension.
    """
    seen_directories: set[str] = set()
    seen_files: set[tuple[int, int]] = set()
    examined = 0
    for root in roots:
        real_root = os.path.realpath(root)
        if real_root in seen_directories or not os.path.isdir(real_root):
            continue
        # With followlinks=False os.walk never enters a symlinked directory, so loops cannot occur.
        for directory, dirnames, filenames in os.walk(real_root, followlinks=False):
            seen_directories.add(directory)
            depth = directory[len(real_root) :].count(os.sep)
            if depth >= max_depth:
                dirnames.clear()
            dirnames.sort()
            for filename in sorted(filenames):
                path = os.path.join(directory, filename)
                extension = os.path.splitext(filename)[1]
                try:
                    status = os.stat(
                        path
                    )  # follows a symlink to its target; a broken link raises OSError
                except OSError:
                    continue
                if not stat.S_ISREG(status.st_mode) or status.st_size > MAX_FILE_BYTES:
                    continue
                if not (status.st_mode & 0o111 or extension == "" or extension in SHELL_EXTENSIONS):
                    continue
                identity = (status.st_dev, status.st_ino)
                if identity in seen_files:
                    continue
                seen_files.add(identity)
                if examined >= max_files:
                    logger.warning(
                        "shell-scripts: stopped after reading the start of %d files (the limit)",
                        max_files,
                    )
                    return
                examined += 1
                try:
                    with open(path, "rb") as file:
                        head = file.read(HEAD_BYTES)
                except OSError:
                    continue
                if is_shell_script(path, head):
                    yield Path(path)


def _iter_tool_conversations() -> Iterator[str]:
    from codeling.chat import text_pieces
    from codeling.data.tool_data import DEFAULT_TOOL_EXAMPLES, iter_records

    for record in iter_records("train", DEFAULT_TOOL_EXAMPLES):
        yield "\n".join(text_pieces(record["messages"], record.get("tools")))


def _iter_shell_scripts() -> Iterator[str]:
    for path in iter_shell_script_paths():
        text = _read_text_file(path, MAX_FILE_BYTES)
        if text is not None:
            yield text


def _iter_files(spec: str, pattern: str) -> Iterator[str]:
    expanded = os.path.expanduser(pattern)
    paths = sorted(path for path in glob(expanded, recursive=True) if os.path.isfile(path))
    if not paths:
        raise CodelingError(
            f"no files match {pattern!r} (from source {spec!r}); check the path, "
            "and quote the glob so the shell does not expand it"
        )
    return _iter_file_texts(spec, paths)


def _iter_file_texts(spec: str, paths: list[str]) -> Iterator[str]:
    skipped = 0
    for path in paths:
        text = _read_text_file(Path(path), max_bytes=None)
        if text is None:
            skipped += 1
            logger.debug("%s: skipped %s (unreadable or not UTF-8)", spec, path)
            continue
        yield text
    if skipped:
        logger.warning(
            "%s: skipped %d of %d files that were unreadable or not UTF-8",
            spec,
            skipped,
            len(paths),
        )


def iter_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded value) for each non-blank line of a JSONL file.

    Raises CodelingError naming the file and line for text that is not UTF-8 or not JSON.
    """
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CodelingError(f"{path}:{number}: not UTF-8 text (byte {error.start}); "
                                    "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise CodelingError(f"{path}:{number}: invalid JSON ({error.msg} at column "
                                    f"{error.colno}); each line must be one record") from None


def _iter_jsonl(path: Path, field: str) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CodelingError(
                    f"invalid JSON on line {line_number} of {path}: {error.msg}; "
                    "fix or remove that line"
                ) from error
            if not isinstance(record, dict) or field not in record:
                raise CodelingError(
                    f"line {line_number} of {path} has no field {field!r}; "
                    f"name the text field as jsonl:{path}:FIELD"
                )
            value = record[field]
            if not isinstance(value, str):
                raise CodelingError(
                    f"field {field!r} on line {line_number} of {path} is "
                    f"{type(value).__name__}, not a string; "
                    f"name a text field as jsonl:{path}:FIELD"
                )
            yield value


def _hf_offline_error(spec: str, reason: str) -> SourceUnreachableError:
    return SourceUnreachableError(
        f"cannot reach the Hugging Face Hub for source {spec!r} ({reason}); "
        f"use an offline source instead: {OFFLINE_FORMS}, "
        "or hf: with a local directory or data file"
    )


def _hub_offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _iter_hf(spec: str, hf: HfSpec) -> Iterator[str]:
    # Streaming a hub dataset always downloads, so HF_HUB_OFFLINE rules it out
    # even when the dataset is in the local cache.
    if not hf.is_local and _hub_offline_flag():
        raise _hf_offline_error(spec, "HF_HUB_OFFLINE is set")
    if hf.is_local and os.path.isfile(hf.dataset):
        extension = Path(hf.dataset.removesuffix(".gz")).suffix
        if extension not in HF_LOCAL_BUILDERS:
            raise CodelingError(
                f"cannot load {hf.dataset} as a dataset: unknown extension {extension!r}; "
                f"use one of {', '.join(HF_LOCAL_BUILDERS)} or a directory of such files"
            )
    return _iter_hf_rows(spec, hf)


def _iter_hf_rows(spec: str, hf: HfSpec) -> Iterator[str]:
    import datasets  # imported here because importing it takes about half a second
    from huggingface_hub.utils import LocalEntryNotFoundError

    # Errors that mean the hub could not be reached. OfflineModeIsEnabled is a ConnectionError.
    unreachable = (ConnectionError, TimeoutError, LocalEntryNotFoundError)
    try:
        if hf.is_local and os.path.isfile(hf.dataset):
            builder = HF_LOCAL_BUILDERS[Path(hf.dataset.removesuffix(".gz")).suffix]
            dataset = datasets.load_dataset(
                builder, data_files=hf.dataset, split=hf.split, streaming=True
            )
        else:
            dataset = datasets.load_dataset(
                hf.dataset, name=hf.config, split=hf.split, data_dir=hf.data_dir, streaming=True
            )
        for row_number, row in enumerate(dataset):
            if hf.field not in row:
                raise CodelingError(
                    f"row {row_number} of dataset {hf.dataset!r} has no field {hf.field!r} "
                    f"(columns: {', '.join(row)}); choose one with hf:{hf.dataset},field=NAME"
                )
            value = row[hf.field]
            if not isinstance(value, str):
                raise CodelingError(
                    f"field {hf.field!r} in row {row_number} of dataset {hf.dataset!r} "
                    f"is {type(value).__name__}, "
                    f"not a string; choose a text field with hf:{hf.dataset},field=NAME"
                )
            yield value
    except unreachable as error:
        raise _hf_offline_error(spec, type(error).__name__) from error
    except datasets.exceptions.DatasetNotFoundError as error:
        raise CodelingError(
            f"dataset {hf.dataset!r} not found (from source {spec!r}); check the name or path"
        ) from error
    except ValueError as error:
        # `datasets` raises ValueError for a bad split, config or data_dir.
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CodelingError(f"cannot load source {spec!r}: {first_line}") from error
