"""Checkpoints: safetensors weights, resolved config, trainer state and tokenizer, written atomically.

Layout of one stage directory:

    <stage>/checkpoints/step-000500/  model.safetensors  config.json  trainer_state.pt
                                      tokenizer.json     meta.json
    <stage>/checkpoints/latest        name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, and `latest` is
replaced atomically after that, so a killed run never leaves a half-written checkpoint behind
`latest`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from codeling.config import ModelConfig, RunConfig, config_from_dict, config_to_dict
from codeling.errors import CheckpointError, ConfigError
from codeling.models import lora
from codeling.training import distributed

STAGE_ORDER = ("rlhf", "tools", "code", "language", "train", "quickstart")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(stage_dir: Path, step: int, model: torch.nn.Module, config: RunConfig,
                    trainer_state: dict[str, Any], tokenizer_dir: Path, tokenizer_fingerprint: str,
                    keep: int = 2) -> Path:
    """Write a checkpoint for `step` atomically, point `latest` at it, and prune old ones."""
    root = stage_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    temp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        # LoRA adapters are merged, so every checkpoint loads into a plain model.
        save_model(lora.merged_copy(model) if lora.has_lora(model) else model,
                   str(temp / "model.safetensors"))
        (temp / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
        torch.save(trainer_state, temp / "trainer_state.pt")
        shutil.copy(tokenizer_dir / "tokenizer.json", temp / "tokenizer.json")
        meta = {"step": step, "tokenizer_fingerprint": tokenizer_fingerprint,
                "format": "codeling-checkpoint-v1"}
        (temp / "meta.json").write_text(json.dumps(meta, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    latest_temp = root / ".latest.tmp"
    latest_temp.write_text(final.name + "\n")
    os.replace(latest_temp, root / "latest")
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """Return the checkpoint named by `<stage_dir>/checkpoints/latest`, or None."""
    pointer = stage_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = stage_dir / "checkpoints" / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist; delete "
                              f"{pointer} to start over, or restore the checkpoint directory")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """Find a checkpoint from a checkpoint directory, a stage directory or a run directory."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint or run {str(path)!r} not found; pass a run directory "
                              "(for example runs/quickstart) or a checkpoint directory")
    if path.is_file():
        if path.name == "latest" and path.absolute().parent.name == "checkpoints":
            return resolve_checkpoint(path.absolute().parent.parent)
        raise CheckpointError(f"{str(path)!r} is a file; pass a run directory (for example "
                              "runs/quickstart), a stage directory or a checkpoint directory")
    if (path / "model.safetensors").is_file():
        return path
    if path.absolute().name == "checkpoints":  # absolute, so that "." there matches too
        path = path.absolute().parent
    found = latest_checkpoint(path)
    if found is not None:
        return found
    for stage in STAGE_ORDER:
        if (path / stage).is_dir():
            found = latest_checkpoint(path / stage)
            if found is not None:
                return found
    for stage_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        found = latest_checkpoint(stage_dir)
        if found is not None:
            return found
    raise CheckpointError(f"no checkpoint found in {str(path)!r}; train first, or pass a "
                          "directory that contains model.safetensors or checkpoints/latest")


@dataclass
class LoadedCheckpoint:
    path: Path
    config: RunConfig
    meta: dict
    tokenizer_path: Path


def read_checkpoint_config(path: Path) -> LoadedCheckpoint:
    """Read and validate a checkpoint's config and metadata without loading weights."""
    for required in ("model.safetensors", "config.json", "meta.json"):
        if not (path / required).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {required} is missing; "
                                  "use an earlier checkpoint or retrain")
    try:
        raw = json.loads((path / "config.json").read_text())
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path} has a corrupt config.json or meta.json "
                              f"({error.msg}); use an earlier checkpoint or retrain") from None
    try:
        config = config_from_dict(raw, source=f"{path}/config.json")
    except ConfigError as error:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {error}") from None
    return LoadedCheckpoint(path, config, meta, path / "tokenizer.json")


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load model.safetensors into `model`, with errors that name the file and the fix."""
    file = path / "model.safetensors"
    try:
        if distributed.is_sharded(model):  # safetensors cannot read DTensor storages
            missing, unexpected = distributed.load_full_weights(model, file)
        else:
            missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, RuntimeError) as error:
        detail = str(error).splitlines()[0][:200]
        raise CheckpointError(f"cannot read {file}: {detail}; the file is truncated or corrupt "
                              "or was saved for another model shape; use an earlier checkpoint "
                              "or retrain") from None
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match the model: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}; check that the config "
                              "matches the checkpoint")


def load_trainer_state(path: Path) -> dict:
    """Load trainer_state.pt (optimizer, schedule, RNG and data position)."""
    file = path / "trainer_state.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing, so training cannot resume from {path}; "
                              "use an earlier checkpoint") from None
    except Exception as error:  # torch.load raises many types for a damaged pickle or zip
        raise CheckpointError(f"cannot read {file} ({type(error).__name__}); the file is "
                              "truncated or corrupt; use an earlier checkpoint") from None


def check_tokenizer(meta: dict, path: Path, fingerprint: str, tokenizer_source: str) -> None:
    """Raise if the checkpoint was trained with a tokenizer other than `fingerprint`."""
    saved = meta.get("tokenizer_fingerprint")
    if saved != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was trained with another tokenizer (fingerprint "
            f"{str(saved)[:12]}, but {tokenizer_source} has {fingerprint[:12]}); use the "
            "tokenizer saved with the checkpoint, or start a new run")


def model_config_of(checkpoint: LoadedCheckpoint) -> ModelConfig:
    return checkpoint.config.model
