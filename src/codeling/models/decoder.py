"""`CodeModel`: one decoder class for every architecture, built from a layer pattern.

Each layer is a pre-norm mixer followed by a pre-norm feed-forward block. The pattern string has
one letter per layer: `A` is causal self-attention and `M` is a Mamba-2 mixer. The feed-forward
is a SwiGLU MLP, a mixture of experts, or none. Parameter names follow transformers (Llama's
`embed_tokens`, `layers.N.self_attn.q_proj`, `layers.N.mlp.gate_proj`, `norm`, `lm_head`;
Mamba2's mixer and Mixtral's expert layout), so export is a renaming.

Shapes follow the legend in `codeling.models.layers`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from codeling.config import ModelConfig
from codeling.models.attention import Attention, KVCache
from codeling.models.layers import RMSNorm, RotaryEmbedding, SwiGLU
from codeling.models.mamba import Mamba2Mixer, MambaCache
from codeling.models.moe import MoEFeedForward


class DecoderLayer(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)) unless the layer has no feed-forward.

    The mixer is `self_attn` (letter A) or `mamba` (letter M); the feed-forward is `mlp`
    (SwiGLU), `moe` (routed experts) or absent.
    """

    def __init__(self, config: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        if kind == "A":
            self.self_attn = Attention(config.d_model, config.n_heads, config.resolved_kv_heads())
        elif kind == "M":
            self.mamba = Mamba2Mixer(config.d_model, d_state=config.ssm_state,
                                     d_conv=config.ssm_conv, expand=config.ssm_expand,
                                     head_dim=config.ssm_head_dim, n_groups=config.ssm_groups,
                                     chunk_size=config.ssm_chunk, norm_eps=config.norm_eps)
        else:
            raise ValueError(f"unknown layer letter {kind!r}; allowed: A, M")
        self.ffn_kind = config.resolved_ffn()
        if self.ffn_kind != "none":
            self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)
        if self.ffn_kind == "mlp":
            self.mlp = SwiGLU(config.d_model, config.resolved_d_ff())
        elif self.ffn_kind == "moe":
            self.moe = MoEFeedForward(config.d_model, config.resolved_moe_d_ff(),
                                      config.n_experts, config.top_k,
                                      shared_d_ff=config.shared_d_ff, balancer=config.balancer,
                                      aux_loss_coef=config.aux_loss_coef,
                                      z_loss_coef=config.z_loss_coef)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | MambaCache | None, pos: int) -> torch.Tensor:
        if self.kind == "A":
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        else:
            x = x + self.mamba(self.input_layernorm(x), cache)
        if self.ffn_kind == "mlp":
            x = x + self.mlp(self.post_attention_layernorm(x))
        elif self.ffn_kind == "moe":
            x = x + self.moe(self.post_attention_layernorm(x))
        return x  # (B, T, D)

    def new_cache(self, batch_size: int, max_len: int, device: torch.device,
                  dtype: torch.dtype) -> KVCache | MambaCache:
        if self.kind == "A":
            attention = self.self_attn
            return KVCache(batch_size, max_len, attention.n_kv_heads, attention.head_dim,
                           device, dtype)
        return self.mamba.new_cache(batch_size, device, dtype)


def _checkpointed_layer(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor) -> torch.Tensor:
    """Run `layer` under non-reentrant activation checkpointing; return its output (B, T, D).

    A MoE layer records its balancing losses and routing counts as a side effect of forward.
    Its recomputation in backward must not count the routing twice, so that state is restored
    after the rerun.
    """
    if layer.ffn_kind != "moe":
        return checkpoint(layer, x, cos, sin, None, 0, use_reentrant=False)

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _moe_state_kept(layer.moe)

    return checkpoint(layer, x, cos, sin, None, 0, use_reentrant=False, context_fn=contexts)


@contextlib.contextmanager
def _moe_state_kept(moe: MoEFeedForward) -> Iterator[None]:
    """Restore a MoE block's losses, expert loads and bias-balancer counts on exit."""
    saved = (moe.aux_loss, moe.z_loss, moe.expert_load)
    counts = moe.load_counts.clone() if moe.balancer == "bias" else None
    try:
        yield
    finally:
        moe.aux_loss, moe.z_loss, moe.expert_load = saved
        if counts is not None:
            with torch.no_grad():
                moe.load_counts.copy_(counts)


@dataclass
class ModelCache:
    """Per-layer decoding state for a batch of sequences and the number of positions filled."""

    layers: list
    max_len: int
    pos: int = 0


