"""Device selection, bf16 autocast support and peak matmul throughput for MFU."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path

import torch

from codeling.errors import CodelingError

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks in FLOP/s from the vendors' data sheets (without sparsity).
CUDA_BF16_PEAKS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "A6000": 155e12, "L40S": 362e12,
}


def resolve_device(name: str) -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a device, with an error if it is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CodelingError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CodelingError(f"device {name!r} requested but CUDA is not available; "
                            "use --set train.device=cpu or auto")
    return device


def cpu_supports_bf16() -> bool:
    """Return True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def use_bf16(precision: str, device: torch.device) -> bool:
    """Decide whether to autocast to bf16 for a precision setting on a device."""
    if precision == "fp32":
        return False
    supported = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                 else cpu_supports_bf16())
    if precision == "bf16" and not supported:
        log.warning("bf16 requested but %s has no native bf16 support; it will be slow", device)
    return precision == "bf16" or supported


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Return a bf16 autocast context for the device, or a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(device_type: str, bf16: bool, size: int = 1024, seconds: float = 1.0,
                        windows: int = 5) -> float:
    """Measure the achieved FLOP/s of a square matmul: the ceiling MFU is computed against.

    The time is cut into `windows`, and the fastest one counts, because a peak is what the
    machine can reach. A single 0.5 s timing on a 2-core CPU read 41 GFLOP/s at the start of
    one training run and 64 GFLOP/s at the start of another.
    """
    device = torch.device(device_type)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b  # warm up kernels and caches
    best = 0.0
    for _ in range(max(1, windows)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / max(1, windows):
            a @ b
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
    return best


def peak_flops(device: torch.device, bf16: bool) -> tuple[float, str]:
    """Return the device's peak FLOP/s and where that figure came from."""
    if device.type == "cuda" and bf16:
        name = torch.cuda.get_device_name(device)
        for key, flops in CUDA_BF16_PEAKS.items():
            if key in name:
                return flops, f"bf16 data sheet figure for {name}"
    flops = measure_matmul_peak(device.type, bf16)
    kind = "bf16" if bf16 else "fp32"
    return flops, f"measured {kind} 1024x1024 matmul on {device.type}"
