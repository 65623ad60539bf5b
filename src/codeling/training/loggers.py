"""Send training metrics to TensorBoard or Weights & Biases, where the user installed them.

`train.log_to` names the trackers: `tensorboard` writes event files to <stage>/tensorboard,
and `wandb` logs a Weights & Biases run under <stage>/wandb, offline unless the user set
WANDB_MODE. Neither package is a dependency of codeling; each is imported only when named.
Only rank 0 opens trackers. The trainer passes them every record it appends to
metrics.jsonl, which stays the complete record.

Tags: training records become `train/<key>` (train/loss, train/lr, train/grad_norm, ...),
validation records `val/<split>/loss` and `val/<split>/bits_per_byte`, and the final record
`memory/peak_mb`. Values that are not numbers (per-expert load lists, the stop reason) are
left out.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Protocol

from codeling.config import RunConfig, config_to_dict
from codeling.errors import ConfigError

log = logging.getLogger(__name__)

# Tracker name in train.log_to -> the pip package that provides it.
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(names: list[str]) -> None:
    """Raise ConfigError if a tracker in `names` is unknown or its package is not installed."""
    problems = []
    for name in names:
        package = PACKAGES.get(name)
        if package is None:
            problems.append(f"train.log_to: {name!r} is not one of: {', '.join(PACKAGES)}")
        elif importlib.util.find_spec(package) is None:
            problems.append(f"train.log_to: {name} needs the {package} package, which is not "
                            f"installed; run `pip install {package}` or remove {name} from "
                            "train.log_to")
    if problems:
        raise ConfigError(problems)


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """Return (step, {tag: value}) for the numeric values of one metrics.jsonl record."""
    step = int(record["step"])
    values = {}
    split = record.get("split")
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)):
            continue
        if split is not None:
            if key.startswith("val_"):
                values[f"val/{split}/{key[len('val_'):]}"] = float(value)
        elif key == "peak_memory_mb":
            values["memory/peak_mb"] = float(value)
        else:
            values[f"train/{key}"] = float(value)
    return step, values


class _Tracker(Protocol):
    def write(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, log_dir: Path, step: int):
        from torch.utils.tensorboard import SummaryWriter

        # On resume from the checkpoint of `step`, purge_step hides the events after it that a
        # killed run wrote past its last checkpoint, as trim_metrics does for metrics.jsonl.
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=step + 1 if step else None)
        log.info("TensorBoard: event files in %s (view with: tensorboard --logdir %s)",
                 log_dir, log_dir)

    def write(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    # NOTE: this class has not run in the tests, which have no wandb package installed.
    def __init__(self, stage_dir: Path, config: RunConfig):
        os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        # One id per stage directory, so a resumed run continues the same W&B run.
        run_id = hashlib.sha256(str(stage_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project="codeling", name=f"{config.name}-{config.stage}",
                              id=run_id, resume="allow", dir=str(stage_dir),
                              config=config_to_dict(config))
        log.info("Weights & Biases: run %s in %s mode under %s", run_id,
                 os.environ["WANDB_MODE"], stage_dir / "wandb")

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The open trackers of one stage; `write` sends a metrics record to each of them."""

    def __init__(self, trackers: list[_Tracker]):
        self.trackers = trackers
        # Flush event files even when training stops with an exception.
        atexit.register(self.close)

    def write(self, record: dict[str, Any]) -> None:
        step, values = scalars(record)
        if not values:
            return
        for tracker in self.trackers:
            tracker.write(step, values)

    def close(self) -> None:
        """Flush and close every tracker; later calls do nothing."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()
        atexit.unregister(self.close)


def open_trackers(names: list[str], stage_dir: Path, config: RunConfig, step: int = 0) -> Trackers:
    """Open the trackers in `names` for a stage that starts (or resumes) at `step`."""
    check_installed(names)
    opened: list[_Tracker] = []
    for name in dict.fromkeys(names):  # each tracker once, in the order given
        if name == "tensorboard":
            opened.append(_TensorBoard(stage_dir / "tensorboard", step))
        else:
            opened.append(_WandB(stage_dir, config))
    return Trackers(opened)
