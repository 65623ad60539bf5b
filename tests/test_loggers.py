"""Metrics sent to TensorBoard, read back from the event files; errors for missing trackers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from codeling.config import load_config
from codeling.data.loader import PackedLoader, iter_eval_batches
from codeling.errors import ConfigError
from codeling.models.decoder import CodeModel
from codeling.training import checkpoint as ckpt
from codeling.training import loggers
from codeling.training.trainer import Trainer, ValidationSplit

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def make_trainer(directory: Path, log_to: list[str], max_steps: int = 4) -> Trainer:
    tokens = np.random.default_rng(0).integers(0, 256, size=4000).astype(np.uint16)
    tokenizer_dir = directory / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    config = load_config(None, [
        f"run_dir={directory}", "model.vocab_size=256", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.max_seq_len=32", "train.batch_size=2", "train.seq_len=16",
        f"train.max_steps={max_steps}", "train.warmup_steps=1", "train.eval_every=2",
        "train.checkpoint_every=2", "train.log_every=1", "train.precision=fp32",
        f"train.log_to={json.dumps(log_to)}"])
    torch.manual_seed(0)
    model = CodeModel(config.model)
    loader = PackedLoader([tokens], weights=[1.0], batch_size=2, seq_len=16, seed=5)
    val = ValidationSplit("python", lambda: iter_eval_batches(tokens[:200], 2, 16, 2), 3.0)
    return Trainer(model, config, loader, [val], directory / "stage", tokenizer_dir, "f" * 64,
                   torch.device("cpu"), bf16=False)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Return {tag: [(step, value), ...]} from every event file under log_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def metric_records(stage_dir: Path, key: str) -> list[dict]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if key in record]


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs the tensorboard package")
def test_tensorboard_events_match_metrics(tmp_path):
    make_trainer(tmp_path, ["tensorboard"]).fit()

    stage_dir = tmp_path / "stage"
    scalars = read_scalars(stage_dir / "tensorboard")
    steps = metric_records(stage_dir, "loss")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    for (step, value), record in zip(scalars["train/loss"], steps):
        assert value == pytest.approx(record["loss"], rel=1e-6)  # stored as float32
    for (step, value), record in zip(scalars["train/grad_norm"], steps):
        assert value == pytest.approx(record["grad_norm"], rel=1e-6)
    assert [value for _, value in scalars["train/lr"]] == pytest.approx(
        [record["lr"] for record in steps], rel=1e-6)

    validation = metric_records(stage_dir, "val_loss")
    assert [step for step, _ in scalars["val/python/loss"]] == [r["step"] for r in validation]
    assert scalars["val/python/bits_per_byte"][-1][1] == pytest.approx(
        validation[-1]["val_bits_per_byte"], rel=1e-6)
    assert scalars["memory/peak_mb"][0][0] == 4


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs the tensorboard package")
def test_tensorboard_resume_hides_lost_steps(tmp_path):
    first = make_trainer(tmp_path, ["tensorboard"])
    first.fit(stop_at_step=3)  # logs steps 1-3; checkpoints at steps 2 and 3
    # Resume from step 2, as after a crash that lost the checkpoint of step 3.
    second = make_trainer(tmp_path, ["tensorboard"])
    checkpoint = tmp_path / "stage" / "checkpoints" / ckpt.checkpoint_name(2)
    ckpt.load_weights(second.model, checkpoint)
    second.load_state_dict(ckpt.load_trainer_state(checkpoint))
    second.fit()

    scalars = read_scalars(tmp_path / "stage" / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]


def test_scalars_tag_each_record_kind():
    step, values = loggers.scalars({"step": 7, "loss": 2.5, "lr": 1e-3, "tokens": 100,
                                    "expert_load": [[0.5, 0.5]], "moe_aux_loss": 0.01})
    assert step == 7
    assert values == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens": 100.0,
                      "train/moe_aux_loss": 0.01}

    step, values = loggers.scalars({"step": 8, "split": "shell", "val_loss": 3.0,
                                    "val_bits_per_byte": 2.0, "tokens": 100, "elapsed": 1.0})
    assert values == {"val/shell/loss": 3.0, "val/shell/bits_per_byte": 2.0}

    _, values = loggers.scalars({"step": 9, "peak_memory_mb": 512.0, "stop_reason": "SIGTERM"})
    assert values == {"memory/peak_mb": 512.0}


@pytest.mark.skipif(HAS_WANDB, reason="wandb is installed, so nothing is missing")
def test_missing_wandb_stops_before_training(tmp_path):
    with pytest.raises(ConfigError) as error:
        make_trainer(tmp_path, ["wandb"])
    assert "pip install wandb" in str(error.value)
    assert not (tmp_path / "stage").exists()


def test_unknown_tracker_is_rejected():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.log_to=[tensorboard, mlflow]"])
    assert "'mlflow' is not one of: tensorboard, wandb" in str(error.value)
