"""Int8 weight-only quantization of a `CodeModel` for CPU serving.

Every `nn.Linear` except the MoE router becomes a `QuantizedLinear`: int8 weights with one
symmetric fp32 scale per output channel (row), `scale = max |row| / 127`. Activations stay
in floating point. Left as they were:

- the input embedding, because a lookup gains nothing from int8 and a tied output head gets
  its own int8 copy,
- norms, the Mamba-2 conv and SSM parameters (`A_log`, `D`, `dt_bias`), which are small and
  sensitive,
- the MoE router (`moe.gate`), because `MoEFeedForward` reads `gate.weight` directly and a
  rounding error there changes which experts are chosen,
- the 3-D MoE expert tensors (`experts.gate_up_proj`, `experts.down_proj`), which are
  `nn.Parameter`s used through `F.linear` per expert, not `nn.Linear` modules.

A quantized checkpoint is an ordinary checkpoint directory whose meta.json has
`"quantization": "int8-weight-only"` and whose model.safetensors stores `<name>.weight_int8`
(int8, (out, in)) and `<name>.weight_scale` (fp32, (out,)) for each quantized layer.
`load_model_from_checkpoint` reads both kinds of checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn

from codeling.errors import CheckpointError, CodelingError
from codeling.models.decoder import CodeModel
from codeling.training import checkpoint as ckpt

QUANTIZATION = "int8-weight-only"
KERNELS = ("auto", "int8pack", "reference")

# Modules kept in floating point even though they are nn.Linear (see the module docstring).
_SKIPPED_SUFFIXES = ("moe.gate",)


def _int8pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class QuantizedLinear(nn.Module):
    """A bias-free or biased linear layer with int8 weights and per-output-channel fp32 scales.

    `kernel` picks the matmul:

    - `reference` dequantizes the weight to the input dtype and calls `F.linear`. It is exact
      up to fp32 rounding and runs on any device.
    - `int8pack` calls `torch.ops.aten._weight_int8pack_mm` with bf16 activations and scales,
      then casts back. With torch 2.13 on a 2-core AVX512 CPU, its fp32 kernel measured 4-40x
      slower than fp32 `F.linear`, and its bf16 kernel about as fast (704x256 weight) to 2.7x
      faster (4096x256), so this path rounds activations to bf16.
    - `auto` uses `int8pack` for CPU inputs when torch has the op and `reference` otherwise.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise CodelingError(f"unknown int8 kernel {kernel!r}; choose one of {KERNELS}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = kernel
        self.register_buffer("weight_int8",
                             torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto") -> "QuantizedLinear":
        """Quantize an `nn.Linear` per output channel, symmetric, into a new module."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        weight_int8, scale = quantize_weight(linear.weight.detach())
        module = module.to(linear.weight.device)
        module.weight_int8.copy_(weight_int8)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the weight as floating point, (out, in)."""
        return (self.weight_int8.to(torch.float32) * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_int8pack(x):
            return self._forward_int8pack(x)
        return self._forward_reference(x)

    def _use_int8pack(self, x: torch.Tensor) -> bool:
        if self.kernel == "reference":
            return False
        if self.kernel == "int8pack":
            return True
        return x.device.type == "cpu" and _int8pack_available()

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _forward_int8pack(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8,
                                                 self.weight_scale.to(torch.bfloat16))
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight per row to int8 in [-127, 127]; return (int8 weight, fp32 scale).

    An all-zero row gets scale 1 so that dequantizing it returns zeros instead of NaN.
    """
    weight = weight.float()
    scale = weight.abs().amax(dim=1) / 127.0  # (out,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    weight_int8 = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return weight_int8, scale


def quantize_model(model: CodeModel, kernel: str = "auto") -> CodeModel:
    """Replace the model's `nn.Linear` layers in place with `QuantizedLinear`; return the model.

    A tied output head is quantized on its own, so the input embedding keeps its fp32 table.
    """
    if kernel not in KERNELS:
        raise CodelingError(f"unknown int8 kernel {kernel!r}; choose one of {KERNELS}")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not name.endswith(_SKIPPED_SUFFIXES)]
    for name, linear in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, QuantizedLinear.from_linear(linear, kernel))
    return model


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Set the matmul kernel of every `QuantizedLinear` in `model`."""
    if kernel not in KERNELS:
        raise CodelingError(f"unknown int8 kernel {kernel!r}; choose one of {KERNELS}")
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.kernel = kernel


def is_quantized(meta: dict) -> bool:
    """Return True when a checkpoint's meta.json marks int8 weights, and reject unknown schemes."""
    scheme = meta.get("quantization")
    if scheme is None:
        return False
    if scheme != QUANTIZATION:
        raise CheckpointError(f"meta.json names quantization {scheme!r}, which this version "
                              f"cannot load; only {QUANTIZATION!r} is supported")
    return True


def load_model_from_checkpoint(path: str | Path | ckpt.LoadedCheckpoint) -> CodeModel:
    """Build the model of a checkpoint, int8 or not, and load its weights on the CPU.

    `path` is a run, stage or checkpoint directory, or an already read `LoadedCheckpoint`.
    The tokenizer is not checked here, so call `check_tokenizer` as for any checkpoint.
    """
    loaded = path
    if not isinstance(loaded, ckpt.LoadedCheckpoint):
        loaded = ckpt.read_checkpoint_config(ckpt.resolve_checkpoint(path))
    model = CodeModel(loaded.config.model)
    if is_quantized(loaded.meta):
        quantize_model(model)  # builds the int8 buffers; load_weights overwrites their values
    ckpt.load_weights(model, loaded.path)
    return model.eval()


def save_quantized(model: CodeModel, source: ckpt.LoadedCheckpoint, out_dir: str | Path) -> Path:
    """Write a quantized model as a checkpoint directory next to its source's config.

    `out_dir` must be new or empty. The directory gets model.safetensors, the source's
    config.json and tokenizer.json, and its meta.json plus `quantization` and
    `source_checkpoint`. It is written under a temporary name and renamed into place.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CodelingError(f"output {str(out_dir)!r} exists and is not an empty directory; "
                            "pass a new or empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_model(model, str(temp / "model.safetensors"))
        shutil.copy(source.path / "config.json", temp / "config.json")
        shutil.copy(source.tokenizer_path, temp / "tokenizer.json")
        meta = {**source.meta, "quantization": QUANTIZATION,
                "source_checkpoint": str(source.path)}
        (temp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out_dir


def quantize_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Quantize the newest checkpoint under a run, stage or checkpoint directory into `out_dir`."""
    loaded = ckpt.read_checkpoint_config(ckpt.resolve_checkpoint(checkpoint))
    if is_quantized(loaded.meta):
        raise CodelingError(f"checkpoint {loaded.path} is already quantized "
                            f"({QUANTIZATION}); pass the floating-point checkpoint it was made "
                            f"from ({loaded.meta.get('source_checkpoint', 'unknown')})")
    if not loaded.tokenizer_path.is_file():
        raise CheckpointError(f"checkpoint {loaded.path} has no tokenizer.json; use a "
                              "checkpoint written by codeling train or quickstart")
    model = quantize_model(load_model_from_checkpoint(loaded))
    return save_quantized(model, loaded, out_dir)


def load_quantized(path: str | Path) -> CodeModel:
    """Load an int8 checkpoint directory; raise if it is not quantized."""
    loaded = ckpt.read_checkpoint_config(ckpt.resolve_checkpoint(path))
    if not is_quantized(loaded.meta):
        raise CodelingError(f"checkpoint {loaded.path} is not quantized; create one with "
                            f"`codeling quantize {path} OUT`")
    return load_model_from_checkpoint(loaded)
