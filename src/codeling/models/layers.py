"""Building blocks shared by every architecture: RMSNorm, rotary embeddings, SwiGLU.

Shape legend used in the model files:
    B batch, T tokens in this call, S tokens in the cache (past + current),
    D d_model, H query heads, K key/value heads, E head size, F feed-forward size, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, computed in fp32 for stability."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with the half-split layout used by Llama in transformers."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_seq_len = max_seq_len
        cos, sin = self._table(max_seq_len)
        # Buffers are not saved in checkpoints: they are a pure function of the config.
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, E)
        self.register_buffer("sin", sin, persistent=False)

    def _table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = torch.outer(torch.arange(length).float(), inv_freq)  # (length, E/2)
        angles = torch.cat([angles, angles], dim=-1)  # (length, E)
        return angles.cos(), angles.sin()

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin) for positions start .. start+length-1, each (length, E)."""
        end = start + length
        if end > self.cos.shape[0]:
            raise ValueError(f"position {end - 1} is past the model's max_seq_len "
                             f"({self.max_seq_len}); shorten the input or raise model.max_seq_len")
        return self.cos[start:end], self.sin[start:end]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, E) by per-position angles (T, E), in x's dtype as Llama does."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class SwiGLU(nn.Module):
    """Gated feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, D)
