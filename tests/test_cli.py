"""End-to-end: `codeling train`, `--resume`, `generate`, and bad input through the command line.

A tiny run on a few standard-library modules is trained once per session and shared.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from codeling.cli import main
from runs import STDLIB, snapshot, tiny_run_config, write_config



def test_train_writes_run_layout(trained_run):
    assert (trained_run / "config.yaml").is_file()
    assert (trained_run / "tokenizer" / "tokenizer.json").is_file()
    latest = (trained_run / "code" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step-000006"
    checkpoint = trained_run / "code" / "checkpoints" / latest
    for name in ("model.safetensors", "config.json", "trainer_state.pt", "tokenizer.json",
                 "meta.json"):
        assert (checkpoint / name).is_file(), name
    assert (trained_run / "code" / "loss.png").stat().st_size > 1000
    saved = json.loads((checkpoint / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 512
    assert saved["train"]["max_steps"] == 6


def test_metrics_have_every_field(trained_run):
    records = [json.loads(line) for line in
               (trained_run / "code" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for field in ("lr", "grad_norm", "tokens_per_s", "mfu", "elapsed", "tokens"):
        assert field in steps[0], field
    evals = [r for r in records if "val_loss" in r]
    assert {r["split"] for r in evals} == {"files-json", "files-email"} or len(evals) >= 2


def test_rerun_without_resume_is_rejected(trained_run, capsys):
    before = snapshot(trained_run)
    config = write_config(trained_run.parent / "again.yaml", tiny_run_config(trained_run))
    assert main(["train", "--config", str(config)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert snapshot(trained_run) == before


def test_generate_streams_completion(trained_run, capsys):
    code = main(["generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "12",
                 "--seed", "3"])
    assert code == 0
    first = capsys.readouterr().out
    assert first.startswith("def ")
    assert main(["generate", str(trained_run), "--prompt", "def ", "--max-new-tokens", "12",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("change, expected", [
    ({"train": {"learning_rate": 0.1}}, "train.learning_rate: unknown key"),
    ({"train": {"batch_size": "many"}}, "train.batch_size: expected an integer, got 'many'"),
    ({"train": {"lr": -0.001}}, "train.lr: -0.001 must be greater than 0"),
    ({"data": {"sources": ["files:/no/such/dir/*.py"]}}, "/no/such/dir/*.py"),
])
def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, change, expected):
    config = tiny_run_config(tmp_path / "run")
    for section, values in change.items():
        config[section].update(values)
    path = write_config(tmp_path / "bad.yaml", config)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_truncated_checkpoint_is_reported(trained_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    latest = copy / "code" / "checkpoints" / "step-000006"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(copy)
    assert main(["generate", str(copy), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.safetensors" in err
    assert "truncated or corrupt" in err
    assert len(err.splitlines()) == 1
    config = write_config(tmp_path / "resume.yaml", tiny_run_config(copy, max_steps=9))
    assert main(["train", "--config", str(config), "--resume"]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert snapshot(copy) == before


def test_other_tokenizer_is_rejected(trained_run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    other_config = write_config(tmp_path / "other.yaml", {
        **tiny_run_config(tmp_path / "other"),
        "tokenizer": {"vocab_size": 600, "max_bytes_per_source": 100_000}})
    assert main(["train", "--config", str(other_config), "--set", "train.max_steps=1"]) == 0
    shutil.copy(tmp_path / "other" / "tokenizer" / "tokenizer.json",
                copy / "tokenizer" / "tokenizer.json")
    before = snapshot(copy)
    config = write_config(tmp_path / "resume.yaml", tiny_run_config(copy, max_steps=9))
    assert main(["train", "--config", str(config), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "another tokenizer" in err
    assert len(err.splitlines()) == 1
    assert snapshot(copy) == before

    checkpoint = copy / "code" / "checkpoints" / "step-000006"
    shutil.copy(tmp_path / "other" / "tokenizer" / "tokenizer.json", checkpoint / "tokenizer.json")
    assert main(["generate", str(checkpoint), "--prompt", "x"]) == 2
    assert "another tokenizer" in capsys.readouterr().err


def test_resume_continues_to_new_budget(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    config = write_config(tmp_path / "resume.yaml", tiny_run_config(copy, max_steps=8))
    assert main(["train", "--config", str(config), "--resume"]) == 0
    assert (copy / "code" / "checkpoints" / "latest").read_text().strip() == "step-000008"
    steps = [json.loads(line)["step"] for line in
             (copy / "code" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_subprocess_exit_status_and_one_line(tmp_path):
    bad = write_config(tmp_path / "bad.yaml", {"train": {"lr": -1, "colour": 3}})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-m", "codeling", "train", "--config", str(bad)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "2 problems" in lines[0]
    assert "Traceback" not in result.stderr


def test_every_option_has_help():
    from codeling.cli import build_parser

    parser = build_parser()
    stack = [parser]
    while stack:
        current = stack.pop()
        for action in current._actions:
            if action.dest == "help":
                continue
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                stack.extend(action.choices.values())
                continue
            assert action.help, f"{current.prog}: {action.dest} has no help"


def test_sigterm_checkpoints_then_resume_finishes(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "long.yaml", tiny_run_config(
        run_dir, max_steps=100000, checkpoint_every=0, eval_every=0))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    process = subprocess.Popen([sys.executable, "-m", "codeling", "train", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    metrics = run_dir / "code" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()
    latest = (run_dir / "code" / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.split("-")[1])
    assert stopped_at >= 3
    assert b"--resume" in stderr

    resumed = write_config(tmp_path / "resume.yaml", tiny_run_config(
        run_dir, max_steps=stopped_at + 2, checkpoint_every=0, eval_every=0))
    assert main(["train", "--config", str(resumed), "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, stopped_at + 3))


@pytest.mark.parametrize("arch", ["mamba", "moe", "hybrid"])
def test_train_resume_generate_each_arch(tmp_path, capsys, arch):
    config = tiny_run_config(tmp_path / "run", max_steps=4, checkpoint_every=2, eval_every=2)
    config["model"].update({"arch": arch, "ssm_state": 16, "ssm_head_dim": 16, "ssm_chunk": 16,
                            "n_experts": 4, "attn_period": 2, "attn_offset": 1})
    path = write_config(tmp_path / "run.yaml", config)
    assert main(["train", "--config", str(path)]) == 0
    assert main(["train", "--config", str(path), "--set", "train.max_steps=6", "--resume"]) == 0
    latest = tmp_path / "run" / "code" / "checkpoints" / "latest"
    assert latest.read_text().strip() == "step-000006"
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "run"), "--prompt", "import ",
                 "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    if arch == "moe":
        records = [json.loads(line) for line in
                   (tmp_path / "run" / "code" / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in records if "expert_load" in r]
        assert logged
        assert len(logged[0]["expert_load"]) == 2
