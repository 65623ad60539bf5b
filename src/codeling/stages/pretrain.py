"""Next-token pretraining of one stage: tokenizer (stage 0), data shards, model, trainer.

`run_training(config, resume)` is what `codeling train` runs. It checks every input before it
writes anything, so a bad source, a clash with an existing run, or a mismatched checkpoint
stops the run with nothing overwritten.

Under torchrun (`torchrun --nproc_per_node N -m codeling train ...`) it trains data-parallel:
rank 0 trains the tokenizer and prepares the data first, the other ranks then load them, and
each rank takes `train.batch_size` samples of a global batch of batch_size * N. The loader
rejects a resume that changes the global batch, so to resume under another number of
processes, set `train.batch_size` to keep batch_size * N the same.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from codeling.config import RunConfig, config_to_dict, save_config
from codeling.data import shards, sources
from codeling.data.loader import PackedLoader, iter_eval_batches
from codeling.evaluation import copying
from codeling.stages import finetune
from codeling.errors import (CheckpointError, CodelingError, ConfigError,
                             SourceUnreachableError)
from codeling.models import lora
from codeling.models.decoder import CodeModel
from codeling.tokenizer import Tokenizer, bytes_per_token, train_tokenizer
from codeling.training import checkpoint as ckpt
from codeling.training import distributed, dpo
from codeling.training import memory
from codeling.training.device import resolve_device, use_bf16
from codeling.training.trainer import Trainer, TrainResult, ValidationSplit

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    names: list[str]
    train: list  # one 1-D token array per source
    val: list
    val_bytes_per_token: list[float]
    train_tokens: list[int]
    replay: list[bool]  # True for sources mixed back in from an earlier stage


# -- stage 0: tokenizer --------------------------------------------------------------------------


def sample_texts(spec: str, max_bytes: int, val_fraction: float) -> list[str]:
    """Collect training-split documents of one source up to max_bytes of UTF-8 text."""
    texts, total = [], 0
    for text in sources.iter_unique(sources.iter_documents(spec)):
        if sources.split_of(text, val_fraction) != "train":
            continue  # keep held-out text unseen, so bits per byte stay honest
        texts.append(text)
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            break
    return texts


def ensure_tokenizer(config: RunConfig, run_dir: Path) -> Tokenizer:
    """Load the run's tokenizer, copy a given one into the run, or train one (stage 0)."""
    target = run_dir / "tokenizer"
    if (target / "tokenizer.json").is_file():
        return Tokenizer.load(target)
    if config.tokenizer.path:
        tokenizer = Tokenizer.load(config.tokenizer.path)
        tokenizer.save(target)
        return tokenizer
    specs = config.tokenizer.sources or config.data.sources
    samples = {spec: sample_texts(spec, config.tokenizer.max_bytes_per_source,
                                  config.data.val_fraction) for spec in specs}
    log.info("training a %d-token byte-level BPE tokenizer on %s", config.tokenizer.vocab_size,
             ", ".join(f"{spec} ({sum(len(t) for t in texts) / 1e6:.1f}M chars)"
                       for spec, texts in samples.items()))
    all_texts = [text for texts in samples.values() for text in texts]
    tokenizer = train_tokenizer(all_texts, config.tokenizer.vocab_size)
    for spec, texts in samples.items():
        log.info("tokenizer: %.2f bytes per token on %s", bytes_per_token(tokenizer, texts), spec)
    tokenizer.save(target)
    return tokenizer


# -- data ----------------------------------------------------------------------------------------


_UNREACHABLE: dict[str, str] = {}  # spec -> error message, so each hub is tried once per process


def resolve_sources(specs: list[str], fallback: list[str]) -> list[str]:
    """Return the sources to use: each spec, with `fallback` in place of any that is unreachable.

    Each spec is opened and its first document read, so an unreachable hub dataset is found
    here, before anything is written.
    """
    resolved: list[str] = []
    for spec in specs:
        try:
            if spec in _UNREACHABLE:
                raise SourceUnreachableError(_UNREACHABLE[spec])
            next(iter(sources.iter_documents(spec)), None)
            replacement = [spec]
        except SourceUnreachableError as error:
            _UNREACHABLE[spec] = str(error)
            if not fallback:
                raise
            log.warning("%s; using the offline fallback %s", error, ", ".join(fallback))
            for fallback_spec in fallback:
                sources.iter_documents(fallback_spec)
            replacement = list(fallback)
        resolved += [name for name in replacement if name not in resolved]
    return resolved


