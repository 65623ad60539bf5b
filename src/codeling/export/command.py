"""The `codeling export` command: write a checkpoint as a transformers directory or GGUF file."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf")


def add_export_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare `codeling export` and its options on the `codeling` subcommands."""
    parser = commands.add_parser(
        "export", help="export a checkpoint for transformers or llama.cpp",
        description="Write the newest checkpoint under RUN_OR_CHECKPOINT in another format. "
        "hf writes a transformers directory (Llama, Mixtral, Mamba2 or Bamba, chosen from the "
        "architecture). gguf writes a llama.cpp file for dense models and needs the gguf "
        "package. Models without an exact counterpart are rejected with the reason.")
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="run directory, stage directory or checkpoint directory")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="hf = transformers model directory, gguf = llama.cpp file")
    parser.add_argument("out", metavar="OUT",
                        help="output directory (hf; must be new or empty) or file (gguf)")
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Export the checkpoint named in `args` in the chosen format; return the exit status."""
    if args.format == "hf":
        from codeling.export.hf import export_hf

        written = export_hf(args.checkpoint, args.out)
    else:
        from codeling.export.gguf import export_gguf

        written = export_gguf(args.checkpoint, args.out)
    log.info("exported %s as %s to %s", args.checkpoint, args.format, written)
    print(written)
    return 0
