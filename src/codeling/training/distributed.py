"""Data-parallel training across processes started by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT) in each worker's
environment. `init_distributed` reads them once and joins the process group: gloo on a CPU,
nccl on CUDA with the worker's device set from LOCAL_RANK. A collective times out after
CODELING_DIST_TIMEOUT_MINUTES (default 120). A plain `codeling train` has none
of these variables, so it runs as world size 1 without a process group, and every helper here
is then a no-op.

The model is replicated with DistributedDataParallel (train.distributed=ddp) or sharded with
FSDP2's `fully_shard` (train.distributed=fsdp). Under FSDP every parameter and AdamW moment is
a DTensor that stores 1/world_size of the tensor on each rank. Checkpoints still contain full
tensors: `full_model` and `full_optimizer_state` gather them before rank 0 saves, and a sharded
model's `load_state_dict` and `shard_optimizer_state` cut full tensors back into shards. So a
checkpoint loads under any world size, under either strategy, and in `codeling generate`.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

from codeling.errors import CodelingError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Position of this process in a data-parallel job, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True when there is more than one process and so a process group."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes logs, metrics and checkpoints."""
        return self.rank == 0


_info = DistInfo()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise CodelingError(f"environment variable {name}={value!r} is invalid; torchrun sets "
                            "it to an integer, so unset it or launch with torchrun") from None


def init_distributed(device: torch.device | None = None) -> DistInfo:
    """Read torchrun's environment, join the process group if needed, and return the rank info.

    `device` is the device the config requests, and None means CUDA when available. On CUDA with
    world size > 1 the returned device is `cuda:LOCAL_RANK`. Calling this again returns the
    same info, so a pipeline of several stages joins the group once.
    """
    global _info
    if dist.is_available() and dist.is_initialized():
        return _info
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise CodelingError(f"RANK={rank} with WORLD_SIZE={world_size} is invalid; launch "
                            "with torchrun, which sets both")
    if world_size == 1:
        _info = DistInfo(rank, world_size, local_rank, device)
        return _info
    if not dist.is_available():
        raise CodelingError(f"WORLD_SIZE={world_size} but this PyTorch build has no "
                            "torch.distributed; run a single process or install a full build")
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            log.warning("train.device=%s ignored: rank %d uses cuda:%d (LOCAL_RANK)",
                        device, rank, local_rank)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    # Rank 0 trains the tokenizer and prepares data while the others wait in a collective,
    # so the timeout must cover that work, not only a training step.
    minutes = _env_int("CODELING_DIST_TIMEOUT_MINUTES", 120)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=minutes))
    atexit.register(destroy)
    _info = DistInfo(rank, world_size, local_rank, device)
    log.info("rank %d of %d joined the %s process group on %s", rank, world_size, backend, device)
    return _info


def info() -> DistInfo:
    """Return the info from the last `init_distributed` call (world size 1 before any)."""
    return _info


def is_main() -> bool:
    """Return True on rank 0, and in a single process."""
    return _info.is_main