def ensure_data(config: RunConfig, run_dir: Path, tokenizer: Tokenizer) -> PreparedData:
    """Tokenize every source into shards under run_dir/data (reused when already there)."""
    data = config.data
    names, train, val, ratios, counts = [], [], [], [], []
    specs = list(data.sources) + list(data.replay_sources)
    for spec in specs:
        out_dir = run_dir / "data" / sources.source_name(spec)
        if not (out_dir / "manifest.json").is_file():
            shards.prepare_source(spec, tokenizer, out_dir, val_fraction=data.val_fraction,
                                  num_workers=data.num_workers or None,
                                  max_documents=data.max_documents or None)
        manifest = shards.read_manifest(out_dir)
        train_tokens = shards.load_split(out_dir, "train", tokenizer.fingerprint)
        val_tokens = shards.load_split(out_dir, "val", tokenizer.fingerprint)
        names.append(sources.source_name(spec))
        train.append(train_tokens)
        val.append(val_tokens)
        counts.append(len(train_tokens))
        val_stats = manifest["splits"]["val"]
        ratios.append(val_stats["bytes"] / max(val_stats["tokens"], 1))
    replay = [False] * len(data.sources) + [True] * len(data.replay_sources)
    return PreparedData(names, train, val, ratios, counts, replay)


def mixture_weights(config: RunConfig, data: PreparedData) -> list[float]:
    """Return the sampling weight of each source: configured, or proportional to its tokens."""
    main = [n for n, replay in zip(data.train_tokens, data.replay) if not replay]
    replayed = [n for n, replay in zip(data.train_tokens, data.replay) if replay]
    weights = config.data.weights or [float(n) for n in main]
    fraction = config.data.replay_fraction if replayed else 0.0
    shares = [(1 - fraction) * w / sum(weights) for w in weights]
    shares += [fraction * n / sum(replayed) for n in replayed]
    reason = "data.weights" if config.data.weights else "derived: proportional to training tokens"
    if replayed:
        reason += f", {100 * fraction:g}% replay of earlier-stage data"
    log.info("mixture: %s (%s)", ", ".join(f"{name} {100 * share:.1f}%"
                                          for name, share in zip(data.names, shares)), reason)
    return shares


def build_loaders(config: RunConfig, data: PreparedData, rank: int = 0,
                  world_size: int = 1) -> tuple[PackedLoader, list[ValidationSplit]]:
    """Build the training loader for one rank of `world_size` and the validation splits."""
    train = config.train
    usable = [i for i, n in enumerate(data.train_tokens) if n > train.seq_len]
    if not usable:
        raise CodelingError(f"no source has more than train.seq_len={train.seq_len} training "
                            "tokens; add data or lower train.seq_len")
    weights = mixture_weights(config, data)
    loader = PackedLoader([data.train[i] for i in usable], weights=[weights[i] for i in usable],
                          batch_size=train.batch_size, seq_len=train.seq_len, seed=train.seed,
                          rank=rank, world_size=world_size)
    splits = []
    for name, tokens, ratio in zip(data.names, data.val, data.val_bytes_per_token):
        if len(tokens) <= train.seq_len:
            log.warning("validation split of %s has only %d tokens; it is not evaluated",
                        name, len(tokens))
            continue
        batches = (lambda tokens=tokens: iter_eval_batches(
            tokens, train.batch_size, train.seq_len, train.eval_batches))
        splits.append(ValidationSplit(name, batches, ratio))
    return loader, splits


# -- model and start-up report -------------------------------------------------------------------


