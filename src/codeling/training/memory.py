"""Estimate the memory a training run needs, and check it against the device before training.

The estimate adds up, per process:
  weights      fp32 parameters, 4 bytes each
  gradients    fp32, 4 bytes per trainable parameter
  AdamW state  two fp32 moments, 8 bytes per trainable parameter
  activations  the tensors autograd keeps from the forward pass for the backward pass, for
               one micro-batch of train.batch_size x train.seq_len tokens
  workspace    memory that exists only for part of a step: the logits and their gradients,
               the layer being recomputed under activation checkpointing, bf16 copies of the
               weights under autocast, DDP's gradient buckets, FSDP's gathered parameters

The activation bytes per token of each layer type come from listing the tensors that layer's
forward saves for backward (see `_attention_bytes`, `_mlp_bytes`, `_moe_bytes`, `_mamba_bytes`).
tests/test_memory.py counts the saved tensors of the real model with saved-tensor hooks and
compares, and checks the whole estimate against the peak resident memory of a training step.

The estimate counts tensors only. The interpreter and libraries already loaded are not in
it (they are not in the free memory either), and neither are kernel caches: on a CPU, bf16
MoE training made oneDNN cache about 110 MB of kernels for the many matmul shapes of its
experts (4 layers, d_model 256, measured with ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 as control).

NOTE: torch.compile fuses operations and usually keeps fewer activations than eager mode, so
the estimate is high for compiled runs. An attention kernel that falls back to the math path
would keep (T x T) scores per head, which the estimate leaves out; the CPU and CUDA flash
kernels of PyTorch keep only the log-sum-exp per query. LoRA runs are counted as if every
weight trained, so their gradients and AdamW state are overestimated.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from codeling.config import ModelConfig, RunConfig, TrainConfig
from codeling.errors import ConfigError
from codeling.training import distributed
from codeling.training.distributed import DistInfo

log = logging.getLogger(__name__)

GIB = 2**30
FP32 = 4  # bytes per element
BF16 = 2
INDEX = 8  # int64 token ids and expert indices
# The peak while a checkpointed layer runs backward, as a multiple of the bytes it keeps: its
# recomputed activations plus the gradients its backward creates before it frees them. With
# 1.25 the estimate came out at 1.0 to 1.2 times the peak resident memory of training steps on
# a CPU, for each architecture with checkpointing on (tests/test_memory.py).
RECOMPUTE_FACTOR = 1.25


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts the estimate needs, taken from a model built on the meta device."""

    total: int  # unique parameters; tied embeddings count once
    cast: int  # parameters that bf16 autocast copies to bf16 (matmul and conv weights)
    root: int  # parameters outside the decoder layers: embeddings, final norm, output head
    largest_layer: int  # parameters of the largest decoder layer
    root_cast: int  # the part of `cast` outside the decoder layers (the output head)
    largest_layer_cast: int  # the part of `cast` in the largest decoder layer


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training process, in bytes, split by what uses it."""

    weights: int
    gradients: int
    optimizer: int
    activations: int  # kept for backward, one micro-batch
    workspace: int  # transient buffers at the peak of a step
    batch_size: int  # sequences per micro-batch the activations are for
    bytes_per_sequence: float  # activation and workspace bytes that scale with batch_size
    description: str  # the settings the activation figure depends on

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace

    @property
    def fixed(self) -> int:
        """Bytes that do not change with train.batch_size."""
        return self.total - round(self.bytes_per_sequence * self.batch_size)

    def summary(self) -> str:
        """Return one line with the total and each part."""
        parts = [("weights", self.weights), ("gradients", self.gradients),
                 ("AdamW state", self.optimizer), ("activations", self.activations),
                 ("workspace", self.workspace)]
        return (f"{format_bytes(self.total)} = "
                + " + ".join(f"{name} {format_bytes(size)}" for name, size in parts)
                + f" ({self.description})")


def format_bytes(size: float) -> str:
    """Format a byte count in GiB, or in MiB below 1 GiB."""
    if size >= GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / 2**20:.1f} MiB"


# -- parameter counts ----------------------------------------------------------------------------


def count_parameters(config: ModelConfig) -> ParameterCounts:
    """Count parameters by building the model on the meta device, which allocates nothing."""
    from codeling.models.decoder import CodeModel

    with torch.device("meta"):
        model = CodeModel(config)
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    layers_cast = [sum(p.numel() for p in layer.parameters() if p.dim() >= 2)
                   for layer in model.layers]
    root_cast = model.lm_head.weight.numel()  # the embedding lookup itself is not cast
    total = model.num_parameters()
    return ParameterCounts(total=total, cast=sum(layers_cast) + root_cast,
                           root=total - sum(layers), largest_layer=max(layers),
                           root_cast=root_cast, largest_layer_cast=max(layers_cast))


# -- activations, in bytes per token -------------------------------------------------------------
# Each helper lists what one layer's forward keeps for backward. `width` is the byte width of
# matmul outputs: 2 under bf16 autocast, 4 in fp32. The residual stream, the norms, the
# Mamba-2 scan and the MoE router compute in fp32 either way.


def _norm_bytes(d_model: int, bf16: bool, consumers: int) -> float:
    """RMSNorm before `consumers` matmuls: its input, the normalized x, 1/rms and its output.

    In fp32 the matmuls share the norm's output. Under autocast each matmul keeps its own bf16
    copy of it instead.
    """
    kept = 2 * FP32 * d_model + FP32
    return kept + (consumers * BF16 * d_model if bf16 else FP32 * d_model)


def _attention_bytes(config: ModelConfig, bf16: bool) -> float:
    """Norm, then q and k after RoPE, v, the attention output and the log-sum-exp per head."""
    width = BF16 if bf16 else FP32
    kv = config.resolved_kv_heads() * config.head_dim
    return (_norm_bytes(config.d_model, bf16, consumers=3)
            + width * (2 * config.d_model + 2 * kv) + FP32 * config.n_heads)


def _mlp_bytes(d_model: int, d_ff: int, bf16: bool) -> float:
    """Norm, then SwiGLU's gate, silu(gate), up and their product."""
    width = BF16 if bf16 else FP32
    return _norm_bytes(d_model, bf16, consumers=2) + 4 * width * d_ff


