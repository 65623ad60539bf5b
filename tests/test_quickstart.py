"""`codeling quickstart` end to end on a small slice of the real sources, within a short budget."""

from __future__ import annotations

import json

import yaml

from codeling.cli import main
from codeling.stages.quickstart import gzip_bits_per_byte


def test_quickstart_runs_to_completion(tmp_path, capsys):
    run_dir = tmp_path / "quickstart"
    code = main(["quickstart", "--minutes", "0.75", "--run-dir", str(run_dir), "--compile", "off",
                 "--set", "data.max_documents=150", "--set", "tokenizer.vocab_size=1024",
                 "--set", "tokenizer.max_bytes_per_source=300000", "--set", "model.n_layers=2",
                 "--set", "train.batch_size=4", "--set", "train.seq_len=64",
                 "--set", "train.eval_every=20"])
    assert code == 0
    out = capsys.readouterr().out
    assert "=== quickstart results ===" in out
    assert "bits/byte" in out
    assert "gzip -9" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] > 0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert 0 < config["train"]["max_minutes"] < 0.75  # training gets what stage 0 and data left
    assert set(summary["val"]) == {"python-stdlib", "shell-scripts"}
    python = summary["val"]["python-stdlib"]
    assert 0 < python["bits_per_byte"] < 8
    samples = (run_dir / "samples.md").read_text()
    assert samples.count("## Sample") == 5
    assert "def fibonacci(n):" in samples
    assert (run_dir / "quickstart" / "loss.png").is_file()


def test_quickstart_refuses_existing_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine")
    assert main(["quickstart", "--run-dir", str(run_dir)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (run_dir / "keep.txt").read_text() == "mine"


def test_gzip_baseline():
    repetitive = ["abc " * 1000]
    assert gzip_bits_per_byte(repetitive) < 0.2
    assert gzip_bits_per_byte([bytes(range(256)).decode("latin-1")]) > 7


def test_quickstart_hybrid_arch(tmp_path, capsys):
    run_dir = tmp_path / "hybrid"
    code = main(["quickstart", "--arch", "hybrid", "--minutes", "0.6", "--run-dir", str(run_dir),
                 "--compile", "off", "--set", "data.max_documents=100",
                 "--set", "tokenizer.vocab_size=1024",
                 "--set", "tokenizer.max_bytes_per_source=200000", "--set", "train.batch_size=4",
                 "--set", "train.seq_len=64"])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] > 0
    config = (run_dir / "config.yaml").read_text()
    assert "arch: hybrid" in config
    assert "samples.md" in summary["samples"]
