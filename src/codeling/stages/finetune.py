"""Supervised fine-tuning on conversations: the data side of stage 3 (`train.objective: sft`).

`run_training` in `codeling.stages.pretrain` runs the loop for every objective. This module
checks that an SFT config names chat sources, and builds its loader and validation split:

    stage: tools
    init_from: code
    data: {sources: [tool-conversations], replay_sources: [python-stdlib], replay_fraction: 0.2}
    train: {objective: sft, lr: 0.001}

Replay sources are ordinary text sources from an earlier stage; a `replay_fraction` of the rows
are windows of that text trained on every token, which keeps coding ability while the model
learns the chat format.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from codeling.config import RunConfig
from codeling.data import chat_data
from codeling.data.chat_data import SFTLoader
from codeling.errors import ConfigError
from codeling.tokenizer import Tokenizer
from codeling.training.trainer import ValidationSplit

log = logging.getLogger(__name__)


def check_objective(config: RunConfig) -> None:
    """Raise ConfigError when the data sources do not suit train.objective."""
    chat_specs = [spec for spec in config.data.sources if chat_data.is_chat_source(spec)]
    if config.train.objective == "sft":
        text_specs = [spec for spec in config.data.sources if spec not in chat_specs]
        if text_specs or not chat_specs:
            raise ConfigError([
                f"train.objective is sft, so data.sources must be chat sources "
                f"({chat_data.TOOL_CONVERSATIONS} or chat:PATH.jsonl), got {config.data.sources}; "
                "put text sources in data.replay_sources"])
        for spec in chat_specs:
            chat_data.check_chat_source(spec)
        if config.data.weights:
            raise ConfigError(["data.weights does not apply to chat sources; remove it "
                               "(every conversation is used once per epoch)"])
    elif chat_specs:
        raise ConfigError([f"data.sources {chat_specs} are conversations; set "
                           "train.objective: sft to fine-tune on them"])


def build_sft_loaders(config: RunConfig, run_dir: Path, tokenizer: Tokenizer, rank: int = 0,
                      world_size: int = 1) -> tuple[SFTLoader, list[ValidationSplit]]:
    """Tokenize the chat sources (and replay shards) and build the loader and validation split."""
    from codeling.stages.pretrain import build_loaders, ensure_data

    train = config.train
    max_len = train.seq_len + 1
    train_examples, val_examples = [], []
    for spec in config.data.sources:
        train_records, val_records = chat_data.load_chat_splits(spec, run_dir,
                                                                config.data.val_fraction)
        name = chat_data.chat_source_name(spec)
        train_examples += chat_data.tokenize_conversations(train_records, tokenizer, max_len,
                                                           f"{name} train")
        if val_records:
            val_examples += chat_data.tokenize_conversations(val_records, tokenizer, max_len,
                                                             f"{name} val")
    log.info("conversations: %d for training, %d for validation; %.1f tokens each on average "
             "(%.0f%% of them the assistant's)", len(train_examples), len(val_examples),
             sum(len(e.ids) for e in train_examples) / len(train_examples),
             100 * sum(int(e.mask.sum()) for e in train_examples)
             / sum(len(e.ids) for e in train_examples))

    replay = None
    if config.data.replay_sources and config.data.replay_fraction > 0:
        replay_config = dataclasses.replace(
            config, data=dataclasses.replace(config.data, sources=[], weights=[]),
            train=dataclasses.replace(train, batch_size=1))
        data = ensure_data(replay_config, run_dir, tokenizer)
        replay, _ = build_loaders(replay_config, data)  # one row per call, same on every rank
        log.info("replay: %.0f%% of rows are windows of %s", 100 * config.data.replay_fraction,
                 ", ".join(data.names))
    loader = SFTLoader(train_examples, train.batch_size, train.seq_len, tokenizer.pad_id,
                       seed=train.seed, rank=rank, world_size=world_size, replay=replay,
                       replay_fraction=config.data.replay_fraction if replay else 0.0,
                       group_by_length=config.data.group_by_length)
    splits = []
    if val_examples:
        ratio = chat_data.assistant_bytes_per_token(val_examples, tokenizer)
        batches = (lambda: chat_data.iter_sft_eval_batches(
            val_examples, train.batch_size, train.seq_len, tokenizer.pad_id, train.eval_batches))
        splits.append(ValidationSplit("conversations", batches, ratio))
    return loader, splits

