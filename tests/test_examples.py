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
