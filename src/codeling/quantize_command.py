"""The `codeling quantize` command: write an int8 weight-only copy of a checkpoint."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_quantize_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare `codeling quantize` and its arguments on the `codeling` subcommands."""
    parser = commands.add_parser(
        "quantize", help="write an int8 weight-only copy of a checkpoint for CPU serving",
        description="Quantize the linear layers of the newest checkpoint under "
        "RUN_OR_CHECKPOINT to int8 with one fp32 scale per output channel, and write a "
        "checkpoint directory that `codeling generate` and `codeling serve` load. Embeddings, "
        "norms, Mamba-2 conv and SSM parameters, the MoE router and MoE expert weights stay "
        "in fp32.")
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="run directory, stage directory or checkpoint directory")
    parser.add_argument("out", metavar="OUT",
                        help="output checkpoint directory; must be new or empty")
    return parser


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize the checkpoint named in `args` into `args.out`; return the exit status."""
    from codeling.quantize import quantize_checkpoint

    written = quantize_checkpoint(args.checkpoint, args.out)
    log.info("quantized %s to int8 in %s", args.checkpoint, written)
    print(written)
    return 0