def _moe_bytes(config: ModelConfig, bf16: bool) -> float:
    """Norm, router, the tokens copied to each chosen expert, each expert's SwiGLU, combine."""
    width = BF16 if bf16 else FP32
    d_model, k, experts = config.d_model, config.top_k, config.n_experts
    d_ff = config.resolved_moe_d_ff()
    norm = _norm_bytes(d_model, bf16, consumers=2 if config.shared_d_ff else 0)
    if bf16:
        norm += FP32 * d_model  # the router reads the fp32 norm output, so it is kept too
    # Router: logits and two softmaxes (X each), expert indices, weights and token positions.
    router = 3 * FP32 * experts + 3 * FP32 + k * (INDEX + FP32) + k * (2 * INDEX + FP32)
    # Each token is gathered once per chosen expert: kept in fp32, while autocast keeps only
    # each expert's bf16 copy of its tokens.
    routed = 0 if bf16 else k * FP32 * d_model
    per_assignment = (BF16 * d_model if bf16 else 0) + 4 * width * d_ff
    combine = k * (width + FP32) * d_model  # expert outputs, then scaled by the routing weights
    shared = 4 * width * config.shared_d_ff
    return norm + router + routed + k * per_assignment + combine + shared


def _mamba_bytes(config: ModelConfig, bf16: bool, seq_len: int) -> float:
    """Norm, in_proj, the causal conv, the chunked SSD scan and the gated RMSNorm.

    The scan runs in fp32 on sequences padded to whole chunks. Its per-chunk states (I x N)
    are per sequence, so they are spread over the sequence's tokens here.
    """
    width = BF16 if bf16 else FP32
    inner = config.ssm_expand * config.d_model  # I
    heads = inner // config.ssm_head_dim  # H
    group_state = config.ssm_groups * config.ssm_state  # G * N
    conv_channels = inner + 2 * group_state  # W
    chunk = config.ssm_chunk  # C
    chunks = math.ceil(seq_len / chunk)  # M
    padded = chunks * chunk / seq_len  # padded tokens per real token

    total = _norm_bytes(config.d_model, bf16, consumers=1)
    total += width * (2 * inner + 2 * group_state + heads)  # in_proj output: z, x, B, C, dt
    total += width * conv_channels * (seq_len + config.ssm_conv - 1) / seq_len  # conv output
    # The scan's x: a view of the silu output in fp32, an fp32 copy under autocast.
    total += FP32 * (inner if bf16 else conv_channels)
    total += 2 * FP32 * heads  # dt before and after softplus
    # Inside chunks: decay and weight matrices (C per head), C.B scores (C per group), copies
    # of B and C for the einsums, x * dt with two rearranged copies and the output from states.
    scan = (2 * FP32 * heads * chunk + FP32 * config.ssm_groups * chunk
            + 4 * FP32 * group_state + 4 * FP32 * inner + 2 * FP32 * heads)
    total += padded * scan
    if chunks * chunk > seq_len:
        total += padded * FP32 * (inner + heads)  # zero-padded copies of x and dt
    total += FP32 * inner * config.ssm_state * (2 * chunks + 1) / seq_len  # chunk states
    # Gated RMSNorm: y, silu(z), their product, the normalized product and the output (bf16
    # under autocast, which also keeps an fp32 copy of z).
    total += (4 * FP32 * inner + width * inner + (FP32 * inner if bf16 else 0)
              + FP32 * config.ssm_groups)
    return total


