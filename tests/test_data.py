"""Tests for data sources, prepared shards and the packed batch loader."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from codeling.data.loader import PackedLoader, iter_eval_batches
from codeling.data.shards import load_split, prepare_source, read_manifest, token_dtype
from codeling.data.sources import (
    is_shell_script,
    iter_documents,
    iter_shell_script_paths,
    iter_unique,
    load_documents,
    source_name,
    split_of,
)
from codeling.errors import CodelingError
from codeling.tokenizer import Tokenizer

OFFLINE_FORMS = ["python-stdlib", "shell-scripts", "files:GLOB", "jsonl:PATH"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def make_documents(count: int) -> list[str]:
    return [
        f"def function_{index}(value):\n    return value * {index} + {index % 7}\n"
        for index in range(count)
    ]


# Sources


def test_python_stdlib_has_many_documents() -> None:
    documents = list(iter_documents("python-stdlib"))
    assert len(documents) > 100
    assert all(isinstance(document, str) for document in documents)
    assert any("def " in document for document in documents)


def test_python_stdlib_order_is_deterministic() -> None:
    first = list(islice(iter_documents("python-stdlib"), 20))
    second = list(islice(iter_documents("python-stdlib"), 20))
    assert first == second


def test_shell_scripts_found_on_machine() -> None:
    first = next(iter_documents("shell-scripts"), None)
    if first is None:
        pytest.skip("this machine has no sh/bash scripts in the usual system directories")
    assert first.strip()


@pytest.mark.parametrize(
    ("name", "head", "expected"),
    [
        ("run", b"#!/bin/sh\necho hi\n", True),
        ("run", b"#! /bin/bash -e\necho hi\n", True),
        ("run", b"#!/usr/bin/env bash\necho hi\n", True),
        ("run", b"#!/usr/bin/env -S zsh -f\necho hi\n", True),
        ("run", b"#!/bin/dash\n", True),
        ("run", b"#!/usr/bin/ksh\n", True),
        ("run", b"#!/usr/bin/python3\nprint()\n", False),
        ("run", b"#!/usr/bin/env python3\n", False),
        ("notes.txt", b"echo hi\n", False),
        ("setup.sh", b"export PATH=/opt/bin:$PATH\n", True),
        ("setup.bash", b"alias ll='ls -l'\n", True),
        ("tool.sh", b"\x7fELF\x02\x01\x01\x00\x00", False),
        ("run", b"#!/bin/sh\n\x00binary tail", False),
    ],
)
def test_shell_script_detection(name: str, head: bytes, expected: bool) -> None:
    assert is_shell_script(name, head) is expected


def test_shell_walk_handles_links_and_binaries(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.sh").write_text("echo a\n")
    (root / "sub" / "b").write_text("#!/bin/bash\necho b\n")
    (root / "sub" / "deeper" / "c").write_text("#!/bin/sh\necho c\n")
    (root / "sub" / "binary").write_bytes(b"#!/bin/sh\n\x00\x01\x02")
    (root / "sub" / "python").write_text("#!/usr/bin/python3\nprint(1)\n")
    (root / "big.sh").write_text("echo x\n" * 200_000)  # over 1 MB
    (root / "sub" / "loop").symlink_to(root)  # a directory symlink loop
    (root / "z-link.sh").symlink_to(root / "a.sh")  # the same file twice
    (root / "broken.sh").symlink_to(root / "missing")

    found = [path.relative_to(root).as_posix() for path in iter_shell_script_paths([str(root)])]
    assert found == ["a.sh", "sub/b", "sub/deeper/c"]

    shallow = [
        path.relative_to(root).as_posix()
        for path in iter_shell_script_paths([str(root)], max_depth=1)
    ]
    assert shallow == ["a.sh", "sub/b"]

    capped = list(iter_shell_script_paths([str(root)], max_files=1))
    assert [path.name for path in capped] == ["a.sh"]


def test_files_source_reads_recursive_glob(tmp_path: Path) -> None:
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "b.py").write_text("b = 2\n")
    (tmp_path / "pkg" / "a.py").write_text("a = 1\n")
    (tmp_path / "pkg" / "sub" / "c.py").write_text("c = 3\r\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not python\n")
    (tmp_path / "pkg" / "latin1.py").write_bytes(b"x = '\xe9'\n")  # not UTF-8, skipped
    documents = list(iter_documents(f"files:{tmp_path}/pkg/**/*.py"))
    assert documents == ["a = 1\n", "b = 2\n", "c = 3\r\n"]


def test_files_source_without_match_raises(tmp_path: Path) -> None:
    pattern = f"{tmp_path}/nothing/**/*.py"
    with pytest.raises(CodelingError) as caught:
        iter_documents(f"files:{pattern}")
    assert pattern in str(caught.value)


def test_jsonl_source_default_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "one\n"}, {"text": "two\n", "extra": 1}])
    assert list(iter_documents(f"jsonl:{path}")) == ["one\n", "two\n"]


def test_jsonl_source_named_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"content": "x = 1\n"}, {"content": "y = 2\n"}])
    assert list(iter_documents(f"jsonl:{path}:content")) == ["x = 1\n", "y = 2\n"]


def test_jsonl_source_reads_gzip(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write(json.dumps({"text": "zipped\n"}) + "\n")
    assert list(iter_documents(f"jsonl:{path}")) == ["zipped\n"]


def test_jsonl_missing_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "absent.jsonl"
    with pytest.raises(CodelingError, match="not found") as caught:
        iter_documents(f"jsonl:{path}")
    assert str(path) in str(caught.value)


def test_jsonl_missing_field_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"content": "a"}, {"content": "b"}, {"body": "c"}])
    with pytest.raises(CodelingError) as caught:
        list(iter_documents(f"jsonl:{path}:content"))
    message = str(caught.value)
    assert "line 3" in message
    assert str(path) in message
    assert "'content'" in message


def test_jsonl_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n{broken\n', encoding="utf-8")
    with pytest.raises(CodelingError, match="line 2"):
        list(iter_documents(f"jsonl:{path}"))


def test_jsonl_non_string_field_raises(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": 5}])
    with pytest.raises(CodelingError, match="not a string"):
        list(iter_documents(f"jsonl:{path}"))


@pytest.mark.parametrize("spec", ["nope", "files:", "ftp:/x", "python-stdlib:extra", ""])
def test_unknown_source_lists_forms(spec: str) -> None:
    with pytest.raises(CodelingError, match="unknown source") as caught:
        iter_documents(spec)
    for form in OFFLINE_FORMS:
        assert form in str(caught.value)
    assert "hf:DATASET" in str(caught.value)


def test_hf_source_reads_local_directory(tmp_path: Path) -> None:
    dataset_dir = tmp_path / "dataset"
    dataset_dir.mkdir()
    write_jsonl(
        dataset_dir / "part-0.jsonl",
        [{"content": f"print({index})\n", "id": index} for index in range(5)],
    )
    documents = list(iter_documents(f"hf:{dataset_dir},field=content"))
    assert documents == [f"print({index})\n" for index in range(5)]


def test_hf_source_reads_local_parquet(tmp_path: Path) -> None:
    import pyarrow
    import pyarrow.parquet

    path = tmp_path / "code.parquet"
    pyarrow.parquet.write_table(pyarrow.table({"text": ["a = 1\n", "b = 2\n"]}), path)
    assert list(iter_documents(f"hf:{path}")) == ["a = 1\n", "b = 2\n"]


def test_hf_source_missing_field_raises(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"content": "x"}])
    with pytest.raises(CodelingError, match="no field 'text'"):
        list(iter_documents(f"hf:{path}"))


def test_hf_source_bad_option_raises(tmp_path: Path) -> None:
    with pytest.raises(CodelingError, match="invalid option"):
        iter_documents(f"hf:{tmp_path},colour=blue")


def test_hf_offline_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CodelingError) as caught:
        list(iter_documents("hf:bigcode/the-stack-smol,field=content"))
    message = str(caught.value)
    assert "\n" not in message
    assert "bigcode/the-stack-smol" in message
    for form in OFFLINE_FORMS:
        assert form in message


def test_hf_offline_error_from_datasets() -> None:
    # Runs the `datasets` loading code itself in offline mode, past the early HF_HUB_OFFLINE check.
    script = (
        "from codeling.data.sources import _iter_hf_rows, parse_hf_spec\n"
        "from codeling.errors import CodelingError\n"
        "try:\n"
        "    spec = parse_hf_spec('bigcode/the-stack-smol')\n"
        "    rows = _iter_hf_rows('hf:bigcode/the-stack-smol', spec)\n"
        "    list(rows)\n"
        "except CodelingError as error:\n"
        "    print(error)\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=120
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout + result.stderr
    assert "cannot reach the Hugging Face Hub" in lines[0]
    for form in OFFLINE_FORMS:
        assert form in lines[0]


def test_source_name_is_filesystem_safe() -> None:
    specs = [
        "python-stdlib",
        "shell-scripts",
        "files:/data/**/*.py",
        "files:/data/**/*.sh",
        "jsonl:/tmp/a b/c.jsonl:content",
        "hf:bigcode/the-stack-smol:python,split=train,field=content",
    ]
    names = [source_name(spec) for spec in specs]
    assert names[:2] == ["python-stdlib", "shell-scripts"]
    for name in names:
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", name), name
        assert len(name) <= 60
    assert len(set(names)) == len(names)
    assert source_name("files:/data/**/*.py") == names[2]


def test_split_of_is_stable() -> None:
    # Fixed values: changing the hash scheme would move documents between train and val.
    assert split_of("hello", 0.2) == "val"
    assert split_of("hello", 0.1) == "train"
    assert split_of("print(1)\n", 0.5) == "train"
    assert split_of("anything", 0.0) == "train"


def test_split_fraction_is_close() -> None:
    documents = make_documents(4000)
    val_count = sum(split_of(document, 0.1) == "val" for document in documents)
    assert 300 < val_count < 500


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2.0])
def test_split_of_invalid_fraction_raises(fraction: float) -> None:
    with pytest.raises(CodelingError, match="val_fraction"):
        split_of("x", fraction)


def test_iter_unique_drops_duplicates_and_blanks() -> None:
    documents = ["a\n", "b\n", "a\n", "", "   \n\t", "c\n", "b\n", "a \n"]
    assert list(iter_unique(documents)) == ["a\n", "b\n", "c\n", "a \n"]


def test_load_documents_limits(tmp_path: Path) -> None:
    records = [
        {"text": "12345"},
        {"text": "12345"},
        {"text": "abcde"},
        {"text": "fghij"},
        {"text": "klmno"},
    ]
    path = write_jsonl(tmp_path / "docs.jsonl", records)
    assert load_documents(f"jsonl:{path}") == ["12345", "abcde", "fghij", "klmno"]
    assert load_documents(f"jsonl:{path}", max_documents=2) == ["12345", "abcde"]
    assert load_documents(f"jsonl:{path}", max_bytes=6) == ["12345", "abcde"]
    assert load_documents(f"jsonl:{path}", max_bytes=10) == ["12345", "abcde"]


# Shards


@pytest.fixture()
def jsonl_source(tmp_path: Path) -> tuple[str, list[str]]:
    documents = make_documents(300)
    records = [{"text": document} for document in documents] + [
        {"text": documents[0]},
        {"text": "  \n"},
    ]
    path = write_jsonl(tmp_path / "source.jsonl", records)
    return f"jsonl:{path}", documents


def split_documents_at_eos(tokens: np.ndarray, tokenizer: Tokenizer) -> list[str]:
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[start:end].tolist()) for start, end in zip(starts, ends)]


def test_prepare_writes_shards_and_manifest(
    small_tokenizer: Tokenizer, jsonl_source: tuple[str, list[str]], tmp_path: Path
) -> None:
    spec, documents = jsonl_source
    out_dir = tmp_path / "prepared"
    manifest = prepare_source(spec, small_tokenizer, out_dir, val_fraction=0.1)

    assert manifest == read_manifest(out_dir)
    assert manifest["source"] == spec
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer_fingerprint"] == small_tokenizer.fingerprint
    assert manifest["vocab_size"] == small_tokenizer.vocab_size
    assert manifest["eos_id"] == small_tokenizer.eos_id
    assert "created" in manifest
    expected = {
        split: [d for d in documents if split_of(d, 0.1) == split] for split in ("train", "val")
    }
    assert expected["val"], "the fixture should put some documents in val"

    for split in ("train", "val"):
        tokens = load_split(out_dir, split, small_tokenizer.fingerprint)
        counts = manifest["splits"][split]
        assert tokens.dtype == np.uint16
        assert isinstance(tokens, np.memmap)
        assert len(tokens) == counts["tokens"]
        assert (out_dir / f"{split}.bin").stat().st_size == 2 * counts["tokens"]
        assert counts["documents"] == len(expected[split])
        assert counts["bytes"] == sum(len(d.encode("utf-8")) for d in expected[split])
        assert tokens[-1] == small_tokenizer.eos_id
        assert split_documents_at_eos(np.asarray(tokens), small_tokenizer) == expected[split]

    val_lines = (out_dir / "val.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["text"] for line in val_lines] == expected["val"]
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "manifest.json",
        "train.bin",
        "val.bin",
        "val.jsonl",
    ]


def test_prepare_with_workers_matches(
    small_tokenizer: Tokenizer, jsonl_source: tuple[str, list[str]], tmp_path: Path
) -> None:
    spec, _ = jsonl_source
    prepare_source(spec, small_tokenizer, tmp_path / "serial", val_fraction=0.1)
    prepare_source(spec, small_tokenizer, tmp_path / "workers", val_fraction=0.1, num_workers=2)
    for name in ("train.bin", "val.bin", "val.jsonl"):
        assert (tmp_path / "serial" / name).read_bytes() == (
            tmp_path / "workers" / name
        ).read_bytes()


def test_prepare_limits_documents(
    small_tokenizer: Tokenizer, jsonl_source: tuple[str, list[str]], tmp_path: Path
) -> None:
    spec, _ = jsonl_source
    manifest = prepare_source(
        spec, small_tokenizer, tmp_path / "out", val_fraction=0.0, max_documents=10
    )
    assert manifest["splits"]["train"]["documents"] == 10
    assert manifest["splits"]["val"]["documents"] == 0
    assert len(load_split(tmp_path / "out", "val")) == 0


def test_prepare_empty_source_leaves_nothing(small_tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "blank.jsonl", [{"text": " "}, {"text": "\n"}])
    out_dir = tmp_path / "out"
    with pytest.raises(CodelingError, match="no non-empty documents"):
        prepare_source(f"jsonl:{path}", small_tokenizer, out_dir)
    assert list(out_dir.iterdir()) == []


def test_load_split_checks_fingerprint(
    small_tokenizer: Tokenizer, jsonl_source: tuple[str, list[str]], tmp_path: Path
) -> None:
    spec, _ = jsonl_source
    prepare_source(spec, small_tokenizer, tmp_path)
    with pytest.raises(CodelingError, match="another tokenizer") as caught:
        load_split(tmp_path, "train", "0" * 64)
    assert "codeling data prepare" in str(caught.value)


def test_load_split_without_manifest_raises(tmp_path: Path) -> None:
    with pytest.raises(CodelingError, match="codeling data prepare"):
        load_split(tmp_path, "train")


def test_load_split_detects_truncation(
    small_tokenizer: Tokenizer, jsonl_source: tuple[str, list[str]], tmp_path: Path
) -> None:
    spec, _ = jsonl_source
    prepare_source(spec, small_tokenizer, tmp_path)
    path = tmp_path / "train.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(CodelingError, match="manifest expects"):
        load_split(tmp_path, "train")


def test_load_split_unknown_split_raises(tmp_path: Path) -> None:
    with pytest.raises(CodelingError, match="unknown split"):
        load_split(tmp_path, "test")


def test_token_dtype_by_vocab_size() -> None:
    assert token_dtype(512) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


# Loader


def take(loader: PackedLoader, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(count)]


def assert_same_batches(
    first: list[tuple[torch.Tensor, torch.Tensor]], second: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    assert len(first) == len(second)
    for (x_first, y_first), (x_second, y_second) in zip(first, second):
        assert torch.equal(x_first, x_second)
        assert torch.equal(y_first, y_second)


def test_loader_shapes_and_shift() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = next(PackedLoader(tokens, batch_size=4, seq_len=16, seed=0))
    assert x.shape == (4, 16)
    assert y.shape == (4, 16)
    assert x.dtype == torch.int64
    assert y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.all(x[:, 0] % 16 == 0)


def test_loader_is_reproducible_from_seed() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    first = take(PackedLoader(tokens, batch_size=3, seq_len=8, seed=7), 5)
    second = take(PackedLoader(tokens, batch_size=3, seq_len=8, seed=7), 5)
    other = take(PackedLoader(tokens, batch_size=3, seq_len=8, seed=8), 5)
    assert_same_batches(first, second)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))


def test_loader_epoch_covers_each_window_once() -> None:
    seq_len = 10
    tokens = np.arange(1 + 12 * seq_len + 5, dtype=np.uint16)  # 12 windows and 5 spare tokens
    loader = PackedLoader(tokens, batch_size=4, seq_len=seq_len, seed=3)
    first_epoch = torch.cat([x[:, 0] for x, _ in take(loader, 3)]).tolist()
    assert sorted(first_epoch) == [window * seq_len for window in range(12)]
    assert loader.epochs == [0]
    next(loader)
    assert loader.epochs == [1]
    second_epoch = torch.cat([x[:, 0] for x, _ in take(loader, 2)]).tolist()
    assert len(second_epoch) == 8


def test_loader_resumes_exactly() -> None:
    sources = [np.arange(3000, dtype=np.uint16), np.arange(10_000, 12_000, dtype=np.uint16)]

    def make() -> PackedLoader:
        return PackedLoader(
            sources, batch_size=4, seq_len=32, seed=11, weights=[0.3, 0.7], names=["a", "b"]
        )

    uninterrupted = take(make(), 40)  # crosses several epochs of both sources
    interrupted = make()
    take(interrupted, 17)
    state = json.loads(json.dumps(interrupted.state_dict()))  # a checkpoint may store it as JSON
    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.steps == 17
    assert_same_batches(take(resumed, 23), uninterrupted[17:])


def test_loader_state_mismatch_raises() -> None:
    tokens = np.arange(3000, dtype=np.uint16)
    state = PackedLoader(tokens, batch_size=4, seq_len=32).state_dict()
    with pytest.raises(CodelingError, match="seq_len"):
        PackedLoader(tokens, batch_size=4, seq_len=16).load_state_dict(state)


def test_loader_ranks_are_disjoint() -> None:
    sources = [np.arange(4000, dtype=np.uint16), np.arange(20_000, 24_000, dtype=np.uint16)]
    settings = {"seq_len": 16, "seed": 5, "weights": [1.0, 2.0]}
    single = take(PackedLoader(sources, batch_size=6, **settings), 4)
    rank_batches = [
        take(PackedLoader(sources, batch_size=3, rank=rank, world_size=2, **settings), 4)
        for rank in range(2)
    ]
    for step in range(4):
        rank_0_x = rank_batches[0][step][0]
        rank_1_x = rank_batches[1][step][0]
        assert not set(rank_0_x[:, 0].tolist()) & set(rank_1_x[:, 0].tolist())
        assert torch.equal(torch.cat([rank_0_x, rank_1_x]), single[step][0])


def test_loader_mixture_follows_weights() -> None:
    low = np.zeros(5000, dtype=np.uint16)
    high = np.ones(5000, dtype=np.uint16)
    loader = PackedLoader([low, high], batch_size=50, seq_len=4, seed=0, weights=[1.0, 3.0])
    first_tokens = torch.cat([x[:, 0] for x, _ in take(loader, 20)])
    share_of_high = first_tokens.float().mean().item()
    assert 0.68 < share_of_high < 0.82

    only_low = PackedLoader([low, high], batch_size=50, seq_len=4, seed=0, weights=[1.0, 0.0])
    assert int(next(only_low)[0].sum()) == 0


def test_loader_short_source_raises() -> None:
    with pytest.raises(CodelingError, match="smaller seq_len") as caught:
        PackedLoader(
            [np.arange(100, dtype=np.uint16), np.arange(10, dtype=np.uint16)],
            2,
            64,
            names=["big", "tiny"],
        )
    assert "'tiny'" in str(caught.value)


def test_loader_bad_arguments_raise() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    with pytest.raises(CodelingError, match="rank"):
        PackedLoader(tokens, 2, 8, rank=2, world_size=2)
    with pytest.raises(CodelingError, match="weights"):
        PackedLoader([tokens, tokens], 2, 8, weights=[1.0])
    with pytest.raises(CodelingError, match="weights"):
        PackedLoader([tokens, tokens], 2, 8, weights=[0.0, 0.0])


def test_eval_batches_are_sequential() -> None:
    tokens = np.arange(1 + 10 * 8, dtype=np.uint16)  # 10 windows of 8
    batches = list(iter_eval_batches(tokens, batch_size=4, seq_len=8))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert starts == [window * 8 for window in range(10)]
    for x, y in batches:
        assert torch.equal(y, x + 1)
    assert len(list(iter_eval_batches(tokens, batch_size=4, seq_len=8, max_batches=2))) == 2
    assert_same_batches(batches, list(iter_eval_batches(tokens, batch_size=4, seq_len=8)))


def test_eval_batches_short_data_raises() -> None:
    with pytest.raises(CodelingError, match="fewer than seq_len"):
        iter_eval_batches(np.arange(5, dtype=np.uint16), batch_size=2, seq_len=8)


def test_loader_reads_prepared_split(
    small_tokenizer: Tokenizer, jsonl_source: tuple[str, list[str]], tmp_path: Path
) -> None:
    spec, _ = jsonl_source
    prepare_source(spec, small_tokenizer, tmp_path)
    tokens = load_split(tmp_path, "train", small_tokenizer.fingerprint)
    x, y = next(PackedLoader(tokens, batch_size=2, seq_len=64, seed=0, names=[spec]))
    assert x.shape == (2, 64)
    assert int(x.max()) < small_tokenizer.vocab_size
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_python_docs_is_english_prose():
    docs = load_documents("python-docs", max_documents=120)
    assert len(docs) == 120
    joined = " ".join(docs)
    assert "statement" in joined
    assert sum(text.count(" the ") for text in docs) > 500


def test_tinystories_offline_names_fallbacks(monkeypatch):
    from codeling.errors import SourceUnreachableError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceUnreachableError) as info:
        next(iter_documents("tinystories"))
    message = str(info.value)
    assert "python-docs" in message
    assert len(message.splitlines()) == 1


def test_own_validation_split_is_used(tmp_path, small_tokenizer):
    from codeling.data import sources as sources_module
    from codeling.data.shards import prepare_source, read_manifest

    train_file = tmp_path / "train.jsonl"
    val_file = tmp_path / "val.jsonl"
    train_file.write_text("".join(json.dumps({"text": f"train story {i}"}) + "\n"
                                  for i in range(30)))
    val_file.write_text("".join(json.dumps({"text": f"held-out story {i}"}) + "\n"
                                for i in range(7)))
    monkeypatched = {"stories": (f"jsonl:{train_file}", f"jsonl:{val_file}")}
    original = dict(sources_module.NAMED_HF_SOURCES)
    sources_module.NAMED_HF_SOURCES.update(monkeypatched)
    try:
        prepare_source("stories", small_tokenizer, tmp_path / "out", val_fraction=0.5)
    finally:
        sources_module.NAMED_HF_SOURCES.clear()
        sources_module.NAMED_HF_SOURCES.update(original)
    splits = read_manifest(tmp_path / "out")["splits"]
    assert splits["train"]["documents"] == 30
    assert splits["val"]["documents"] == 7
