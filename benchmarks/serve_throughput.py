"""Serving throughput and latency of codeling's OpenAI-compatible server.

Starts the server in a subprocess on 127.0.0.1 at a free port, with the dense-tiny preset, random
weights and a 4096-token tokenizer trained on the Python standard library. Then, for each
concurrency level C, C clients stream chat completions back to back until the level's requests
are done. Prints a markdown table: output tokens per second over the level's wall time, time to
first token, and total request time.

    python benchmarks/serve_throughput.py
    python benchmarks/serve_throughput.py --decoder sequential   # one forward call per sequence
    python benchmarks/serve_throughput.py --streams 1 4 16 --max-tokens 64 --requests-per-stream 4

Server and clients share the machine's CPU cores, so on a small machine the client's own work
lowers the numbers somewhat. Random weights sample eos about once per vocabulary size tokens,
so a few completions end before max_tokens; tokens/s counts the tokens actually generated.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from codeling.config import config_from_dict

PROMPT = ("Write a Python function that parses a CSV file into a list of dictionaries, "
          "one per row, and skips empty lines.")
SERVER_START_TIMEOUT_S = 120
REQUEST_TIMEOUT_S = 300


def serve(args: argparse.Namespace) -> None:
    """Run the server in this process until it is terminated (the --serve mode)."""
    import uvicorn

    from codeling.inference.engine import Engine
    from codeling.models.decoder import CodeModel
    from codeling.serve.app import create_app
    from codeling.tokenizer import Tokenizer
    from codeling.training.device import resolve_device

    tokenizer = Tokenizer.load(args.tokenizer)
    config = dataclasses.replace(config_from_dict({"model": args.preset}).model,
                                 vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    model = CodeModel(config).to(device)
    engine = Engine(model, tokenizer, device, bf16=device.type == "cuda",
                    max_batch_size=args.max_batch_size, decoder=args.decoder)
    uvicorn.run(create_app(engine, "bench"), host="127.0.0.1", port=args.port,
                log_level="warning")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_tokenizer(directory: Path) -> None:
    from codeling.data.sources import load_documents
    from codeling.tokenizer import train_tokenizer as train

    train(load_documents("python-stdlib", max_bytes=2_000_000), vocab_size=4096).save(directory)


def wait_for_server(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not respond to /health within {SERVER_START_TIMEOUT_S} s")


async def stream_one(client: httpx.AsyncClient, max_tokens: int, seed: int) -> dict[str, float]:
    """Stream one chat completion; return its latencies in seconds and its token count."""
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first_token = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(f"the server sent an error: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if first_token is None and any(c["delta"].get("content") or c["finish_reason"]
                                           for c in choices):
                first_token = time.perf_counter() - start
    total = time.perf_counter() - start
    return {"ttft": first_token if first_token is not None else total, "total": total,
            "tokens": tokens}


async def run_level(url: str, streams: int, requests_per_stream: int,
                    max_tokens: int) -> dict[str, float]:
    """Run `streams` clients, each sending `requests_per_stream` requests one after another."""
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S,
                                 limits=httpx.Limits(max_connections=streams)) as client:
        async def worker(index: int) -> list[dict[str, float]]:
            return [await stream_one(client, max_tokens, seed=index * 1000 + number)
                    for number in range(requests_per_stream)]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(index) for index in range(streams)))
        wall = time.perf_counter() - start
    requests = [result for per_stream in results for result in per_stream]
    tokens = sum(result["tokens"] for result in requests)
    ttft = [result["ttft"] for result in requests]
    total = [result["total"] for result in requests]
    return {"streams": streams, "requests": len(requests), "tokens": tokens, "wall": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttft),
            "ttft_p90": percentile(ttft, 0.9), "total_p50": statistics.median(total),
            "total_p90": percentile(total, 0.9)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(fraction * len(ordered)), len(ordered) - 1)]


def print_table(rows: list[dict[str, float]], args: argparse.Namespace) -> None:
    print(f"\n{args.preset}, random weights, {args.decoder} decoder, max batch size "
          f"{args.max_batch_size}, {args.max_tokens} max tokens per request, device "
          f"{args.device}; {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, torch {torch.__version__}\n")
    print("| streams | requests | output tokens | wall s | tokens/s | TTFT p50 ms | TTFT p90 ms "
          "| total p50 s | total p90 s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['streams']} | {row['requests']} | {row['tokens']} | {row['wall']:.1f} "
              f"| {row['tokens_per_s']:.0f} | {row['ttft_p50'] * 1000:.0f} "
              f"| {row['ttft_p90'] * 1000:.0f} | {row['total_p50']:.2f} "
              f"| {row['total_p90']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16],
                        help="concurrency levels, in simultaneous streams (default: 1 4 16)")
    parser.add_argument("--requests-per-stream", type=int, default=4,
                        help="requests each stream sends one after another (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="max_tokens of every request, in tokens (default: 64)")
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="the server's max batch size, in sequences (default: 16)")
    parser.add_argument("--decoder", default="auto", choices=["auto", "batched", "sequential"],
                        help="the engine's decoder (default: auto, which is batched)")
    parser.add_argument("--preset", default="dense-tiny", help="model preset (default: dense-tiny)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return

    with tempfile.TemporaryDirectory(prefix="codeling-bench-") as scratch:
        tokenizer_dir = Path(scratch) / "tokenizer"
        train_tokenizer(tokenizer_dir)
        port = free_port()
        command = [sys.executable, __file__, "--serve", "--port", str(port), "--tokenizer",
                   str(tokenizer_dir), "--preset", args.preset, "--device", args.device,
                   "--decoder", args.decoder, "--max-batch-size", str(args.max_batch_size)]
        server = subprocess.Popen(command)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_server(url, server)
            asyncio.run(run_level(url, 1, 1, 8))  # warm-up, not reported
            rows = [asyncio.run(run_level(url, streams, args.requests_per_stream,
                                          args.max_tokens))
                    for streams in args.streams]
        finally:
            server.terminate()
            server.wait(timeout=30)
    print_table(rows, args)


if __name__ == "__main__":
    main()