def layer_activation_bytes(config: ModelConfig, kind: str, bf16: bool, seq_len: int) -> float:
    """Return the bytes per token one decoder layer keeps for backward; `kind` is A or M."""
    if kind == "A":
        total = _attention_bytes(config, bf16)
    elif kind == "M":
        total = _mamba_bytes(config, bf16, seq_len)
    else:
        raise ValueError(f"unknown layer letter {kind!r}; allowed: A, M")
    ffn = config.resolved_ffn()
    if ffn == "mlp":
        total += _mlp_bytes(config.d_model, config.resolved_d_ff(), bf16)
    elif ffn == "moe":
        total += _moe_bytes(config, bf16)
    return total


def head_activation_bytes(config: ModelConfig, bf16: bool) -> float:
    """Return the bytes per token kept outside the layers: token ids, final norm, log-softmax."""
    return 2 * INDEX + _norm_bytes(config.d_model, bf16, consumers=1) + FP32 * config.vocab_size


def logits_workspace_bytes(config: ModelConfig, bf16: bool) -> float:
    """Return the transient bytes per token around the loss, beyond the kept log-softmax.

    In backward the gradient of the log-softmax and the gradient of the logits exist together
    (fp32). Under autocast the bf16 gradient of the head's output joins them.
    """
    return (2 * FP32 + (BF16 if bf16 else 0)) * config.vocab_size


# -- the estimate --------------------------------------------------------------------------------