class CodeModel(nn.Module):
    """Decoder-only language model: embeddings, a stack of layers, final norm, output head."""

    # The trainer sets this from train.activation_checkpointing. When True, a training forward
    # pass without a cache keeps only each layer's input and recomputes the rest in backward.
    activation_checkpointing: bool = False

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
        """Initialize matrices with normal(0, init_std); outputs into the residual stream get
        init_std / sqrt(2 * layers). Norms, the Mamba conv and SSM parameters keep the init of
        their own modules."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * len(self.layers))
        for name, param in self.named_parameters():
            if param.dim() < 2 or name.endswith("conv1d.weight"):
                continue  # norm gains, SSM parameters and the conv keep their own init
            is_residual_output = name.endswith(
                ("o_proj.weight", "down_proj.weight", "out_proj.weight", "experts.down_proj"))
            nn.init.normal_(param, mean=0.0, std=residual_std if is_residual_output else std)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> ModelCache:
        """Return an empty decoding cache for `batch_size` sequences of up to `max_len` tokens."""
        max_len = min(max_len or self.config.max_seq_len, self.config.max_seq_len)
        device = self.embed_tokens.weight.device
        dtype = dtype or self.embed_tokens.weight.dtype
        layers = [layer.new_cache(batch_size, max_len, device, dtype) for layer in self.layers]
        return ModelCache(layers, max_len)

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits (B, T, V) for tokens (B, T); with a cache, continue from cache.pos.

        With `positions`, int64 indices into the flattened (B * T) positions, return logits
        (N, V) for those N positions only. A loss that scores few positions (the assistant's
        turns of a chat) then skips the output projection everywhere else.
        """
        pos = cache.pos if cache is not None else 0
        cos, sin = self.rotary(pos, tokens.shape[1])  # (T, E)
        x = self.embed_tokens(tokens)  # (B, T, D)
        recompute = (self.activation_checkpointing and cache is None and self.training
                     and torch.is_grad_enabled())
        for index, layer in enumerate(self.layers):
            if recompute:
                x = _checkpointed_layer(layer, x, cos, sin)
                continue
            layer_cache = cache.layers[index] if cache is not None else None
            x = layer(x, cos, sin, layer_cache, pos)
        x = self.norm(x)
        if positions is not None:
            x = x.flatten(0, 1).index_select(0, positions)  # (N, D)
        logits = self.lm_head(x)  # (B, T, V), or (N, V) with positions
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

    def num_parameters(self, exclude_embeddings: bool = False, active: bool = False) -> int:
        """Count unique parameters; optionally leave out the input embedding table, or count
        only those one token uses (MoE experts not chosen are left out)."""
        total = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
        if active:
            for module in self.modules():
                if isinstance(module, MoEFeedForward):
                    counts = module.parameter_counts()
                    total -= counts["total"] - counts["active"]
        return total

    def auxiliary_loss(self) -> torch.Tensor:
        """Sum of the MoE balancing and z-losses of the last forward pass (0 without MoE)."""
        losses = [m.aux_loss + m.z_loss for m in self.modules() if isinstance(m, MoEFeedForward)]
        if not losses:
            return torch.zeros((), device=self.embed_tokens.weight.device)
        return torch.stack([loss.to(losses[0].device) for loss in losses]).sum()

    def expert_loads(self) -> list[list[float]]:
        """Share of routed assignments per expert, per MoE layer, from the last forward pass."""
        return [m.expert_load.tolist() for m in self.modules() if isinstance(m, MoEFeedForward)]

    def after_optimizer_step(self) -> None:
        """Update the routing bias of bias-balanced MoE layers; call once per optimizer step."""
        for module in self.modules():
            if isinstance(module, MoEFeedForward) and module.balancer == "bias":
                module.update_bias(self.config.bias_update_rate)

    def flops_per_token(self, seq_len: int, head: bool = True) -> float:
        """Estimate training FLOPs per token (forward + backward) at a given sequence length.

        The matmuls cost 6 FLOPs per weight per token. Attention scores and weighted sums add
        12 * layers * d_model * seq_len, halved because the causal mask skips half of them in
        kernels that use it. Mamba-2 layers add an estimate of the scan itself. MoE layers count
        only the active experts. The input embedding is a lookup, so it is not counted; the
        output head is, unless `head` is False (for positions whose logits are not computed,
        see `forward`'s `positions`; `head_flops_per_token` is the rest).
        """
        config = self.config
        matmul_params = self.num_parameters(exclude_embeddings=True, active=True)
        if config.tie_embeddings:
            matmul_params += self.lm_head.weight.numel()
        if not head:
            matmul_params -= self.lm_head.weight.numel()
        pattern = config.resolved_layer_pattern()
        attention = 12 * pattern.count("A") * config.d_model * seq_len / 2
        return 6 * matmul_params + attention + 3 * pattern.count("M") * self._ssd_forward_flops()

    def head_flops_per_token(self) -> float:
        """Training FLOPs of the output head for one position whose logits are computed."""
        return 6 * self.lm_head.weight.numel()

    def _ssd_forward_flops(self) -> float:
        """Estimate forward FLOPs per token of one SSD scan beyond its projections.

        Within a chunk of length L, each token scores against L/2 earlier ones on average: C.B
        over N per group, then the weights applied to the inner width I. Writing and reading
        the chunk states costs about 2 * I * N more.
        """
        config = self.config
        inner = config.ssm_expand * config.d_model
        chunk = min(config.ssm_chunk, config.max_seq_len)
        groups_state = config.ssm_groups * config.ssm_state
        return 2 * (chunk / 2) * (groups_state + inner) + 4 * inner * config.ssm_state