def build_model(config: RunConfig, tokenizer: Tokenizer) -> CodeModel:
    """Build the model, taking the vocabulary size from the tokenizer when it is unset."""
    model_config = config.model
    if model_config.vocab_size == 0:
        model_config.vocab_size = tokenizer.vocab_size
        log.info("model.vocab_size = %d (derived: the tokenizer's vocabulary)",
                 tokenizer.vocab_size)
    elif model_config.vocab_size < tokenizer.vocab_size:
        raise CodelingError(f"model.vocab_size={model_config.vocab_size} is smaller than the "
                            f"tokenizer's {tokenizer.vocab_size}; set model.vocab_size=0")
    return CodeModel(model_config)


def describe_run(config: RunConfig, model: CodeModel, device: torch.device, bf16: bool,
                 world_size: int = 1) -> None:
    """Log parameter counts, FLOPs per token and every derived setting with its reason."""
    m, t = config.model, config.train
    log.info("model: %s, %d layers (%s), d_model %d, %d heads / %d kv heads, d_ff %d%s",
             m.arch, m.n_layers, m.resolved_layer_pattern(), m.d_model, m.n_heads,
             m.resolved_kv_heads(), m.resolved_d_ff(),
             " (derived: 8/3 * d_model rounded up to 64)" if not m.d_ff else "")
    log.info("parameters: %.2fM total, %.2fM without the embedding table",
             model.num_parameters() / 1e6, model.num_parameters(exclude_embeddings=True) / 1e6)
    log.info("FLOPs per token (train, forward + backward): %.1fM at seq_len %d",
             model.flops_per_token(t.seq_len) / 1e6, t.seq_len)
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * world_size
    log.info("tokens per optimizer step: %d = batch %d x seq_len %d x grad_accum %d x %d "
             "processes", tokens_per_step, t.batch_size, t.seq_len, t.grad_accum, world_size)
    budget = [f"{t.max_steps} steps"]
    if t.max_tokens:
        budget.append(f"{t.max_tokens} tokens ({math.ceil(t.max_tokens / tokens_per_step)} steps)")
    if t.max_epochs:
        budget.append(f"{t.max_epochs:g} epochs")
    if t.max_minutes:
        budget.append(f"{t.max_minutes:g} minutes")
    log.info("budget: whichever comes first of %s", ", ".join(budget))
    log.info("device %s, precision %s (%s)", device, "bf16 autocast" if bf16 else "fp32",
             f"train.precision={t.precision}")


# -- the stage -----------------------------------------------------------------------------------


def check_sources(specs: list[str]) -> None:
    """Open every source spec once, so a missing path fails before anything is written."""
    for spec in specs:
        sources.iter_documents(spec)


def check_resume(config: RunConfig, stage_dir: Path, resume: bool) -> Path | None:
    """Return the checkpoint to resume from, or raise if the request clashes with the disk."""
    latest = ckpt.latest_checkpoint(stage_dir)
    if latest is not None and not resume:
        raise CodelingError(f"{stage_dir} already has checkpoints (latest {latest.name}); "
                            "pass --resume to continue it, or set run_dir or name for a new run")
    if latest is None and resume:
        raise CodelingError(f"--resume given but {stage_dir} has no checkpoint; "
                            "drop --resume to start the run")
    return latest


def restore(trainer: Trainer, model: CodeModel, checkpoint: Path, tokenizer: Tokenizer,
            config: RunConfig) -> None:
    """Load weights and trainer state after checking the tokenizer and model shape match."""
    loaded = ckpt.read_checkpoint_config(checkpoint)
    ckpt.check_tokenizer(loaded.meta, checkpoint, tokenizer.fingerprint, "the run's tokenizer")
    saved_model = dataclasses.asdict(loaded.config.model)
    if saved_model != dataclasses.asdict(config.model):
        changed = [k for k, v in saved_model.items() if getattr(config.model, k) != v]
        raise CheckpointError(f"checkpoint {checkpoint} has another model shape (model.{changed[0]}"
                              f" is {saved_model[changed[0]]!r} there); resume with the same "
                              "model settings")
    for key in ("lora_rank", "lora_alpha", "lora_targets"):
        saved, ours = getattr(loaded.config.train, key), getattr(config.train, key)
        if (config.train.lora_rank or loaded.config.train.lora_rank) and saved != ours:
            raise CheckpointError(f"checkpoint {checkpoint} was trained with train.{key} = "
                                  f"{saved!r}, not {ours!r}; resume with the same LoRA settings")
    state = ckpt.load_trainer_state(checkpoint)
    if lora.has_lora(model):
        # The checkpoint's weights have the adapters merged in; the model already has the
        # starting weights, so only the adapters are loaded.
        if "lora" not in state:
            raise CheckpointError(f"checkpoint {checkpoint} was trained without LoRA; resume "
                                  "with train.lora_rank: 0")
        lora.load_adapter_state_dict(model, state["lora"])
    else:
        if "lora" in state:
            raise CheckpointError(f"checkpoint {checkpoint} was trained with LoRA adapters; "
                                  "resume with the same train.lora_* settings")
        ckpt.load_weights(model, checkpoint)
    trainer.load_state_dict(state)
    trainer.trim_metrics()
    log.info("resumed from %s at step %d", checkpoint, trainer.step)


