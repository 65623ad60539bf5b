"""Training throughput of codeling's dense model beside transformers' LlamaForCausalLM.

Both models get the same shape, the same weights, the same batch and the same bf16 autocast, and
run the same number of AdamW steps, interleaved in rounds in one process so that machine noise
hits both alike. Reports tokens/s, MFU against the measured bf16 matmul peak, and the ratio.

    python benchmarks/train_throughput.py                    # dense-tiny preset, eager
    python benchmarks/train_throughput.py --compile          # also codeling with torch.compile
    python benchmarks/train_throughput.py --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from codeling.config import load_config
from codeling.models.decoder import CodeModel
from codeling.training.device import autocast, cpu_supports_bf16, measure_matmul_peak
from codeling.training.optim import parameter_groups

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_llama_parity import to_llama  # noqa: E402  (shared weight renaming)


def make_loss(forward, bf16: bool):
    """Return loss(inputs, targets): bf16-autocast forward, then fp32 cross-entropy."""

    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast(torch.device("cpu"), bf16):
            logits = forward(inputs)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))

    return loss


def train_steps(model, loss_fn, batch, steps: int) -> float:
    """Run `steps` AdamW steps on one fixed batch; return the seconds they took."""
    inputs, targets = batch
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3)
    start = time.perf_counter()
    for _ in range(steps):
        loss_fn(inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dense-tiny", help="model preset (default: dense-tiny)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size in tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved measurement rounds")
    parser.add_argument("--compile", action="store_true", help="also time codeling compiled")
    parser.add_argument("--write", type=Path, help="append a results section to this markdown file")
    args = parser.parse_args()

    bf16 = cpu_supports_bf16()
    config = load_config(None, [f"model={args.preset}", f"model.vocab_size={args.vocab_size}",
                                f"model.max_seq_len={max(args.seq_len, 512)}"]).model
    torch.manual_seed(0)
    ours = CodeModel(config)
    theirs = to_llama(ours)
    theirs.train()
    batch = (torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len)),
             torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len)))
    candidates = {
        "codeling eager": (ours, make_loss(ours, bf16)),
        "transformers LlamaForCausalLM": (theirs, make_loss(lambda x: theirs(x).logits, bf16)),
    }
    if args.compile:  # forward and loss compiled together, as `train.compile: true` does
        candidates["codeling compiled"] = (ours, torch.compile(make_loss(ours, bf16)))
    for model, loss_fn in candidates.values():
        train_steps(model, loss_fn, batch, 2)  # warm up (and compile)

    times = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, (model, loss_fn) in candidates.items():
            times[name].append(train_steps(model, loss_fn, batch, args.steps))

    tokens = args.batch_size * args.seq_len * args.steps
    flops_per_token = ours.flops_per_token(args.seq_len)
    peak = measure_matmul_peak("cpu", bf16, seconds=1.0)
    rows, baseline = [], statistics.median(times["transformers LlamaForCausalLM"])
    for name, samples in times.items():
        seconds = statistics.median(samples)
        rate = tokens / seconds
        rows.append((name, rate, rate * flops_per_token / peak, baseline / seconds))

    precision = "bf16 autocast" if bf16 else "fp32"
    header = (f"{args.preset}: {ours.num_parameters() / 1e6:.2f}M parameters, batch "
              f"{args.batch_size} x {args.seq_len} tokens, {precision}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    lines = [header, "", "| model | train tokens/s | MFU | speed vs transformers |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {rate:,.0f} | {100 * mfu:.1f}% | {ratio:.2f}x |"
              for name, rate, mfu, ratio in rows]
    lines += ["", f"MFU ceiling: measured {precision} 1024x1024 matmul peak "
              f"{peak / 1e9:,.0f} GFLOP/s; {flops_per_token / 1e6:.1f} MFLOP per token.",
              f"Median of {args.rounds} interleaved rounds of {args.steps} steps each."]
    print("\n".join(lines))
    if args.write:
        append_results(args.write, f"Train throughput: {args.preset}",
                       "python benchmarks/train_throughput.py"
                       + (" --compile" if args.compile else ""), lines)


def append_results(path: Path, title: str, command: str, lines: list[str]) -> None:
    """Append a results section (title, machine, command, then the lines) to a markdown file."""
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    section = [f"## {title}", "", f"Machine: {machine}. Command: `{command}`.", ""] + lines
    with path.open("a") as handle:
        handle.write("\n".join(section + [""]) + "\n")


if __name__ == "__main__":
    main()