def estimate_memory(model: ModelConfig, train: TrainConfig, bf16: bool, world_size: int = 1,
                    sharded: bool = False, counts: ParameterCounts | None = None) -> MemoryEstimate:
    """Estimate the peak memory of one training process; `model.vocab_size` must be set.

    `world_size` > 1 adds DDP's gradient buckets, or with `sharded` (FSDP) divides weights,
    gradients and AdamW state by the world size and adds the gathered layers.
    """
    if model.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set before estimating memory")
    counts = counts or count_parameters(model)
    seq_len, batch = train.seq_len, train.batch_size
    pattern = model.resolved_layer_pattern()
    per_layer = [layer_activation_bytes(model, kind, bf16, seq_len) for kind in pattern]
    head = head_activation_bytes(model, bf16)
    head_workspace = logits_workspace_bytes(model, bf16)

    # The peak comes at the loss, where the logits' gradients join everything kept for backward,
    # or, with checkpointing, while one layer is recomputed on top of every layer's input.
    layer_inputs = len(pattern) * FP32 * model.d_model
    if not train.activation_checkpointing:
        kept_per_token, transient_per_token = sum(per_layer) + head, head_workspace
    elif head + head_workspace >= RECOMPUTE_FACTOR * max(per_layer):
        kept_per_token, transient_per_token = layer_inputs + head, head_workspace
    else:
        kept_per_token = layer_inputs + max(per_layer)
        transient_per_token = (RECOMPUTE_FACTOR - 1) * max(per_layer)
    tokens = batch * seq_len
    activations = round(kept_per_token * tokens)
    # A new gradient is a tensor of its own until it is added into .grad. That matters most
    # for the output head, whose gradient is the largest.
    workspace = round(transient_per_token * tokens) + FP32 * counts.root_cast
    if bf16:
        # Autocast's bf16 weight copies are kept for backward. Checkpointed layers drop theirs
        # after the forward pass and make them again one layer at a time.
        workspace += BF16 * (counts.cast if not train.activation_checkpointing
                             else counts.root_cast + counts.largest_layer_cast)

    share = world_size if sharded and world_size > 1 else 1
    weights = math.ceil(FP32 * counts.total / share)
    gradients = weights
    optimizer = 2 * weights
    if share > 1:
        # The root's parameters stay gathered for the whole step. Two layers are gathered at
        # a time (the current one and the prefetched next), each with a full-size gradient.
        workspace += 2 * FP32 * (counts.root + 2 * counts.largest_layer)
    elif world_size > 1:
        workspace += FP32 * counts.total  # DDP's gradient buckets

    description = (f"{batch} x {seq_len} tokens per micro-batch, "
                   f"{'bf16 autocast' if bf16 else 'fp32'}, activation checkpointing "
                   f"{'on' if train.activation_checkpointing else 'off'}")
    if share > 1:
        description += f", FSDP over {share} processes"
    return MemoryEstimate(weights, gradients, optimizer, activations, workspace, batch,
                          (kept_per_token + transient_per_token) * seq_len, description)


# -- the device's free memory and the check ------------------------------------------------------


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file gives kB
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    """Return the room left under this process's cgroup v2 memory limit, or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return None
    if limit == "max":
        return None
    return max(int(limit) - int(used), 0)


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """Return the bytes free for training on `device` and where that figure comes from.

    CUDA reports free device memory. On a CPU it is MemAvailable from /proc/meminfo (or
    psutil where /proc is missing), lowered to the room under a cgroup memory limit. None
    means the figure is unknown.
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free of {total / GIB:.1f} GiB on {torch.cuda.get_device_name(device)}"
    available, source = _meminfo_available(), "MemAvailable in /proc/meminfo"
    if available is None:
        try:
            import psutil
        except ImportError:
            return None, "unknown (no /proc/meminfo and no psutil)"
        available, source = psutil.virtual_memory().available, "psutil available memory"
    room = _cgroup_available()
    if room is not None and room < available:
        available, source = room, "room under the cgroup memory limit"
    return available, source


def processes_per_device(device: torch.device, world_size: int) -> int:
    """Return how many training processes share this device's memory.

    Each CUDA process has a GPU of its own; on a CPU every process of this node shares the
    RAM (torchrun sets LOCAL_WORLD_SIZE).
    """
    if device.type == "cuda":
        return 1
    try:
        return max(int(os.environ.get("LOCAL_WORLD_SIZE", "") or world_size), 1)
    except ValueError:
        return world_size