def find_init_checkpoint(config: RunConfig) -> Path | None:
    """Resolve `init_from`: the name of an earlier stage of this run, or a path."""
    if not config.init_from:
        return None
    stage_dir = config.resolved_run_dir() / config.init_from
    if "/" not in config.init_from and stage_dir.is_dir():
        return ckpt.resolve_checkpoint(stage_dir)
    return ckpt.resolve_checkpoint(config.init_from)


def initialize_from(model: CodeModel, checkpoint: Path, tokenizer: Tokenizer) -> None:
    """Load another run's or stage's weights into a new model, after checking they match."""
    loaded = ckpt.read_checkpoint_config(checkpoint)
    ckpt.check_tokenizer(loaded.meta, checkpoint, tokenizer.fingerprint, "this run's tokenizer")
    saved = dataclasses.asdict(loaded.config.model)
    ours = dataclasses.asdict(model.config)
    changed = [key for key in saved if saved[key] != ours[key]]
    if changed:
        raise CheckpointError(f"init_from checkpoint {checkpoint} has another model shape "
                              f"(model.{changed[0]} is {saved[changed[0]]!r} there, "
                              f"{ours[changed[0]]!r} here); use the same model settings")
    ckpt.load_weights(model, checkpoint)
    log.info("initialized weights from %s (optimizer and schedule start fresh)", checkpoint)


def mark_done(stage_dir: Path, result: TrainResult, used_sources: list[str]) -> None:
    """Record that a stage finished its budget, so a rerun of the pipeline skips it."""
    record = {"step": result.step, "tokens": result.tokens, "stop_reason": result.stop_reason,
              "val": result.val, "sources": used_sources,
              "checkpoint": str(result.checkpoint) if result.checkpoint else None}
    temporary = stage_dir / ".done.tmp"
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, stage_dir / "done.json")


