"""Shared helpers for end-to-end tests: a tiny run config on a few standard-library modules."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import yaml

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def tiny_run_config(run_dir: Path, **train) -> dict:
    train_settings = dict(batch_size=4, seq_len=32, max_steps=6, warmup_steps=2, eval_every=3,
                          eval_batches=2, checkpoint_every=3, log_every=1, precision="fp32")
    train_settings.update(train)
    return {
        "name": "tiny", "run_dir": str(run_dir), "stage": "code",
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
        "tokenizer": {"vocab_size": 512, "max_bytes_per_source": 200_000},
        "data": {"sources": [f"files:{STDLIB}/json/*.py", f"files:{STDLIB}/email/*.py"],
                 "val_fraction": 0.2},
        "train": train_settings,
    }


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def snapshot(directory: Path) -> dict[str, str]:
    """Map every file under a directory to a hash of its content."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}
