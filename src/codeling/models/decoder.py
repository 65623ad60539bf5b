"""`CodeModel`: one decoder class for every architecture, built from a layer pattern.

Each layer is a pre-norm mixer followed by a pre-norm feed-forward block. The pattern string has
one letter per layer; `A` is causal self-attention with a SwiGLU MLP. Parameter names follow
Llama in transformers (`embed_tokens`, `layers.N.self_attn.q_proj`, `layers.N.mlp.gate_proj`,
`norm`, `lm_head`), so export is a renaming.

Shapes follow the legend in `codeling.models.layers`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from codeling.config import ModelConfig
from codeling.models.attention import Attention, KVCache
from codeling.models.layers import RMSNorm, RotaryEmbedding, SwiGLU


class DecoderLayer(nn.Module):
    """x + mixer(norm(x)), then + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        if kind != "A":
            raise ValueError(f"unknown layer letter {kind!r}; allowed: A")
        self.kind = kind
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.self_attn = Attention(config.d_model, config.n_heads, config.resolved_kv_heads())
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.resolved_d_ff())

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, pos: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))  # (B, T, D)


@dataclass
class ModelCache:
    """Per-layer decoding state for a batch of sequences and the number of positions filled."""

    layers: list[KVCache]
    pos: int = 0

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len


class CodeModel(nn.Module):
    """Decoder-only language model: embeddings, a stack of layers, final norm, output head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (the run sets it from the tokenizer)")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(
            DecoderLayer(config, kind) for kind in config.resolved_layer_pattern())
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialize weights: normal(0, init_std), residual outputs scaled by 1/sqrt(2 * layers)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * len(self.layers))
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue  # norm gains stay at 1
            is_residual_output = name.endswith(("o_proj.weight", "down_proj.weight"))
            nn.init.normal_(param, mean=0.0, std=residual_std if is_residual_output else std)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> ModelCache:
        """Return an empty decoding cache for `batch_size` sequences of up to `max_len` tokens."""
        max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        device = self.embed_tokens.weight.device
        dtype = dtype or self.embed_tokens.weight.dtype
        layers = [KVCache(batch_size, max_len, self.config.resolved_kv_heads(),
                          self.config.head_dim, device, dtype) for _ in self.layers]
        return ModelCache(layers)

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """Return logits (B, T, V) for tokens (B, T); with a cache, continue from cache.pos."""
        pos = cache.pos if cache is not None else 0
        cos, sin = self.rotary(pos, tokens.shape[1])  # (T, E)
        x = self.embed_tokens(tokens)  # (B, T, D)
        for index, layer in enumerate(self.layers):
            layer_cache = cache.layers[index] if cache is not None else None
            x = layer(x, cos, sin, layer_cache, pos)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if cache is not None:
            cache.pos = pos + tokens.shape[1]
        return logits

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor,
             ignore_index: int = -100) -> torch.Tensor:
        """Return the mean next-token cross-entropy in nats; targets (B, T)."""
        logits = self(tokens)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=ignore_index)

    # -- accounting -----------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Count unique parameters; optionally leave out the input embedding table."""
        total = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Estimate training FLOPs per token (forward + backward) at a given sequence length.

        6 FLOPs per weight per token for the matmuls, plus attention scores and weighted sums:
        12 * layers * d_model * seq_len, halved because the causal mask skips half of them in
        kernels that use it. The input embedding is a lookup, so it is not counted; the output
        head is.
        """
        config = self.config
        matmul_params = self.num_parameters(exclude_embeddings=True)
        if config.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        attention_layers = config.resolved_layer_pattern().count("A")
        attention = 12 * attention_layers * config.d_model * seq_len / 2
        return 6 * matmul_params + attention
