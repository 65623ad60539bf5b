"""SFT training speed with the output projection at scored positions only, beside all positions.

Supervised fine-tuning scores only the assistant's tokens: about 14% of the tokens of the cpu-tiny
tool conversations, whose system turns list the tools as JSON Schema. The trainer's SFT loss
passes the scored positions to the model (`CodeModel.forward(..., positions=...)`), which then
projects only those hidden states onto the vocabulary. The reference computes logits everywhere
and lets cross-entropy ignore the rest, as a plain language-model loss does. Both get the same
model, weights, batch and mask, and run AdamW steps in interleaved rounds in one process.

    python benchmarks/sft_scored_logits.py                       # dense-tiny, eager
    python benchmarks/sft_scored_logits.py --compile             # both compiled
    python benchmarks/sft_scored_logits.py --preset mamba-tiny --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from codeling.config import load_config
from codeling.data.chat_data import scored_positions
from codeling.models.decoder import CodeModel
from codeling.training.device import autocast, cpu_supports_bf16

from train_throughput import append_results, train_steps  # timed AdamW loop, results writer


def make_loss(model: CodeModel, bf16: bool, scored: torch.Tensor, scored_only: bool):
    """Return loss(inputs, targets): the SFT loss with or without the fast path."""

    def loss(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with autocast(torch.device("cpu"), bf16):
            if scored_only:
                logits = model(inputs, positions=scored)  # (N, V)
            else:
                logits = model(inputs).flatten(0, 1)  # (B * T, V)
        flat = targets.view(-1).index_select(0, scored) if scored_only else targets.view(-1)
        return F.cross_entropy(logits.float(), flat)

    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="dense-tiny", help="model preset (default: dense-tiny)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size in tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=320, help="tokens per sequence")
    parser.add_argument("--scored", type=float, default=0.14,
                        help="fraction of the targets that are scored (default: 0.14, the "
                             "assistant's share of the cpu-tiny tool conversations)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved measurement rounds")
    parser.add_argument("--compile", action="store_true", help="compile both losses")
    parser.add_argument("--write", type=Path, help="append a results section to this markdown file")
    args = parser.parse_args()
    if not 0 < args.scored <= 1:
        parser.error(f"--scored {args.scored} must be in (0, 1]")

    bf16 = cpu_supports_bf16()
    config = load_config(None, [f"model={args.preset}", f"model.vocab_size={args.vocab_size}",
                                f"model.max_seq_len={max(args.seq_len, 512)}"]).model
    torch.manual_seed(0)
    model = CodeModel(config)
    inputs = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    targets = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len))
    # The assistant's turns close a conversation, so score the last positions of each row.
    first_scored = round(args.seq_len * (1 - args.scored))
    targets[:, :first_scored] = -100
    scored = scored_positions(targets)
    batch = (inputs, targets)

    candidates = {"logits at every position (reference)": make_loss(model, bf16, scored, False),
                  "logits at scored positions": make_loss(model, bf16, scored, True)}
    if args.compile:
        candidates = {name: torch.compile(fn) for name, fn in candidates.items()}
    for loss_fn in candidates.values():
        train_steps(model, loss_fn, batch, 2)  # warm up (and compile)
    times = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, loss_fn in candidates.items():
            times[name].append(train_steps(model, loss_fn, batch, args.steps))

    tokens = args.batch_size * args.seq_len * args.steps
    baseline = statistics.median(times["logits at every position (reference)"])
    precision = "bf16 autocast" if bf16 else "fp32"
    lines = [f"{args.preset}: {model.num_parameters() / 1e6:.2f}M parameters, batch "
             f"{args.batch_size} x {args.seq_len} tokens, {100 * args.scored:.0f}% scored, "
             f"{precision}, {'compiled' if args.compile else 'eager'}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| SFT loss | train tokens/s | speed vs reference |", "|---|---|---|"]
    for name, samples in times.items():
        seconds = statistics.median(samples)
        lines.append(f"| {name} | {tokens / seconds:,.0f} | {baseline / seconds:.2f}x |")
    lines += ["", f"Median of {args.rounds} interleaved rounds of {args.steps} steps each."]
    print("\n".join(lines))
    if args.write:
        append_results(args.write, f"SFT logits at scored positions: {args.preset}",
                       f"python benchmarks/sft_scored_logits.py --preset {args.preset}"
                       + (" --compile" if args.compile else ""), lines)


if __name__ == "__main__":
    main()
