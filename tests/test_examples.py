"""Every program in examples/ runs to completion on tiny settings."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def run_example(*args: str, timeout: float = 300) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def example_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("examples") / "run"
    out = run_example("examples/custom_dataset.py", str(run_dir))
    assert "trained 20 steps" in out
    return run_dir


def test_custom_dataset_example(example_run):
    assert (example_run / "code" / "checkpoints" / "latest").read_text().strip() == "step-000020"
    assert (example_run / "documents.jsonl").stat().st_size > 10_000


def test_generate_example(example_run):
    out = run_example("examples/generate.py", str(example_run), "import json\n")
    assert out.startswith("import json\n")
    assert "new tokens]" in out


def test_compare_architectures_example():
    out = run_example("examples/compare_architectures.py")
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["dense", "mamba", "moe", "hybrid"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_openai_client_example(example_run):
    pytest.importorskip("openai")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "codeling", "serve", str(example_run),
                               "--port", str(port)], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                time.sleep(0.3)
        run_example("examples/openai_client.py", f"http://127.0.0.1:{port}/v1", timeout=120)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_chat_with_tools_example(tmp_path, small_tokenizer):
    """A tiny model fitted to call list_files runs the example's whole loop for real."""
    import json as json_module

    import torch

    from codeling import chat
    from codeling.config import ModelConfig, RunConfig
    from codeling.data import chat_data
    from codeling.models.decoder import CodeModel
    from codeling.tools import ToolBox
    from codeling.training import checkpoint as ckpt

    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "hello.py").write_text('print("hello from the sandbox")\n')
    toolbox = ToolBox(workdir)
    question = "Which files are in this folder?"
    call = {"type": "function", "function": {"name": "list_files", "arguments": {"path": "."}}}
    conversation = {"tools": toolbox.specs, "messages": [
        {"role": "system", "content": "You are a coding assistant with tools."},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": toolbox.execute(call)},
        {"role": "assistant", "content": "There is one file: hello.py."}]}
    ids = chat.render(conversation["messages"], small_tokenizer, toolbox.specs,
                      add_generation_prompt=False)
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, d_model=64, n_layers=2,
                         n_heads=4, max_seq_len=len(ids) + 256)
    torch.manual_seed(0)
    model = CodeModel(config)
    examples = chat_data.tokenize_conversations([conversation], small_tokenizer, 10_000, "fit")
    inputs, targets = chat_data.examples_to_batch(examples, 10_000, small_tokenizer.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                                 targets.view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.005:
            break
    tokenizer_dir = tmp_path / "tokenizer"
    small_tokenizer.save(tokenizer_dir)
    run_config = RunConfig(name="fitted", run_dir=str(tmp_path / "run"), stage="tools",
                           model=config)
    ckpt.save_checkpoint(tmp_path / "run" / "tools", 1, model, run_config, {}, tokenizer_dir,
                         small_tokenizer.fingerprint)

    out = run_example("examples/chat_with_tools.py", str(tmp_path / "run"), question)
    assert f"user: {question}" in out
    assert 'tool call: list_files({"path": "."})' in out
    assert "tool result: " in out and "hello.py" in out.split("tool result: ")[1]
    assert "assistant: There is one file: hello.py." in out
    assert json_module.loads(toolbox.execute(call))  # the real tool's result is JSON
