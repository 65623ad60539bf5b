"""Train-step speed of codeling's Mamba-2 mixer: chunked SSD vs sequential scan vs transformers.

All three mixers have the same shape and weights and get the same batch. Each train step is a
forward and a backward pass of mean(out^2). The candidates run interleaved in rounds in one process
so that machine noise hits them alike. The table reports the median tokens/s and the speed
relative to transformers' Mamba2Mixer, which falls back to its pure-torch path when the
mamba_ssm package is missing, as it is in the project's environment.

    python benchmarks/ssd_scan.py                 # d_model 256, batch 8 x 256 tokens, fp32
    python benchmarks/ssd_scan.py --bf16          # under bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from codeling.models.mamba import Mamba2Mixer, sequential_scan


class SequentialScanMixer(Mamba2Mixer):
    """The same mixer with the token-by-token reference scan in place of chunked SSD."""

    def _scan(self, x, dt, A, B, C, initial_state):
        return sequential_scan(x, dt, A, B, C, self.D, initial_state)


def hf_mixer_for(mixer: Mamba2Mixer) -> torch.nn.Module:
    """Build transformers' Mamba2Mixer with the same shape and copy the weights into it."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    config = Mamba2Config(
        hidden_size=mixer.d_model, num_heads=mixer.n_heads, head_dim=mixer.head_dim,
        state_size=mixer.d_state, expand=mixer.d_inner // mixer.d_model,
        conv_kernel=mixer.d_conv, n_groups=mixer.n_groups, chunk_size=mixer.chunk_size,
        layer_norm_epsilon=mixer.norm.eps, use_bias=False, use_conv_bias=True,
        num_hidden_layers=1)
    theirs = HFMamba2Mixer(config, layer_idx=0)
    theirs.load_state_dict(mixer.state_dict())
    return theirs


def time_steps(module: torch.nn.Module, x: torch.Tensor, steps: int, bf16: bool) -> float:
    """Run `steps` forward+backward passes; return the seconds they took."""
    precision = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                 else contextlib.nullcontext())
    start = time.perf_counter()
    for _ in range(steps):
        with precision:
            out = module(x)
        out.float().pow(2).mean().backward()
        module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256, help="model width")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--chunk-size", type=int, default=64, help="SSD chunk size in tokens")
    parser.add_argument("--steps", type=int, default=3, help="train steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    parser.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    args = parser.parse_args()

    torch.manual_seed(0)
    ours = Mamba2Mixer(args.d_model, chunk_size=args.chunk_size).train()
    sequential = SequentialScanMixer(args.d_model, chunk_size=args.chunk_size).train()
    sequential.load_state_dict(ours.state_dict())
    theirs = hf_mixer_for(ours).train()
    x = torch.randn(args.batch_size, args.seq_len, args.d_model)
    candidates = {"codeling chunked SSD": ours, "codeling sequential scan": sequential,
                  "transformers Mamba2Mixer (torch path)": theirs}

    for module in candidates.values():
        time_steps(module, x, 1, args.bf16)  # warm up
    times = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, module in candidates.items():
            times[name].append(time_steps(module, x, args.steps, args.bf16))

    tokens = args.batch_size * args.seq_len * args.steps
    baseline = statistics.median(times["transformers Mamba2Mixer (torch path)"])
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"Mamba-2 mixer, d_model {args.d_model}, {ours.n_heads} heads x {ours.head_dim}, "
          f"d_state {ours.d_state}, chunk {args.chunk_size}, batch {args.batch_size} x "
          f"{args.seq_len} tokens, {precision}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print()
    print("| scan | train tokens/s (fwd+bwd) | speed vs transformers |")
    print("|---|---|---|")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        print(f"| {name} | {tokens / seconds:,.0f} | {baseline / seconds:.2f}x |")
    print()
    print(f"Median of {args.rounds} interleaved rounds of {args.steps} steps each.")


if __name__ == "__main__":
    main()
