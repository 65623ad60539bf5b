"""LoRA: low-rank adapters on a frozen model, merged into the weights when saved.

`apply_lora(model, rank, alpha, targets)` replaces each `nn.Linear` whose attribute name is in
`targets` (for example q_proj, v_proj, in_proj) by a `LoRALinear` and freezes every other
parameter. A `LoRALinear` keeps the frozen `weight` and adds two trainable matrices:

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T,    A: (rank, in), B: (out, rank)

B starts at zero, so training starts exactly at the original model. `merged_copy(model)` returns
a plain model whose weights are W + (alpha / rank) B A, so a checkpoint saved from it loads
wherever the original did; `adapter_state_dict` returns only A and B,
which is what a resumed run needs on top of its starting weights.

MoE experts are 3-D parameter tensors, not `nn.Linear` modules, so adapters never reach them;
the router (`gate`) can be a target.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from codeling.errors import ConfigError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "in_proj", "out_proj")


class LoRALinear(nn.Linear):
    """An nn.Linear with a frozen weight and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a.to(x.dtype)),
                          self.lora_b.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged_weight(self) -> torch.Tensor:
        """Return W + scale * B A in the weight's dtype."""
        delta = self.scale * (self.lora_b.float() @ self.lora_a.float())
        return (self.weight.float() + delta).to(self.weight.dtype)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...],
               dropout: float = 0.0) -> list[str]:
    """Add adapters to the Linear layers named in `targets`, freeze the rest; return their names.

    Raises ConfigError when no layer matches, naming the Linear layers the model has.
    """
    if rank < 1:
        raise ConfigError([f"LoRA rank {rank} is invalid; use 1 or more (0 turns LoRA off)"])
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    replaced = []
    for module_name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear) \
                    and not isinstance(child, LoRALinear):
                setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
                replaced.append(f"{module_name}.{child_name}" if module_name else child_name)
    if not replaced:
        available = sorted({name.rsplit(".", 1)[-1] for name, child in model.named_modules()
                            if isinstance(child, nn.Linear)})
        raise ConfigError([f"train.lora_targets {list(targets)} match no Linear layer; this "
                           f"model has {', '.join(available)}"])
    return replaced


def has_lora(model: nn.Module) -> bool:
    """Return True when the model has LoRA adapters."""
    return any(isinstance(module, LoRALinear) for module in model.modules())


def merged_copy(model: nn.Module) -> nn.Module:
    """Return a copy of the model with each adapter merged into a plain nn.Linear.

    NOTE: the copy keeps a second set of weights in memory while it exists.
    """
    plain = copy.deepcopy(model)
    for module in list(plain.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                linear = nn.Linear(child.in_features, child.out_features,
                                   bias=child.bias is not None, device=child.weight.device,
                                   dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.merged_weight())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
    for parameter in plain.parameters():
        parameter.requires_grad_(True)
    return plain


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return only the adapter matrices (A and B of every LoRALinear)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()
            if name.endswith((".lora_a", ".lora_b"))}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter matrices saved by `adapter_state_dict` into a model with the same adapters."""
    own = adapter_state_dict(model)
    reshaped = [name for name in own if name in state and state[name].shape != own[name].shape]
    if reshaped:
        raise ConfigError([f"saved LoRA adapter {reshaped[0]} has shape "
                           f"{tuple(state[reshaped[0]].shape)}, not "
                           f"{tuple(own[reshaped[0]].shape)}; resume with the same train.lora_* "
                           "settings"])
    if set(own) != set(state):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ConfigError([f"saved LoRA adapters do not match this model (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); resume with the same train.lora_* "
                          "settings"])
    model.load_state_dict(state, strict=False)
