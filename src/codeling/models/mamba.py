"""Mamba-2 mixer: a selective state-space model with one scalar decay per head (SSD).

Per head h and step t the recurrence is

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T      (state: E x N)
    y_t     = state_t C_t + D_h * x_t

with dt_t = softplus(dt_raw_t + dt_bias_h) and A_h = -exp(A_log_h) < 0. Training and prefill
use the chunked matmul ("state space duality") form of this recurrence; decoding steps it one
token at a time. Parameter names and shapes match `Mamba2Mixer` in transformers
(`in_proj`, `conv1d`, `dt_bias`, `A_log`, `D`, `norm.weight`, `out_proj`), so export is a
renaming.

Shape legend: the one in `codeling.models.layers` (B, T, D, H, E) plus
    N SSM state size, G groups of heads that share B and C, R heads per group (H / G),
    C chunk size, M chunks (T padded up to M * C), I inner width (H * E = expand * D),
    W convolution channels (I + 2 * G * N).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Attribute set to True on parameters that the optimizer should not weight-decay.
NO_WEIGHT_DECAY_ATTR = "_no_weight_decay"


# -- scans on already discretized inputs -----------------------------------------------------------
# The scans take x (B, T, H, E), dt (B, T, H) after softplus, A (H) negative, B and C (B, T, G, N),
# D (H) and an optional initial state (B, H, E, N). They return y (B, T, H, E) and the final
# state (B, H, E, N), both fp32.


def segment_sum(log_decay: torch.Tensor) -> torch.Tensor:
    """Return out[..., i, j] = log_decay[..., j+1] + ... + log_decay[..., i] for j <= i, else -inf.

    Each entry is a masked cumulative sum, not a difference of two cumulative sums, so no entry
    loses precision to cancellation. With log_decay <= 0 every entry is <= 0, so exp() of the
    result cannot overflow.
    """
    size = log_decay.shape[-1]
    ones = torch.ones(size, size, dtype=torch.bool, device=log_decay.device)
    rows = log_decay[..., :, None].expand(*log_decay.shape, size)  # (..., C, C), [i, j] = a_i
    sums = rows.masked_fill(~ones.tril(-1), 0.0).cumsum(dim=-2)  # [i, j] = sum of a_k, j < k <= i
    return sums.masked_fill(~ones.tril(0), float("-inf"))


def ssm_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the SSM by one token; return (y (B, H, E), new state (B, H, E, N)), in fp32.

    x (B, H, E), dt (B, H) after softplus, B and C (B, G, N), state (B, H, E, N).
    """
    heads, groups = x.shape[1], B.shape[1]
    x, dt = x.float(), dt.float()
    B = B.float().repeat_interleave(heads // groups, dim=1)  # (B, H, N)
    C = C.float().repeat_interleave(heads // groups, dim=1)
    decay = torch.exp(dt * A.float())  # (B, H)
    update = (dt[..., None] * x)[..., None] * B[:, :, None, :]  # (B, H, E, N)
    state = state.float() * decay[..., None, None] + update
    y = (state @ C[..., None]).squeeze(-1) + D.float()[:, None] * x  # (B, H, E)
    return y, state


def sequential_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor, D: torch.Tensor,
                    initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the SSM recurrence token by token: the slow, obviously correct reference scan."""
    batch, length, heads, head_dim = x.shape
    state = (initial_state.float() if initial_state is not None
             else x.new_zeros(batch, heads, head_dim, B.shape[-1], dtype=torch.float32))
    outputs = []
    for t in range(length):
        y, state = ssm_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        outputs.append(y)
    return torch.stack(outputs, dim=1), state  # (B, T, H, E), (B, H, E, N)


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, D: torch.Tensor, chunk_size: int,
                initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute the SSM scan in chunks with matmuls (SSD); equal to `sequential_scan`.

    Inside a chunk the output is a masked, decay-weighted attention-like product. Between chunks
    only the (H, E, N) states travel. T is zero-padded up to a multiple of chunk_size: padded steps
    have dt = 0, so they neither decay nor change the state, and the final state is that of step T.
    """
    batch, length, heads, head_dim = x.shape
    groups, state_size = B.shape[2], B.shape[3]
    per_group = heads // groups
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()

    pad = (-length) % chunk_size
    if pad:
        x_padded = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    else:
        x_padded = x
    chunks = (length + pad) // chunk_size

    x_dt = (x_padded * dt[..., None]).view(
        batch, chunks, chunk_size, groups, per_group, head_dim)  # (B, M, C, G, R, E)
    B = B.view(batch, chunks, chunk_size, groups, state_size)  # (B, M, C, G, N)
    C = C.view(batch, chunks, chunk_size, groups, state_size)
    log_decay = (dt * A.float()).view(batch, chunks, chunk_size, groups, per_group)
    log_decay = log_decay.permute(0, 3, 4, 1, 2)  # (B, G, R, M, C)
    cumulative = log_decay.cumsum(dim=-1)  # (B, G, R, M, C), non-increasing along C

    # 1. Outputs from inputs of the same chunk: y[l] = sum_{s <= l} (C_l . B_s) decay(s -> l) x_s dt_s.
    decay_within = torch.exp(segment_sum(log_decay))  # (B, G, R, M, C, C), [target l, source s]
    scores = torch.einsum("bmlgn,bmsgn->bgmls", C, B)  # (B, G, M, C, C)
    weights = scores[:, :, None] * decay_within  # (B, G, R, M, C, C)
    y_within = torch.einsum("bgrmls,bmsgre->bmlgre", weights, x_dt)  # (B, M, C, G, R, E)

    # 2. State each chunk leaves at its end, counting only its own inputs.
    decay_to_end = torch.exp(cumulative[..., -1:] - cumulative)  # (B, G, R, M, C), exponent <= 0
    x_decayed = x_dt * decay_to_end.permute(0, 3, 4, 1, 2)[..., None]  # (B, M, C, G, R, E)
    chunk_states = torch.einsum("bmlgre,bmlgn->bmgren", x_decayed, B)  # (B, M, G, R, E, N)

    # 3. Carry the states across chunks: the state at the start of chunk z sums every earlier
    # chunk's end state (and the initial state), decayed over the chunks in between.
    if initial_state is None:
        start = chunk_states.new_zeros(batch, groups, per_group, head_dim, state_size)
    else:
        start = initial_state.float().reshape(batch, groups, per_group, head_dim, state_size)
    states = torch.cat([start[:, None], chunk_states], dim=1)  # (B, M+1, G, R, E, N)
    chunk_log_decay = F.pad(cumulative[..., -1], (1, 0))  # (B, G, R, M+1)
    decay_between = torch.exp(segment_sum(chunk_log_decay))  # (B, G, R, M+1, M+1)
    states = torch.einsum("bgrzc,bcgren->bzgren", decay_between, states)  # (B, M+1, G, R, E, N)
    start_states, final_state = states[:, :-1], states[:, -1]

    # 4. Outputs from the state each chunk starts with, decayed up to each position.
    y_from_state = torch.einsum("bmlgn,bmgren->bmlgre", C, start_states)  # (B, M, C, G, R, E)
    y_from_state = y_from_state * torch.exp(cumulative).permute(0, 3, 4, 1, 2)[..., None]

    y = (y_within + y_from_state).reshape(batch, chunks * chunk_size, heads, head_dim)
    y = y[:, :length] + D.float()[:, None] * x  # (B, T, H, E)
    return y, final_state.reshape(batch, heads, head_dim, state_size)


# -- the mixer -------------------------------------------------------------------------------------


@dataclass
class MambaCache:
    """Decoding state of one Mamba-2 mixer for `batch_size` sequences.

    `conv_state` contains the last d_conv inputs of the causal convolution (zeros before the
    first token). `ssm_state` is the recurrent state, always fp32. Each forward call replaces
    both tensors with new ones (not in place, so autograd through a cached forward stays valid).
    """

    conv_state: torch.Tensor  # (B, W, d_conv)
    ssm_state: torch.Tensor  # (B, H, E, N)
    seen_tokens: int = 0

    def reset(self) -> None:
        """Zero both states so the cache can start new sequences."""
        self.conv_state.zero_()
        self.ssm_state.zero_()
        self.seen_tokens = 0


class GatedRMSNorm(nn.Module):
    """RMSNorm of x * silu(z), normalized per group of channels (transformers' MambaRMSNormGated)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Gate x (..., I) with silu(gate), normalize each group in fp32, scale; gate's dtype."""
        gated = x.float() * F.silu(gate.float())
        grouped = gated.unflatten(-1, (-1, self.group_size))  # (..., G, I / G)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.flatten(-2) * self.weight.float()).to(gate.dtype)


class Mamba2Mixer(nn.Module):
    """Mamba-2 sequence mixer: in_proj, causal depthwise conv, SSD scan, gated RMSNorm, out_proj."""

    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: int = 2,
                 head_dim: int = 64, n_groups: int = 1, chunk_size: int = 64,
                 norm_eps: float = 1e-5, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4):
        super().__init__()
        d_inner = expand * d_model
        if d_inner % head_dim:
            raise ValueError(f"expand * d_model = {expand} * {d_model} = {d_inner} is not divisible "
                             f"by head_dim={head_dim}; pick a head_dim that divides it")
        n_heads = d_inner // head_dim
        if n_groups < 1 or n_heads % n_groups:
            raise ValueError(f"n_groups={n_groups} must be >= 1 and divide the number of heads "
                             f"({n_heads} = {d_inner} / head_dim {head_dim})")
        if chunk_size < 1 or d_conv < 1 or d_state < 1:
            raise ValueError(f"chunk_size={chunk_size}, d_conv={d_conv} and d_state={d_state} "
                             "must all be >= 1")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt range must satisfy 0 < dt_min <= dt_max; got dt_min={dt_min}, "
                             f"dt_max={dt_max}")
        self.d_model = d_model
        self.d_inner = d_inner
        self.d_state = d_state
        self.d_conv = d_conv
        self.head_dim = head_dim
        self.n_heads = n_heads
        self.n_groups = n_groups
        self.chunk_size = chunk_size
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.conv_channels = d_inner + 2 * n_groups * d_state

        # Projection layout, as in transformers' Mamba2Mixer: [z (I), x (I), B (GN), C (GN), dt (H)].
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_channels + n_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_channels, self.conv_channels, d_conv,
                                groups=self.conv_channels, padding=d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // n_groups, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for param in (self.dt_bias, self.A_log, self.D):
            setattr(param, NO_WEIGHT_DECAY_ATTR, True)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Initialize A_log, dt_bias and D as mamba_ssm's Mamba2 does by default.

        A ~ uniform[1, 16] and A_log = log(A); dt ~ log-uniform[dt_min, dt_max], floored at
        dt_init_floor, and dt_bias = softplus^-1(dt) so that softplus(dt_bias) starts at dt; D = 1.
        """
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16).log())
        log_dt = torch.rand_like(self.dt_bias, dtype=torch.float32)
        log_dt = log_dt * (math.log(self.dt_max) - math.log(self.dt_min)) + math.log(self.dt_min)
        dt = log_dt.exp().clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.D.fill_(1.0)

    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> MambaCache:
        """Return an empty decoding cache; conv_state in `dtype`, ssm_state always fp32."""
        device = device if device is not None else self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        conv_state = torch.zeros(batch_size, self.conv_channels, self.d_conv,
                                 device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.n_heads, self.head_dim, self.d_state,
                                device=device, dtype=torch.float32)
        return MambaCache(conv_state, ssm_state)

    def forward(self, x: torch.Tensor, cache: MambaCache | None = None) -> torch.Tensor:
        """Mix x (B, T, D) along time; with a cache, continue from its state and update it.

        With a cache, T == 1 takes one recurrent step and T > 1 runs the chunked scan from the
        cached state, so prefill, single steps and later multi-token chunks can be mixed freely.
        """
        batch, length, _ = x.shape
        if cache is not None and cache.ssm_state.shape[0] != batch:
            raise ValueError(f"cache was made for batch size {cache.ssm_state.shape[0]} but the "
                             f"input has batch size {batch}; create it with new_cache({batch}, ...)")
        projected = self.in_proj(x)  # (B, T, 2I + 2GN + H)
        z, xbc, dt_raw = projected.split([self.d_inner, self.conv_channels, self.n_heads], dim=-1)

        xbc = F.silu(self._convolve(xbc, cache))  # (B, T, W)
        group_width = self.n_groups * self.d_state
        x_ssm, B, C = xbc.split([self.d_inner, group_width, group_width], dim=-1)
        x_ssm = x_ssm.unflatten(-1, (self.n_heads, self.head_dim))  # (B, T, H, E)
        B = B.unflatten(-1, (self.n_groups, self.d_state))  # (B, T, G, N)
        C = C.unflatten(-1, (self.n_groups, self.d_state))

        with torch.autocast(device_type=x.device.type, enabled=False):
            dt = F.softplus(dt_raw.float() + self.dt_bias.float())  # (B, T, H)
            A = -torch.exp(self.A_log.float())  # (H)
            if cache is not None and length == 1:
                y, state = ssm_step(cache.ssm_state, x_ssm[:, 0], dt[:, 0], A, B[:, 0], C[:, 0],
                                    self.D)
                y = y[:, None]  # (B, 1, H, E)
            else:
                initial = cache.ssm_state if cache is not None else None
                y, state = self._scan(x_ssm, dt, A, B, C, initial)
        if cache is not None:
            cache.ssm_state = state.clone()  # a copy, so the cache does not keep the chunk states
            cache.seen_tokens += length

        y = self.norm(y.flatten(-2), z)  # (B, T, I)
        return self.out_proj(y)  # (B, T, D)

    def _scan(self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, initial_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # A separate method so a subclass (the benchmark's sequential baseline) can swap the scan.
        return ssd_chunked(x, dt, A, B, C, self.D, self.chunk_size, initial_state)

    def _convolve(self, xbc: torch.Tensor, cache: MambaCache | None) -> torch.Tensor:
        """Apply the causal depthwise conv to xbc (B, T, W), before the activation."""
        length = xbc.shape[1]
        channels_first = xbc.transpose(1, 2)  # (B, W, T)
        if cache is None:
            return self.conv1d(channels_first)[..., :length].transpose(1, 2)
        # The cached last d_conv inputs stand in for the zero left padding of the plain path.
        window = torch.cat([cache.conv_state.to(channels_first.dtype), channels_first], dim=-1)
        cache.conv_state = window[..., -self.d_conv:].to(cache.conv_state.dtype, copy=True)
        out = F.conv1d(window[..., 1:], self.conv1d.weight, self.conv1d.bias,
                       groups=self.conv_channels)  # (B, W, T)
        return out.transpose(1, 2)