def largest_fitting_batch(estimate: MemoryEstimate, budget: float) -> int:
    """Return the largest train.batch_size whose estimate fits in `budget` bytes (0 if none)."""
    if estimate.bytes_per_sequence <= 0:
        return estimate.batch_size
    return max(int((budget - estimate.fixed) // estimate.bytes_per_sequence), 0)


def check_memory(model: ModelConfig, train: TrainConfig, bf16: bool, device: torch.device,
                 world_size: int = 1, sharded: bool = False) -> MemoryEstimate:
    """Log the memory estimate beside the device's free memory; raise if it does not fit.

    Raises ConfigError naming the settings that lower the estimate when it exceeds the free
    memory and `train.memory_check` is on; otherwise only logs a warning.
    """
    counts = count_parameters(model)
    estimate = estimate_memory(model, train, bf16, world_size, sharded, counts)
    processes = processes_per_device(device, world_size)
    available, source = available_memory(device)
    per_process = "" if processes == 1 else f" x {processes} processes on this {device.type}"
    log.info("memory estimate per process: %s", estimate.summary())
    if available is None:
        log.info("free memory on %s: %s, so the estimate is not checked", device, source)
        return estimate
    needed = estimate.total * processes
    log.info("free memory on %s: %s (%s); the run needs about %s%s", device,
             format_bytes(available), source, format_bytes(needed), per_process)
    if needed <= available:
        return estimate
    message = _does_not_fit(model, train, bf16, estimate, available / processes, counts,
                            world_size, sharded)
    if not train.memory_check:
        log.warning("%s", message)
        return estimate
    raise ConfigError([message + "; or set train.memory_check=false to train anyway"])


def _does_not_fit(model: ModelConfig, train: TrainConfig, bf16: bool, estimate: MemoryEstimate,
                  budget: float, counts: ParameterCounts, world_size: int,
                  sharded: bool) -> str:
    """Describe the shortfall and the settings that would lower the estimate."""
    fixes = []
    batch = largest_fitting_batch(estimate, budget)
    if 0 < batch < train.batch_size:
        # The largest batch that fits and divides the global batch, so grad_accum keeps it.
        global_batch = train.batch_size * train.grad_accum
        batch = max(size for size in range(1, batch + 1) if global_batch % size == 0)
        fixes.append(f"train.batch_size={batch} with train.grad_accum={global_batch // batch} "
                     "(the same global batch)")
    if not train.activation_checkpointing:
        checkpointed = estimate_memory(
            model, dataclasses.replace(train, activation_checkpointing=True), bf16,
            world_size, sharded, counts)
        fixes.append(f"train.activation_checkpointing=true "
                     f"({format_bytes(checkpointed.total)})")
    fixes.append(f"a lower train.seq_len (now {train.seq_len})")
    if world_size > 1 and not sharded:
        fixes.append("train.distributed=fsdp to shard weights and AdamW state")
    fixes.append("a smaller model (fewer model.n_layers or a smaller model.d_model)")
    if batch == 0:
        fixes.insert(0, "a device with more memory: even train.batch_size=1 does not fit")
    return (f"training needs about {estimate.summary()} per process, but only "
            f"{format_bytes(budget)} is free per process; to fit, use {', or '.join(fixes)}")


def check_run(config: RunConfig, vocab_size: int, bf16: bool, dist: DistInfo) -> None:
    """Check a run's memory on rank 0 before the model is built; raise on every rank if short.

    `vocab_size` is the tokenizer's, used when `model.vocab_size` is 0. Every rank raises the
    same ConfigError, so none is left waiting in a collective.
    """
    model = dataclasses.replace(config.model, vocab_size=config.model.vocab_size or vocab_size)
    problems = None
    if dist.is_main:
        try:
            check_memory(model, config.train, bf16, dist.device, dist.world_size,
                         sharded=config.train.distributed == "fsdp")
        except ConfigError as error:
            problems = error.problems
    problems = distributed.broadcast_object(problems)
    if problems:
        raise ConfigError(problems)
