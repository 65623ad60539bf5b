"""AdamW with decay only on matrices, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from codeling.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed matrices and undecayed norms, biases and embeddings."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        is_embedding = "embed_tokens" in name
        marked = getattr(param, "_no_weight_decay", False)  # Mamba-2's A_log, D and dt_bias
        if param.dim() < 2 or is_embedding or marked or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Return AdamW over the model's parameter groups; fused where the device supports it."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr,
                             betas=(config.beta1, config.beta2), eps=1e-8, fused=fused)


def lr_at(step: int, progress: float, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) when `progress` (0..1) of the run is done.

    Linear warmup over warmup_steps, then either cosine decay to min_lr_ratio * lr, or
    warmup-stable-decay (WSD): constant until the last decay_fraction of the run, then linear
    decay to min_lr_ratio * lr. Progress is the fraction of the step, token or time budget used,
    whichever is furthest along, so a wall-clock-limited run still ends its decay on time.
    """
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    progress = min(max(progress, 0.0), 1.0)
    if step < config.warmup_steps:
        return peak * (step + 1) / (config.warmup_steps + 1)
    if config.schedule == "constant":
        return peak
    if config.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = 1.0 - config.decay_fraction
    if progress < decay_start:
        return peak
    return peak + (floor - peak) * (progress - decay_start) / max(config.decay_fraction, 1e-9)
