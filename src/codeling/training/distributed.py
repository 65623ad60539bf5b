"""Data-parallel training across processes started by torchrun.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR/MASTER_PORT) in each worker's
environment. `init_distributed` reads them once and joins the process group: gloo on a CPU,
nccl on CUDA with the worker's device set from LOCAL_RANK. A collective times out after
CODELING_DIST_TIMEOUT_MINUTES (default 120). A plain `codeling train` has none
of these variables, so it runs as world size 1 without a process group, and every helper here
is then a no-op.
"""

from __future__ import annotations

import atexit
import datetime
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

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


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Wrap `model` in DistributedDataParallel when world size > 1, else return it unchanged.

    Keep the unwrapped `model` for checkpoints, optimizer groups and model methods: the
    wrapper shares its parameters. Buffers are not broadcast from rank 0 on each forward,
    because MoE load counts are per-rank sums that `update_bias` all-reduces itself. MoE
    models set find_unused_parameters, since an expert that gets no token on one rank has
    no gradient there.
    """
    if not info.enabled:
        return model
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
