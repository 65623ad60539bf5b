"""Causal self-attention with grouped-query heads, RoPE and a key/value cache.

Shapes follow the legend in `codeling.models.layers`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from codeling.models.layers import apply_rotary


class KVCache:
    """Preallocated keys and values of one attention layer, for `batch_size` sequences."""

    def __init__(self, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (B, K, max_len, E)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def append(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, K, T, E) at positions pos.. and return all cached (B, K, S, E)."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"cache has room for {self.max_len} positions but {end} were requested; "
                             "create the cache with a larger max_len")
        self.keys[:, :, pos:end] = k.to(self.keys.dtype)
        self.values[:, :, pos:end] = v.to(self.values.dtype)
        return self.keys[:, :, :end], self.values[:, :, :end]


class Attention(nn.Module):
    """Multi-head causal self-attention; parameter names match Llama's `self_attn` in transformers."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, T, E), (B, K, T, E)

        if cache is not None:
            k, v = cache.append(pos, k, v)  # (B, K, S, E)
            k, v = k.to(q.dtype), v.to(q.dtype)
        out = self._attend(q, k, v, pos)  # (B, H, T, E)
        out = out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return self.o_proj(out)  # (B, T, D)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
        length, total = q.shape[2], k.shape[2]
        gqa = self.n_heads != self.n_kv_heads
        if pos == 0 and length == total:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if length == 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        # Chunked prefill after earlier tokens: query i attends to cache positions <= pos + i.
        query_pos = torch.arange(pos, pos + length, device=q.device)[:, None]
        key_pos = torch.arange(total, device=q.device)[None, :]
        mask = key_pos <= query_pos  # (T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