def _collective_device() -> torch.device:
    # gloo reduces CPU tensors and nccl reduces CUDA tensors.
    return _info.device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(value: float | torch.Tensor) -> float:
    """Average a scalar over all ranks, or return it as a float in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    tensor = torch.as_tensor(value, dtype=torch.float64 if _info.device.type == "cpu"
                             else torch.float32).detach().to(_collective_device()).reshape(1)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / dist.get_world_size()


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a list of floats element-wise over all ranks with `op` ("sum" or "max")."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op {op!r} is invalid; use one of {sorted(ops)}")
    dtype = torch.float64 if _info.device.type == "cpu" else torch.float32
    tensor = torch.tensor(values, dtype=dtype, device=_collective_device())
    dist.all_reduce(tensor, op=ops[op])
    return tensor.tolist()


def broadcast_object(value: T) -> T:
    """Broadcast rank 0's `value` (any picklable object) and return it on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    """Wait until every rank reaches this call; a no-op in a single process."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main_first(fn: Callable[[], T], what: str) -> T:
    """Run `fn` on rank 0, then on the other ranks once rank 0 has succeeded.

    Use it for work that writes shared files (tokenizer training, data preparation): the
    other ranks then find the files and only load them. If rank 0 raises, the other ranks
    raise a CodelingError naming `what` instead of waiting forever.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    if _info.is_main:
        try:
            result = fn()
        except BaseException:
            broadcast_object(False)
            raise
        broadcast_object(True)
        return result
    if not broadcast_object(None):
        raise CodelingError(f"rank 0 failed while {what}; see its log for the error")
    return fn()


def destroy() -> None:
    """Leave the process group, if this process joined one."""
    global _info
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _info = DistInfo(device=_info.device)


STRATEGIES = ("ddp", "fsdp")


def wrap_model(model: torch.nn.Module, info: DistInfo, strategy: str = "ddp") -> torch.nn.Module:
    """Prepare `model` for data-parallel training when world size > 1, else return it unchanged.

    `strategy` "fsdp" shards the model in place (see `shard_model`) and returns it. "ddp" wraps
    it in DistributedDataParallel. Keep the unwrapped `model` for checkpoints, optimizer groups
    and model methods: the wrapper shares its parameters. Buffers are not broadcast from rank 0 on each forward,
    because MoE load counts are per-rank sums that `update_bias` all-reduces itself. MoE
    models set find_unused_parameters, since an expert that gets no token on one rank has
    no gradient there.
    """
    if strategy not in STRATEGIES:
        raise CodelingError(f"train.distributed={strategy!r} is invalid; use one of "
                            f"{', '.join(STRATEGIES)}")
    if not info.enabled:
        if strategy == "fsdp":
            log.info("train.distributed=fsdp has no effect in a single process")
        return model
    if strategy == "fsdp":
        return shard_model(model, info)
    from torch.nn.parallel import DistributedDataParallel

    config = getattr(model, "config", None)
    has_moe = config is not None and config.resolved_ffn() == "moe"
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # PyTorch 2.13 deprecates broadcast_buffers for forward_sync_buffers, which still syncs
    # buffers once at construction; that is harmless here because all ranks start equal.
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        buffer_option = {"forward_sync_buffers": False}
    else:
        buffer_option = {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=has_moe, **buffer_option)


# -- FSDP2 -----------------------------------------------------------------------------------------


def shard_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Shard `model` in place with FSDP2: each decoder layer, then the rest at the root.

    Each layer's parameters are gathered just before its forward and backward and freed
    after, and its gradients are reduce-scattered. The root group (embeddings, final norm,
    output head) stays gathered through a step. The sharded model's `load_state_dict` also
    accepts the full tensors of a checkpoint: every rank keeps its own shard of each.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    if frozen:
        raise CodelingError(f"train.distributed=fsdp needs every parameter trainable, but "
                            f"{frozen[0]} and {len(frozen) - 1} others are frozen (LoRA); "
                            "use train.distributed=ddp")
    # NOTE: tested on CPUs with gloo only; the same calls on CUDA with NCCL have not run.
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.register_load_state_dict_pre_hook(_shard_full_tensors)
    log.info("FSDP: %d decoder layers and the root sharded over %d processes",
             len(model.layers), info.world_size)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Return True for a model sharded by `shard_model`."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _shard_full_tensors(module: torch.nn.Module, state_dict: dict[str, Any], prefix: str,
                        *unused: Any) -> None:
    """Replace each full tensor aimed at a sharded parameter or buffer by this rank's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets = module.state_dict(keep_vars=True)
    for key, value in list(state_dict.items()):
        target = targets.get(key[len(prefix):]) if key.startswith(prefix) else None
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            # src_data_rank=None: each rank cuts its shard from its own copy, no communication.
            state_dict[key] = distribute_tensor(value.to(target.device, target.dtype),
                                                target.device_mesh, target.placements,
                                                src_data_rank=None)