def run_training(config: RunConfig, resume: bool = False) -> TrainResult:
    """Run stage 0 if needed, prepare data, then train and checkpoint the model.

    Under torchrun, every rank calls this; see the module docstring. `train.objective: grpo`
    runs `codeling.training.grpo.run_grpo` instead, which samples its own data.
    """
    if config.train.objective == "grpo":
        from codeling.training import grpo  # grpo imports this module

        return grpo.run_grpo(config, resume)
    dist = distributed.init_distributed(resolve_device(config.train.device))
    if not dist.is_main:
        # Rank 0 reports the run; the other ranks log only warnings and errors.
        logging.getLogger("codeling").setLevel(logging.WARNING)
    run_dir = config.resolved_run_dir()
    stage_dir = run_dir / config.stage
    checkpoint = check_resume(config, stage_dir, resume)
    init_checkpoint = None if checkpoint else find_init_checkpoint(config)
    if config.data.replay_fraction > 0 and not config.data.replay_sources:
        raise CodelingError(f"data.replay_fraction is {config.data.replay_fraction} but "
                            "data.replay_sources is empty; name the sources to replay or set 0")
    check_sources(config.data.replay_sources)
    sft = config.train.objective == "sft"
    preference = config.train.objective == "dpo"
    finetune.check_objective(config)
    if preference:
        dpo.check_config(config)
    if dist.is_main:
        if not (run_dir / "tokenizer" / "tokenizer.json").is_file() and not config.tokenizer.path:
            if sft or preference:
                raise CodelingError(f"{run_dir / 'tokenizer'} has no tokenizer; fine-tuning "
                                    "starts from an earlier stage of the same run, so run the "
                                    "language or code stage first or set tokenizer.path")
            config.tokenizer.sources = resolve_sources(config.tokenizer.sources,
                                                       config.data.fallback_sources)
        if not (sft or preference):
            config.data.sources = resolve_sources(config.data.sources,
                                                  config.data.fallback_sources)
    # Every rank uses rank 0's choice, so a hub that only one rank can reach changes nothing.
    config.tokenizer.sources, config.data.sources = distributed.broadcast_object(
        (config.tokenizer.sources, config.data.sources))
    log.info("stage %s: training on %s", config.stage, ", ".join(config.data.sources))
    device = dist.device
    bf16 = use_bf16(config.train.precision, device)
    torch.manual_seed(config.train.seed)

    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = distributed.main_first(lambda: ensure_tokenizer(config, run_dir),
                                       "training or loading the tokenizer")
    if checkpoint is not None:
        loaded = ckpt.read_checkpoint_config(checkpoint)
        ckpt.check_tokenizer(loaded.meta, checkpoint, tokenizer.fingerprint,
                             f"{run_dir / 'tokenizer'}")
    memory.check_run(config, tokenizer.vocab_size, bf16, dist)
    model = build_model(config, tokenizer).to(device)
    if sft:
        loader, val_splits = distributed.main_first(
            lambda: finetune.build_sft_loaders(config, run_dir, tokenizer, dist.rank,
                                               dist.world_size), "preparing the conversations")
    elif preference:
        loader, val_splits = distributed.main_first(
            lambda: dpo.build_preference_loaders(config, run_dir, tokenizer,
                                                 find_init_checkpoint(config), dist.rank,
                                                 dist.world_size), "building the preference pairs")
    else:
        data = distributed.main_first(lambda: ensure_data(config, run_dir, tokenizer),
                                      "preparing the data shards")
        loader, val_splits = build_loaders(config, data, dist.rank, dist.world_size)
    if config.train.lora_rank:
        # Adapters train on top of the starting weights, on a fresh start and on resume alike.
        base = find_init_checkpoint(config)
        if base is None:
            raise ConfigError(["train.lora_rank is set but init_from is empty; LoRA adapts "
                               "trained weights, so set init_from to an earlier stage or "
                               "checkpoint"])
        initialize_from(model, base, tokenizer)
        layers = lora.apply_lora(model, config.train.lora_rank, config.train.lora_alpha,
                                 config.train.lora_targets, config.train.lora_dropout)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("LoRA rank %d on %d layers (%s): %.3fM trainable parameters",
                 config.train.lora_rank, len(layers),
                 ", ".join(sorted({name.rsplit(".", 1)[-1] for name in layers})), trainable / 1e6)
    loss_hook = None
    if preference:  # the frozen reference is the init_from checkpoint, on resume too
        loss_hook = dpo.build_dpo_loss(config, model, find_init_checkpoint(config), device, bf16)
    trainer = Trainer(model, config, loader, val_splits, stage_dir, run_dir / "tokenizer",
                      tokenizer.fingerprint, device, bf16, dist=dist, loss_hook=loss_hook)
    if checkpoint is not None:
        restore(trainer, model, checkpoint, tokenizer, config)
    elif init_checkpoint is not None and not config.train.lora_rank:
        initialize_from(model, init_checkpoint, tokenizer)
    if (sft and checkpoint is None and init_checkpoint is not None and dist.is_main
            and not distributed.is_sharded(model)):
        copying.warn_if_no_copying(model, tokenizer.eos_id, device, bf16)
    if dist.is_main:
        save_config(config, run_dir / "config.yaml")
        stage_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, stage_dir / "config.yaml")
    describe_run(config, model, device, bf16, dist.world_size)
    log.debug("resolved config: %s", config_to_dict(config))
    result = trainer.fit()
    if dist.is_main and result.stop_reason not in ("interrupted", "SIGTERM", "stop_at_step"):
        mark_done(stage_dir, result, config.data.sources)
    distributed.barrier()
    return result
