"""Library functions behind `codeling tokenizer train`, `codeling data prepare` and `generate`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from codeling.data import shards, sources
from codeling.errors import CodelingError
from codeling.inference.generate import GenerationConfig, Generator
from codeling.stages.pretrain import sample_texts
from codeling.tokenizer import Tokenizer, bytes_per_token, train_tokenizer

log = logging.getLogger(__name__)


def train_tokenizer_command(specs: list[str], vocab_size: int, max_bytes: int,
                            out: Path) -> Tokenizer:
    """Train a tokenizer on the training split of each source, save it, report bytes per token."""
    if (out / "tokenizer.json").exists():
        raise CodelingError(f"{out / 'tokenizer.json'} already exists; choose another --out "
                            "or delete it first")
    for spec in specs:
        sources.iter_documents(spec)
    samples = {spec: sample_texts(spec, max_bytes, val_fraction=0.05) for spec in specs}
    tokenizer = train_tokenizer([t for texts in samples.values() for t in texts], vocab_size)
    path = tokenizer.save(out)
    for spec, texts in samples.items():
        print(f"{spec}: {len(texts)} documents, "
              f"{bytes_per_token(tokenizer, texts):.2f} bytes per token")
    print(f"saved {path} ({tokenizer.vocab_size} tokens, fingerprint {tokenizer.fingerprint[:12]})")
    return tokenizer


def prepare_data_command(specs: list[str], tokenizer_path: str, out: Path, val_fraction: float,
                         workers: int, max_documents: int) -> None:
    """Tokenize each source into out/<source name>/ and print its manifest summary."""
    if not 0 <= val_fraction <= 0.5:
        raise CodelingError(f"--val-fraction {val_fraction} is out of range; use 0 to 0.5")
    tokenizer = Tokenizer.load(tokenizer_path)
    for spec in specs:
        sources.iter_documents(spec)
    for spec in specs:
        target = out / sources.source_name(spec)
        manifest = shards.prepare_source(spec, tokenizer, target, val_fraction=val_fraction,
                                         num_workers=workers or None,
                                         max_documents=max_documents or None)
        train, val = manifest["splits"]["train"], manifest["splits"]["val"]
        print(f"{spec} -> {target}: train {train['documents']} documents / {train['tokens']} "
              f"tokens, val {val['documents']} documents / {val['tokens']} tokens "
              f"({manifest['dtype']})")


def unescape(text: str) -> str:
    """Turn the two-character sequences \\n and \\t typed on a command line into newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def generate_command(args: argparse.Namespace) -> str:
    """Load a checkpoint and stream one completion of the prompt to stdout."""
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p,
                              stop=tuple(unescape(stop) for stop in args.stop),
                              seed=args.seed)
    config.validate()
    generator = Generator.from_checkpoint(args.checkpoint, device=args.device)
    sys.stdout.write(args.prompt)
    pieces = []
    for piece in generator.stream(args.prompt, config):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)