def load_full_weights(model: torch.nn.Module, file: Path) -> tuple[list[str], list[str]]:
    """Load a safetensors file of full tensors into a sharded model; return (missing, unexpected).

    Every rank reads the whole file and keeps its own shards. A tied parameter stored under
    one of its names counts as loaded under all of them, as in safetensors' `load_model`.
    """
    from safetensors.torch import load_file

    state = load_file(str(file))
    targets = model.state_dict(keep_vars=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {id(targets[name]) for name in state if name in targets}
    return [name for name in missing if id(targets[name]) not in loaded], list(unexpected)


def _full_tensor(value: Any) -> Any:
    """Gather a DTensor into a full CPU tensor (a collective); return other values as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().cpu()
    return value


def full_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """Return a model with full tensors to save: `model` itself unless it is sharded.

    For a sharded model every rank must call this, because it gathers each tensor. Rank 0 gets
    an unsharded CPU copy of the model and the other ranks get None.
    """
    if not is_sharded(model):
        return model
    from codeling.models.decoder import CodeModel

    gathered: dict[int, torch.Tensor] = {}
    full: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in gathered:  # tied embeddings are gathered once
            gathered[id(tensor)] = _full_tensor(tensor.detach())
        if _info.is_main:
            full[name] = gathered[id(tensor)]
        else:
            gathered[id(tensor)] = None  # keep at most one gathered tensor on other ranks
    if not _info.is_main:
        return None
    with torch.device("meta"):
        copy = CodeModel(model.config)
    # assign=True takes the gathered tensors as the copy's parameters, without allocating.
    copy.load_state_dict(full, assign=True)
    return copy


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """Gather the sharded tensors of an optimizer `state_dict()`; return others unchanged.

    Collective when the state contains DTensors, so under FSDP call it on every rank.
    """
    per_param = state["state"]
    if not any(_is_dtensor(value) for values in per_param.values() for value in values.values()):
        return state
    full = {index: {key: _full_tensor(value) for key, value in per_param[index].items()}
            for index in sorted(per_param)}
    return {**state, "state": full}


def shard_optimizer_state(state: dict[str, Any],
                          optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Cut the full tensors of a saved optimizer state into the shards of `optimizer`'s params.

    Parameters are matched by their index across the param groups, the numbering that
    `Optimizer.state_dict` uses. Returns `state` unchanged when no parameter is sharded.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [param for group in optimizer.param_groups for param in group["params"]]
    if not any(isinstance(param, DTensor) for param in params):
        return state
    sharded = {}
    for index, values in state["state"].items():
        param = params[index]
        sharded[index] = {
            key: (distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                    src_data_rank=None)
                  if torch.is_tensor(value) and value.shape == param.shape else value)
            for key, value in values.items()}
    return {**state, "state": sharded}


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def skip_gradient_sync(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Return a context for a micro-batch whose gradients need not be synchronized yet.

    DDP skips its all-reduce until the last micro-batch of a step. FSDP reduce-scatters every
    micro-batch anyway: skipping would keep the full-size gradients of every layer on each rank,
    which is the memory that sharding saves.
    """
    if is_sharded(model):
        return contextlib.nullcontext()
    return model.no_sync()


def batches_for_rank(batches: Iterable[T], info: DistInfo,
                     lockstep: bool = False) -> Iterator[tuple[T, bool]]:
    """Yield (batch, counted) for this rank's share of `batches`: those at rank, rank + N, ...

    With `lockstep` (FSDP, whose every forward is a collective) all ranks run the same number
    of forward passes: a rank whose share is shorter repeats the first batch with counted=False,
    and its result must be ignored.
    """
    if not lockstep:
        for index, batch in enumerate(batches):
            if index % info.world_size == info.rank:
                yield batch, True
        return
    items = list(batches)
    rounds = -(-len(items) // info.world_size)
    for round_index in range(rounds):
        index = round_index * info.world_size + info.rank
        if index < len(items):
            yield items[index], True
        else:
            yield items[0], False
