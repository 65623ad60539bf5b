"""The decoding engine and the OpenAI-compatible server, with a real model, tokenizer and client.

The server tests start uvicorn on 127.0.0.1 at a free port in a background thread and drive it
with the official `openai` client, and with httpx where a request must be malformed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import socket
import subprocess
import sys
import threading
import time

from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from codeling import chat
from codeling.config import ModelConfig, config_from_dict
from codeling.inference.engine import (BatchedDecoder, Engine, EngineOverloadedError,
                                       PromptTooLongError, SamplingParams, Sequence,
                                       SequentialDecoder)
from codeling.models.decoder import CodeModel
from codeling.serve.app import create_app
from codeling.serve.command import add_serve_parser
from codeling.training.checkpoint import save_checkpoint

MODEL_NAME = "tiny-test"
API_KEY = "test-key"
CONTEXT = 1024  # long enough that a request without max_tokens outlives a client disconnect
MAX_BODY_BYTES = 64 * 1024
CPU = torch.device("cpu")


def tiny_model(vocab_size: int, max_seq_len: int = CONTEXT, **overrides) -> CodeModel:
    torch.manual_seed(0)
    settings = dict(vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                    max_seq_len=max_seq_len)
    return CodeModel(ModelConfig(**{**settings, **overrides})).eval()


class ServerThread:
    """uvicorn serving an app on 127.0.0.1 at a free port, in a daemon thread."""

    def __init__(self, app):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start within 20 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()


@pytest.fixture(scope="module")
def engine(small_tokenizer):
    return Engine(tiny_model(small_tokenizer.vocab_size), small_tokenizer, CPU,
                  max_batch_size=8, max_queue=32)


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, MODEL_NAME, api_key=API_KEY, max_body_bytes=MAX_BODY_BYTES)
    with ServerThread(app) as running:
        yield running
    assert not engine.running  # the app's shutdown stopped the engine


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                       timeout=30) as opened:
        yield opened


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=30) as opened:
        yield opened


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- engine -------------------------------------------------------------------------------------

ARCHITECTURES = {
    "dense": {},
    "moe": {"arch": "moe", "n_experts": 4, "top_k": 2},
    "mamba": {"arch": "mamba", "ssm_head_dim": 16, "ssm_state": 16, "ssm_chunk": 8},
    "hybrid": {"arch": "hybrid", "n_layers": 4, "attn_period": 2, "attn_offset": 1,
               "ssm_head_dim": 16, "ssm_state": 16, "ssm_chunk": 8},
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_batched_decoder_matches_sequential(arch, small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=64, d_model=32, n_heads=2,
                       n_kv_heads=1, **ARCHITECTURES[arch])
    batched = BatchedDecoder(model, CPU, bf16=False, max_batch_size=4)
    sequential = SequentialDecoder(model, CPU, bf16=False)
    prompts = [[40, 100, 200], list(range(20, 31)), [300, 17, 42, 9, 77, 180]]

    def start(decoder):
        sequences = [Sequence(None, index, prompt, SamplingParams(), 20, None)
                     for index, prompt in enumerate(prompts)]
        logits = torch.stack([decoder.prefill(sequence) for sequence in sequences])
        return sequences, logits

    rows, batched_logits = start(batched)
    singles, sequential_logits = start(sequential)
    torch.testing.assert_close(batched_logits, sequential_logits, atol=1e-4, rtol=1e-4)
    for step in range(6):
        next_ids = sequential_logits.argmax(-1).tolist()
        for row, single, token in zip(rows, singles, next_ids):
            row.last_token = single.last_token = token
        if step == 3:  # the middle sequence leaves; the last row moves into its slot
            batched.release(rows.pop(1))
            sequential.release(singles.pop(1))
        batched_logits = batched.decode(rows)
        sequential_logits = sequential.decode(singles)
        torch.testing.assert_close(batched_logits, sequential_logits, atol=1e-4, rtol=1e-4,
                                   msg=f"{arch}: step {step} differs")
    assert [row.position for row in rows] == [single.position for single in singles]


def test_engine_batched_equals_sequential_text(small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=128)
    prompts = [small_tokenizer.encode(text) for text in ("def f(x):", "import os\n", "#")]
    params = [SamplingParams(max_tokens=12, temperature=0),
              SamplingParams(max_tokens=10, temperature=1.0, seed=5, n=2),
              SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, seed=9, stop=("e",))]
    outputs = {}
    for decoder in ("batched", "sequential"):
        with Engine(model, small_tokenizer, CPU, max_batch_size=4, decoder=decoder) as engine:
            handles = [engine.submit(prompt, param) for prompt, param in zip(prompts, params)]
            outputs[decoder] = [handle.collect(timeout=30) for handle in handles]
            assert engine.stats.peak_active >= 2
    for batched, sequential in zip(outputs["batched"], outputs["sequential"]):
        assert batched.texts == sequential.texts
        assert batched.finish_reasons == sequential.finish_reasons
        assert batched.completion_tokens == sequential.completion_tokens
    assert outputs["batched"][2].texts[0].find("e") == -1  # cut before the stop string


def test_engine_queue_full_and_cancel(small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=512)
    with Engine(model, small_tokenizer, CPU, max_batch_size=1, max_queue=1) as engine:
        params = SamplingParams(max_tokens=500, temperature=0)
        first = engine.submit([1, 50, 60], params)
        second = engine.submit([1, 70, 80], params)
        with pytest.raises(EngineOverloadedError, match="max queue 1"):
            engine.submit([1, 90], params)
        with pytest.raises(PromptTooLongError, match="context length is 512"):
            engine.submit(list(range(20, 532)), params)
        first.cancel()
        second.cancel()
        assert wait_until(lambda: first.finished, 10)
        assert wait_until(lambda: second.finished, 10)
        assert engine.active_count == 0
        assert engine.waiting_count == 0
        assert first.collect(timeout=5).finish_reasons == ["cancelled"]


# -- server: successful requests ----------------------------------------------------------------

CHAT = [{"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Write a function that adds two numbers."}]


def test_health_and_models(server, client):
    health = httpx.get(f"{server.url}/health")  # no API key needed
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert health.json()["model"] == MODEL_NAME
    assert [model.id for model in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_chat_completion_fields(client, small_tokenizer):
    response = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8,
                                              temperature=0)
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert response.model == MODEL_NAME
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == len(chat.render(CHAT, small_tokenizer))
    assert 1 <= response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == (response.usage.prompt_tokens
                                           + response.usage.completion_tokens)


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 7)])
def test_chat_stream_matches_non_stream(client, temperature, seed):
    request = dict(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=temperature,
                   seed=seed)
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    reasons = [chunk.choices[0].finish_reason for chunk in chunks
               if chunk.choices and chunk.choices[0].finish_reason]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_stream_ends_with_done(http):
    body = {"model": MODEL_NAME, "prompt": "x = ", "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def test_completions_and_stream(client, small_tokenizer):
    prompt = "def fib(n):"
    request = dict(model=MODEL_NAME, prompt=prompt, max_tokens=10, temperature=0)
    whole = client.completions.create(**request)
    streamed = "".join(chunk.choices[0].text
                       for chunk in client.completions.create(**request, stream=True)
                       if chunk.choices)
    assert whole.object == "text_completion"
    assert whole.usage.prompt_tokens == len(small_tokenizer.encode(prompt))
    assert streamed == whole.choices[0].text
    default = client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0)
    assert default.usage.completion_tokens <= 16  # OpenAI's default max_tokens


def test_max_tokens_finishes_with_length(client):
    response = client.completions.create(model=MODEL_NAME, prompt="class A:", max_tokens=3,
                                         temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_n_two_choices(client):
    request = dict(model=MODEL_NAME, messages=CHAT, n=2, max_tokens=6, temperature=1.0, seed=3)
    whole = client.chat.completions.create(**request)
    assert sorted(choice.index for choice in whole.choices) == [0, 1]
    assert 2 <= whole.usage.completion_tokens <= 12
    streamed = {0: "", 1: ""}
    finished = []
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.append(choice.index)
    assert sorted(finished) == [0, 1]
    assert streamed == {choice.index: choice.message.content for choice in whole.choices}


def test_stop_string_cuts_text(client):
    request = dict(model=MODEL_NAME, prompt="import os\n", max_tokens=24, temperature=0)
    base = client.completions.create(**request).choices[0].text
    assert len(base) >= 6, f"the test needs a longer greedy completion, got {base!r}"
    stop = base[3:5]
    expected = base[:base.find(stop)]
    cut = client.completions.create(**request, stop=stop)
    streamed = "".join(chunk.choices[0].text
                       for chunk in client.completions.create(**request, stop=[stop],
                                                              stream=True)
                       if chunk.choices)
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    assert streamed == expected


# -- server: errors -----------------------------------------------------------------------------


def chat_body(**fields):
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], **fields}


def completion_body(**fields):
    return {"model": MODEL_NAME, "prompt": "def", **fields}


# (case, path, body: dict or raw bytes, status, param, code)
ERROR_CASES = [
    ("malformed json", "/v1/chat/completions", b'{"model": ', 400, None, None),
    ("body not an object", "/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("temperature wrong type", "/v1/chat/completions", chat_body(temperature="hot"), 400,
     "temperature", "invalid_value"),
    ("temperature out of range", "/v1/chat/completions", chat_body(temperature=3), 400,
     "temperature", "invalid_value"),
    ("n wrong type", "/v1/completions", completion_body(n="2"), 400, "n", "invalid_value"),
    ("messages missing", "/v1/chat/completions", {"model": MODEL_NAME}, 400, "messages",
     "missing_required_parameter"),
    ("max_tokens zero", "/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens",
     "invalid_value"),
    ("max_tokens negative", "/v1/completions", completion_body(max_tokens=-1), 400,
     "max_tokens", "invalid_value"),
    ("unknown model", "/v1/chat/completions", chat_body(model="gpt-9"), 404, "model",
     "model_not_found"),
    ("prompt over context", "/v1/completions", completion_body(prompt="x " * 3000), 400,
     "prompt", "context_length_exceeded"),
    ("chat over context", "/v1/chat/completions",
     chat_body(messages=[{"role": "user", "content": "x " * 3000}]), 400, "messages",
     "context_length_exceeded"),
    ("tool without a name", "/v1/chat/completions",
     chat_body(tools=[{"type": "function", "function": {"description": "f"}}]), 400,
     "tools[0]", "invalid_value"),
    ("tool_choice required", "/v1/chat/completions",
     chat_body(tools=[{"type": "function", "function": {"name": "f"}}],
               tool_choice="required"), 400, "tool_choice", "unsupported_parameter"),
    ("functions", "/v1/chat/completions", chat_body(functions=[{"name": "f"}]), 400,
     "functions", "unsupported_parameter"),
    ("tool call arguments not JSON", "/v1/chat/completions",
     chat_body(messages=[{"role": "assistant", "content": None, "tool_calls": [
         {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]),
     400, "messages[0].tool_calls[0].function.arguments", "invalid_value"),
    ("unknown role", "/v1/chat/completions",
     chat_body(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role",
     "invalid_value"),
    ("n too large", "/v1/chat/completions", chat_body(n=100), 400, "n", "invalid_value"),
    ("seed too large", "/v1/completions", completion_body(seed=2**64), 400, "seed",
     "invalid_value"),
    ("too many stop strings", "/v1/completions", completion_body(stop=list("abcde")), 400,
     "stop", "invalid_value"),
    ("body too large", "/v1/completions", completion_body(prompt="a" * MAX_BODY_BYTES), 413,
     None, "request_too_large"),
]


@pytest.mark.parametrize("case, path, body, status, param, code", ERROR_CASES,
                         ids=[case[0] for case in ERROR_CASES])
def test_error_response_shape(http, case, path, body, status, param, code):
    if isinstance(body, bytes):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    error = response.json()["error"]
    assert response.status_code == status, error
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["code"] == code
    assert error["message"]
    assert "Traceback" not in response.text
    assert response.headers["x-request-id"].startswith("req_")


def test_unknown_route_is_openai_shaped(http):
    response = http.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


def test_api_key_required(server):
    missing = httpx.get(f"{server.url}/v1/models")
    wrong = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="gpt-9"):
        client.chat.completions.create(model="gpt-9", messages=CHAT)


# -- server: disconnects and load ---------------------------------------------------------------


def test_disconnect_mid_stream_frees_slot(http, engine):
    cancelled_before = engine.stats.cancelled_sequences
    # No max_tokens: greedy decoding runs to the end of the 1024-token context unless cancelled.
    body = chat_body(temperature=0, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                break  # leaving the block closes the connection mid-stream
    assert wait_until(lambda: engine.stats.cancelled_sequences > cancelled_before, 10), \
        "the server did not cancel the stream of a disconnected client"
    assert wait_until(lambda: engine.active_count == 0, 5)


def test_disconnect_while_waiting_frees_slot(server, engine):
    cancelled_before = engine.stats.cancelled_sequences
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/chat/completions", json=chat_body(temperature=0),
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(30, read=0.2))
    assert wait_until(lambda: engine.stats.cancelled_sequences > cancelled_before, 10), \
        "the server did not cancel the request of a disconnected client"
    assert time.monotonic() - started < 5
    assert wait_until(lambda: engine.active_count == 0, 5)


def test_model_failure_gives_server_error(small_tokenizer):
    class FailingDecoder(SequentialDecoder):
        def decode(self, sequences):
            raise RuntimeError("simulated device failure")

    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=128)
    engine = Engine(model, small_tokenizer, CPU, decoder="sequential")
    engine.decoder = FailingDecoder(model, CPU, bf16=False)
    with ServerThread(create_app(engine, MODEL_NAME)) as running:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            whole = http.post("/v1/completions", json=completion_body(max_tokens=5))
            streamed = http.post("/v1/completions",
                                 json=completion_body(max_tokens=5, stream=True))
    assert whole.status_code == 500
    assert whole.json()["error"]["type"] == "server_error"
    assert whole.headers["x-request-id"] in whole.json()["error"]["message"]
    assert "simulated" not in whole.text  # the cause stays in the server log
    assert streamed.status_code == 200
    events = [line for line in streamed.text.splitlines() if line]
    assert '"server_error"' in events[-2]
    assert events[-1] == "data: [DONE]"
    assert engine.stats.failed_sequences == 2


def test_concurrent_requests_all_succeed(server, engine):
    async def send_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY,
                                      max_retries=0, timeout=60) as client:
            requests = [client.completions.create(model=MODEL_NAME, prompt=f"def f{i}(x):",
                                                  max_tokens=8, temperature=1.0, seed=i)
                        for i in range(16)]
            return await asyncio.gather(*requests)

    start = time.monotonic()
    responses = asyncio.run(asyncio.wait_for(send_all(), timeout=60))
    elapsed = time.monotonic() - start
    assert len(responses) == 16
    assert all(1 <= response.usage.completion_tokens <= 8 for response in responses)
    assert elapsed < 30, f"16 requests of 8 tokens took {elapsed:.1f} s"
    assert wait_until(lambda: engine.active_count == 0, 5)


def test_overloaded_server_returns_503(small_tokenizer):
    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=512)
    engine = Engine(model, small_tokenizer, CPU, max_batch_size=1, max_queue=0)
    with ServerThread(create_app(engine, MODEL_NAME)) as running:
        long_request = completion_body(max_tokens=500, temperature=0, stream=True)
        with httpx.Client(base_url=running.url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=long_request) as first:
                assert first.status_code == 200
                assert wait_until(lambda: engine.active_count == 1, 5)
                second = http.post("/v1/completions", json=completion_body(max_tokens=2))
        assert second.status_code == 503
        assert second.json()["error"]["code"] == "server_overloaded"


# -- the serve command --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_tokenizer):
    """A run directory with one checkpoint of a tiny random model."""
    base = tmp_path_factory.mktemp("serve-run")
    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=64, d_model=32, n_heads=2,
                       n_kv_heads=1)
    config = config_from_dict({"model": dataclasses.asdict(model.config),
                               "train": {"seq_len": 64}})
    tokenizer_dir = small_tokenizer.save(base / "tokenizer")
    save_checkpoint(base / "run" / "code", 1, model, config, {}, tokenizer_dir,
                    small_tokenizer.fingerprint)
    return base / "run"


def parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="codeling")
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_serve_parser_defaults(run_dir):
    args = parse_serve([str(run_dir)])
    assert args.host == "127.0.0.1"
    assert args.port == 8000
    assert args.api_key is None
    assert args.model_name is None
    assert args.max_batch_size == 16


def test_engine_from_checkpoint_generates(run_dir, small_tokenizer):
    with Engine.from_checkpoint(run_dir, device="cpu", max_batch_size=2) as engine:
        output = engine.generate(small_tokenizer.encode("def"),
                                 SamplingParams(max_tokens=4, temperature=0), timeout=30)
    assert output.finish_reasons in (["length"], ["stop"])
    assert 1 <= output.completion_tokens <= 4


def test_run_serve_subprocess(run_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = ("import logging, sys; from test_serve import parse_serve; "
              "logging.basicConfig(level=logging.INFO); "
              "from codeling.serve.command import run_serve; "
              "sys.exit(run_serve(parse_serve(sys.argv[1:])))")
    command = [sys.executable, "-c", script, str(run_dir), "--port", str(port),
               "--api-key", API_KEY, "--model-name", "served", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=Path(__file__).parent, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=1).status_code == 200
            except httpx.TransportError:
                return process.poll() is not None  # stop waiting if the server died
        assert wait_until(healthy, 60)
        assert process.poll() is None, process.stdout.read()
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert [model["id"] for model in models.json()["data"]] == ["served"]
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    # uvicorn (0.55) shuts down gracefully on SIGTERM, then raises the signal again to exit.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "engine stopped" in output
