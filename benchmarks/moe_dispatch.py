"""Train-step speed of codeling's MoE block beside transformers' MixtralSparseMoeBlock.

Both blocks have the same shape and weights and get the same batch. Each train step is a
forward and a backward pass of mean(out^2) (plus codeling's auxiliary and z losses, which
transformers' block leaves to the model). The two run interleaved in rounds in one process so that
machine noise hits both alike. The table reports the median tokens/s and the ratio.

    python benchmarks/moe_dispatch.py            # d_model 256, 8 experts top-2, batch 8 x 256, fp32
    python benchmarks/moe_dispatch.py --bf16     # under bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from codeling.models.moe import MoEFeedForward


def mixtral_block_for(block: MoEFeedForward) -> torch.nn.Module:
    """Build transformers' MixtralSparseMoeBlock with the same shape and copy the weights into it."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=block.d_model, intermediate_size=block.experts.d_ff,
                           num_local_experts=block.n_experts, num_experts_per_tok=block.top_k,
                           router_jitter_noise=0.0)
    theirs = MixtralSparseMoeBlock(config)
    theirs.load_state_dict(block.state_dict())  # same names in transformers 5.x
    return theirs


def time_steps(module: torch.nn.Module, x: torch.Tensor, steps: int, bf16: bool) -> float:
    """Run `steps` forward+backward passes; return the seconds they took."""
    precision = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                 else contextlib.nullcontext())
    start = time.perf_counter()
    for _ in range(steps):
        with precision:
            out = module(x)
        loss = out.float().pow(2).mean()
        if isinstance(module, MoEFeedForward):
            loss = loss + module.aux_loss + module.z_loss
        loss.backward()
        module.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256, help="model width")
    parser.add_argument("--d-ff", type=int, default=512, help="hidden size of each expert")
    parser.add_argument("--experts", type=int, default=8, help="routed experts")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5, help="train steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    parser.add_argument("--bf16", action="store_true", help="run under bf16 autocast")
    args = parser.parse_args()

    torch.manual_seed(0)
    ours = MoEFeedForward(args.d_model, args.d_ff, args.experts, args.top_k).train()
    theirs = mixtral_block_for(ours).train()
    x = torch.randn(args.batch_size, args.seq_len, args.d_model)
    candidates = {"codeling MoEFeedForward": ours,
                  "transformers MixtralSparseMoeBlock": theirs}

    for module in candidates.values():
        time_steps(module, x, 1, args.bf16)  # warm up
    times = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, module in candidates.items():
            times[name].append(time_steps(module, x, args.steps, args.bf16))

    tokens = args.batch_size * args.seq_len * args.steps
    baseline = statistics.median(times["transformers MixtralSparseMoeBlock"])
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"MoE block, d_model {args.d_model}, {args.experts} experts of d_ff {args.d_ff}, "
          f"top-{args.top_k}, batch {args.batch_size} x {args.seq_len} tokens, {precision}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print()
    print("| block | train tokens/s (fwd+bwd) | speed vs transformers |")
    print("|---|---|---|")
    for name, samples in times.items():
        seconds = statistics.median(samples)
        print(f"| {name} | {tokens / seconds:,.0f} | {baseline / seconds:.2f}x |")
    print()
    print(f"Median of {args.rounds} interleaved rounds of {args.steps} steps each.")


if __name__ == "__main__":
    main()
