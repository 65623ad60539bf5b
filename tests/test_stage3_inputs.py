"""Bad input to the stage 3 (function calling) commands: each must end in one clear error line.

Each test reproduces a bug found by trying the commands with bad input. They fail until the bug
is fixed. The docstring of each names the command that showed the bug and its output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import write_config

from codeling.cli import main
from codeling.config import ModelConfig
from codeling.data import chat_data
from codeling.errors import CodelingError
from codeling.models import lora
from codeling.models.decoder import CodeModel


def test_data_tools_out_below_file(tmp_path: Path, capsys):
    """`codeling data tools --out FILE/sub` raised FileExistsError with a traceback."""
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory\n")
    status = main(["data", "tools", "--out", str(blocker / "sub"), "--train-examples", "10",
                   "--val-examples", "2", "--test-examples", "2"])
    assert status == 2
    assert str(blocker) in capsys.readouterr().err
    assert blocker.read_text() == "not a directory\n"


def test_chat_source_not_utf8(tmp_path: Path):
    """A `chat:FILE` source with bytes that are not UTF-8 raised UnicodeDecodeError."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    with pytest.raises(CodelingError, match="latin1.jsonl"):
        chat_data.read_conversations(path)


def tiny_model() -> CodeModel:
    torch.manual_seed(0)
    return CodeModel(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                                 max_seq_len=32))


def test_lora_adapters_other_rank():
    """Resuming with another train.lora_rank raised a torch RuntimeError (size mismatch)."""
    saved = tiny_model()
    lora.apply_lora(saved, rank=4, alpha=8, targets=lora.DEFAULT_TARGETS)
    state = lora.adapter_state_dict(saved)
    resumed = tiny_model()
    lora.apply_lora(resumed, rank=8, alpha=8, targets=lora.DEFAULT_TARGETS)
    with pytest.raises(CodelingError, match="lora"):
        lora.load_adapter_state_dict(resumed, state)


def sft_config(run_dir: Path, data_file: Path, **train) -> dict:
    settings = dict(objective="sft", batch_size=4, seq_len=64, max_steps=2, warmup_steps=1,
                    eval_every=0, eval_batches=1, log_every=1, precision="fp32", lr=1e-3,
                    lora_rank=4, lora_alpha=16.0)
    settings.update(train)
    return {"name": "tiny", "run_dir": str(run_dir), "stage": "tools", "init_from": "code",
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
            "data": {"sources": [f"chat:{data_file}"], "val_fraction": 0.2},
            "train": settings}


def test_resume_other_lora_alpha(trained_run: Path, tmp_path: Path, capsys):
    """`codeling train --resume` with another train.lora_alpha was accepted silently.

    The saved adapters were trained at scale alpha / rank; loading them at another scale
    changes the model's weights at the first resumed step.
    """
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    data_file = tmp_path / "chats.jsonl"
    data_file.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"add {i} and 2"},
        {"role": "assistant", "content": f"{i + 2}"}]}) + "\n" for i in range(40)))
    config = write_config(tmp_path / "sft.yaml", sft_config(run_dir, data_file))
    assert main(["train", "--config", str(config)]) == 0
    capsys.readouterr()
    write_config(config, sft_config(run_dir, data_file, max_steps=4, lora_alpha=99.0))
    assert main(["train", "--config", str(config), "--resume"]) == 2
    assert "lora" in capsys.readouterr().err


def test_chat_transcript_is_directory(trained_run: Path, tmp_path: Path):
    """`codeling chat RUN --transcript DIR` ended in IsADirectoryError with a traceback."""
    folder = tmp_path / "transcripts"
    folder.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "codeling", "chat", str(trained_run), "--max-new-tokens", "2",
         "--transcript", str(folder)], input="hello\n", capture_output=True, text=True,
        timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "codeling: error:" in result.stderr
    assert str(folder) in result.stderr


def test_chat_unknown_tool_name(trained_run: Path, tmp_path: Path):
    """An unknown name in --tools is reported with the list of valid names."""
    result = subprocess.run(
        [sys.executable, "-m", "codeling", "chat", str(trained_run), "--tools",
         "list_files,cat"], input="hello\n", capture_output=True, text=True, timeout=120,
        cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "'cat' is not a builtin tool" in result.stderr
    assert "read_file" in result.stderr
