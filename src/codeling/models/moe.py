"""Mixture-of-experts feed-forward block: top-k routing over SwiGLU experts, dropless dispatch.

Parameter names and layouts match `MixtralSparseMoeBlock` in transformers 5.x: `gate.weight`
(X, D), `experts.gate_up_proj` (X, 2F, D) with the gate half first, and `experts.down_proj`
(X, D, F). The optional always-on shared expert is `shared_expert.{gate,up,down}_proj`.

Shape legend: the one in `codeling.models.layers` (B, T, D, F) plus
    X experts, P tokens flattened over the batch (B * T), A routed assignments (P * top_k).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from codeling.models.layers import SwiGLU

BALANCERS = ("aux_loss", "bias")


class MoEExperts(nn.Module):
    """X SwiGLU experts stored as fused 3-D weights, as transformers' MixtralExperts stores them."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int):
        super().__init__()
        self.n_experts = n_experts
        self.d_ff = d_ff
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialize each expert like an nn.Linear of the same shape (Kaiming uniform)."""
        for weight in (self.gate_up_proj, self.down_proj):
            bound = 1.0 / weight.shape[-1] ** 0.5
            weight.uniform_(-bound, bound)

    def forward(self, tokens: torch.Tensor, expert_index: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        """Return sum_k weight_k * expert_k(token) for tokens (P, D), index and weights (P, k).

        Dropless: assignments are sorted by expert, each expert runs one matmul pair on its
        contiguous slice, and the weighted results are scattered back with index_add_.
        """
        if tokens.shape[0] == 0:
            return torch.zeros_like(tokens)
        top_k = expert_index.shape[-1]
        flat_expert = expert_index.reshape(-1)  # (A)
        order = flat_expert.argsort(stable=True)  # (A), assignments grouped by expert
        token_of_assignment = order // top_k  # (A)
        # One host sync to learn the slice sizes; every later step is a plain matmul.
        counts = torch.bincount(flat_expert, minlength=self.n_experts).tolist()

        routed = tokens[token_of_assignment]  # (A, D)
        outputs = []
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            chunk = routed[start:start + count]
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)  # (count, F)
            outputs.append(F.linear(F.silu(gate) * up, self.down_proj[expert]))  # (count, D)
            start += count
        expert_out = torch.cat(outputs)  # (A, D), in sorted order
        expert_out = expert_out * expert_weights.reshape(-1)[order, None]

        combined = torch.zeros_like(tokens)
        return combined.index_add_(0, token_of_assignment, expert_out.to(tokens.dtype))  # (P, D)


class MoEFeedForward(nn.Module):
    """Top-k mixture of SwiGLU experts with load balancing and an optional shared expert.

    Routing follows Mixtral: softmax over fp32 router logits, top-k, weights renormalized over the
    chosen k (`normalize_weights=False` keeps the raw probabilities). Balancing is either the
    Switch Transformer auxiliary loss (`balancer="aux_loss"`) or the auxiliary-loss-free bias
    (`balancer="bias"`): a buffer added to the router scores for the top-k choice only, moved
    by `update_bias` once per optimizer step.

    After each forward the block stores three values for the trainer and the logs:
      `aux_loss`     aux_loss_coef * X * sum_i f_i * P_i, with grad. f_i is the share of the
                     top-k assignments that went to expert i, P_i the mean router probability.
                     Balanced routing gives 1 (transformers' load_balancing_loss_func gives k).
      `z_loss`       z_loss_coef * mean(logsumexp(logits)^2), with grad.
      `expert_load`  f (X), detached.
    Tokens where `mask` is False (padding) are left out of all three and of the bias counts.
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int = 2,
                 shared_d_ff: int = 0, balancer: str = "aux_loss",
                 aux_loss_coef: float | None = None, z_loss_coef: float = 1e-3,
                 normalize_weights: bool = True):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and n_experts={n_experts}")
        if balancer not in BALANCERS:
            raise ValueError(f"unknown balancer {balancer!r}; allowed: {', '.join(BALANCERS)}")
        if shared_d_ff < 0:
            raise ValueError(f"shared_d_ff={shared_d_ff} must be >= 0 (0 = no shared expert)")
        self.d_model = d_model
        self.n_experts = n_experts
        self.top_k = top_k
        self.balancer = balancer
        # The loss-free balancer needs no auxiliary loss, so its default coefficient is 0.
        if aux_loss_coef is None:
            aux_loss_coef = 0.01 if balancer == "aux_loss" else 0.0
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.normalize_weights = normalize_weights

        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.experts = MoEExperts(n_experts, d_model, d_ff)
        self.shared_expert = SwiGLU(d_model, shared_d_ff) if shared_d_ff > 0 else None
        if balancer == "bias":
            # Saved in checkpoints because it changes routing; the counts are per-step scratch.
            self.register_buffer("expert_bias", torch.zeros(n_experts))
            self.register_buffer("load_counts", torch.zeros(n_experts), persistent=False)

        zero = torch.zeros(())
        self.aux_loss = zero
        self.z_loss = zero
        self.expert_load = torch.zeros(n_experts)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Return the block output (B, T, D) for x (B, T, D); mask (B, T) is True on real tokens."""
        tokens = x.reshape(-1, self.d_model)  # (P, D)
        valid = mask.reshape(-1).bool() if mask is not None else None  # (P)

        logits, expert_index, weights = self.route(tokens)
        self._record_balance(logits, expert_index, valid)

        out = self.experts(tokens, expert_index, weights)  # (P, D)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        return out.view_as(x)  # (B, T, D)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Choose experts for tokens (P, D); return fp32 logits (P, X), indices and weights (P, k).

        The balancing bias, if any, only shifts which experts are chosen: the weights are the
        router probabilities of the chosen experts, renormalized unless normalize_weights=False.
        """
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.gate.weight.float())  # (P, X)
            probs = logits.softmax(dim=-1)
            scores = probs + self.expert_bias if self.balancer == "bias" else probs
            expert_index = scores.topk(self.top_k, dim=-1).indices  # (P, k)
            weights = probs.gather(-1, expert_index)  # (P, k)
            if self.normalize_weights:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, expert_index, weights

    def _record_balance(self, logits: torch.Tensor, expert_index: torch.Tensor,
                        valid: torch.Tensor | None) -> None:
        """Compute aux_loss, z_loss and expert_load over valid tokens; count loads for the bias.

        Padding is removed by 0/1 token weights rather than boolean indexing, so nothing here
        waits for the device. With no valid token every value is 0.
        """
        token_weight = (valid.to(logits.dtype) if valid is not None
                        else logits.new_ones(logits.shape[0]))  # (P)
        n_tokens = token_weight.sum().clamp_min(1.0)

        # scatter_add_ of weights, unlike bincount, needs no device-to-host sync. The sums are
        # whole numbers, exact in float32 below 2**24 whatever the order of the adds.
        assignment_weight = token_weight.repeat_interleave(self.top_k)  # (A)
        counts = logits.new_zeros(self.n_experts).scatter_add_(
            0, expert_index.reshape(-1), assignment_weight)  # (X)
        load = counts / counts.sum().clamp_min(1.0)  # f_i, sums to 1
        mean_prob = (logits.softmax(dim=-1) * token_weight[:, None]).sum(dim=0) / n_tokens  # P_i
        squared_lse = torch.logsumexp(logits, dim=-1).pow(2)  # (P)

        self.aux_loss = self.aux_loss_coef * self.n_experts * (load * mean_prob).sum()
        self.z_loss = self.z_loss_coef * (squared_lse * token_weight).sum() / n_tokens
        self.expert_load = load.detach()
        if self.balancer == "bias" and self.training:
            self.load_counts += counts.detach()

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """Move each expert's routing bias by rate toward balance and reset the load counts.

        Call once per optimizer step: it uses the loads counted over every micro-batch since the
        last call. Overloaded experts get -rate, underloaded ones +rate (the sign of mean - load).
        """
        if self.balancer != "bias":
            raise RuntimeError("update_bias needs balancer='bias'; this block uses "
                               f"balancer={self.balancer!r}")
        counts = self.load_counts.clone()
        if dist.is_available() and dist.is_initialized():
            # NOTE: no test runs this multi-process path. It sums the loads of all data-parallel ranks.
            dist.all_reduce(counts)
        if counts.sum() > 0:
            self.expert_bias += rate * torch.sign(counts.mean() - counts)
        self.load_counts.zero_()

    def parameter_counts(self) -> dict[str, int]:
        """Count parameters: "total", and "active" = those one token uses (router, top_k routed
        experts, shared expert)."""
        total = sum(p.numel() for p in self.parameters())
        expert_params = self.experts.gate_up_proj.numel() + self.experts.down_proj.numel()
        inactive = expert_params * (self.n_experts - self.top_k) // self.n_experts
        return {"total": total, "active": total - inactive}
