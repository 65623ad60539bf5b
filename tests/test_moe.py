"""The MoE feed-forward block: dispatch, transformers Mixtral parity, load balancing."""

import math

import pytest
import torch
import torch.nn.functional as F

from codeling.models.moe import MoEFeedForward


def expert_output(block: MoEFeedForward, expert: int, token: torch.Tensor) -> torch.Tensor:
    d_ff = block.experts.d_ff
    gate_up = block.experts.gate_up_proj[expert]
    gate, up = gate_up[:d_ff] @ token, gate_up[d_ff:] @ token
    return block.experts.down_proj[expert] @ (F.silu(gate) * up)


def naive_forward(block: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Route and combine one token at a time, straight from the Mixtral definition."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            probs = (block.gate.weight @ token).softmax(-1)
            chosen = probs.topk(block.top_k).indices
            weights = probs[chosen] / probs[chosen].sum()
            for weight, expert in zip(weights, chosen.tolist()):
                out[b, t] += weight * expert_output(block, expert, token)
            if block.shared_expert is not None:
                out[b, t] += block.shared_expert(token)
    return out


@pytest.mark.parametrize("shared_d_ff", [0, 24])
def test_dispatch_matches_per_token_loop(shared_d_ff):
    torch.manual_seed(shared_d_ff)
    block = MoEFeedForward(16, 32, n_experts=5, top_k=2, shared_d_ff=shared_d_ff)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_forward(block, x), rtol=1e-5, atol=1e-5)


def test_top_k_equal_to_experts_is_dense_mixture():
    torch.manual_seed(0)
    block = MoEFeedForward(16, 32, n_experts=4, top_k=4)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        probs = (x @ block.gate.weight.T).softmax(-1)  # (B, T, X)
        expected = sum(probs[..., e:e + 1] * torch.stack(
            [torch.stack([expert_output(block, e, tok) for tok in row]) for row in x])
            for e in range(4))
        got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(block.expert_load, torch.full((4,), 0.25))


def test_weights_without_normalization_are_probabilities():
    torch.manual_seed(0)
    block = MoEFeedForward(16, 32, n_experts=6, top_k=2, normalize_weights=False)
    tokens = torch.randn(10, 16)
    logits, index, weights = block.route(tokens)
    torch.testing.assert_close(weights, logits.softmax(-1).gather(-1, index))
    assert (weights.sum(-1) < 1).all()


def mixtral_block_for(block: MoEFeedForward):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(
        hidden_size=block.d_model, intermediate_size=block.experts.d_ff,
        num_local_experts=block.n_experts, num_experts_per_tok=block.top_k,
        router_jitter_noise=0.0, hidden_act="silu")
    theirs = MixtralSparseMoeBlock(config).eval()
    state = block.state_dict()
    if not hasattr(theirs.experts, "gate_up_proj"):  # transformers 4.x: one module per expert
        d_ff = block.experts.d_ff
        gate_up, down = state.pop("experts.gate_up_proj"), state.pop("experts.down_proj")
        for e in range(block.n_experts):
            state[f"experts.{e}.w1.weight"] = gate_up[e, :d_ff]
            state[f"experts.{e}.w3.weight"] = gate_up[e, d_ff:]
            state[f"experts.{e}.w2.weight"] = down[e]
    theirs.load_state_dict(state)
    return theirs


def test_outputs_match_transformers_mixtral():
    torch.manual_seed(0)
    block = MoEFeedForward(32, 48, n_experts=6, top_k=2).eval()
    theirs = mixtral_block_for(block)
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        expected = theirs(x)
        if isinstance(expected, tuple):  # transformers 4.x also returns the router logits
            expected = expected[0]
        got = block(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_parameter_names_match_transformers_mixtral():
    block = MoEFeedForward(32, 48, n_experts=6, top_k=2)
    shapes = {name: tuple(t.shape) for name, t in block.state_dict().items()}
    assert shapes == {"gate.weight": (6, 32), "experts.gate_up_proj": (6, 96, 32),
                      "experts.down_proj": (6, 32, 48)}


def two_expert_block(**kwargs) -> MoEFeedForward:
    """Router = identity on 2 features, so a token (ln 3, 0) gets probabilities (0.75, 0.25)."""
    block = MoEFeedForward(2, 4, n_experts=2, top_k=1, aux_loss_coef=1.0, z_loss_coef=1.0,
                           **kwargs)
    with torch.no_grad():
        block.gate.weight.copy_(torch.eye(2))
    return block


def test_aux_and_z_loss_hand_computed():
    block = two_expert_block()
    ln3 = math.log(3)
    x = torch.tensor([[[ln3, 0.0], [0.0, ln3], [ln3, 0.0]]])
    block(x)
    # Top-1 picks expert 0, 1, 0: f = (2/3, 1/3). Mean probabilities P = (1.75/3, 1.25/3).
    # aux = 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3) = 9.5 / 9. Every logsumexp is ln(3 + 1).
    assert math.isclose(block.aux_loss.item(), 9.5 / 9, rel_tol=1e-6)
    assert math.isclose(block.z_loss.item(), math.log(4) ** 2, rel_tol=1e-6)
    torch.testing.assert_close(block.expert_load, torch.tensor([2 / 3, 1 / 3]))
    assert block.aux_loss.requires_grad


def test_mask_excludes_padding_from_losses():
    block = two_expert_block()
    ln3 = math.log(3)
    x = torch.tensor([[[ln3, 0.0], [0.0, ln3], [ln3, 0.0]]])
    block(x, mask=torch.tensor([[True, True, False]]))
    # Only the first two tokens count: f = P = (0.5, 0.5), so aux = 2 * (0.25 + 0.25) = 1.
    assert math.isclose(block.aux_loss.item(), 1.0, rel_tol=1e-6)
    torch.testing.assert_close(block.expert_load, torch.tensor([0.5, 0.5]))

    block(x[:, :2])
    assert math.isclose(block.aux_loss.item(), 1.0, rel_tol=1e-6)


def test_aux_loss_coefficient_defaults():
    assert MoEFeedForward(8, 8, 4).aux_loss_coef == 0.01
    assert MoEFeedForward(8, 8, 4, balancer="bias").aux_loss_coef == 0.0
    assert MoEFeedForward(8, 8, 4, balancer="bias", aux_loss_coef=0.001).aux_loss_coef == 0.001


def test_bias_changes_selection_not_weights():
    torch.manual_seed(0)
    block = MoEFeedForward(16, 32, n_experts=4, top_k=2, balancer="bias")
    tokens = torch.randn(20, 16)
    block.expert_bias[3] = 10.0  # forces expert 3 into every top-2
    logits, index, weights = block.route(tokens)

    assert (index == 3).any(dim=-1).all()
    probs = logits.softmax(-1)
    chosen = probs.gather(-1, index)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


def test_bias_updates_only_on_update_call():
    torch.manual_seed(0)
    block = MoEFeedForward(16, 32, n_experts=4, top_k=2, balancer="bias").train()
    x = torch.randn(2, 8, 16)
    for _ in range(3):  # three micro-batches
        block(x)
    assert torch.equal(block.expert_bias, torch.zeros(4))
    assert block.load_counts.sum().item() == 3 * 16 * 2

    counts = block.load_counts.clone()
    block.update_bias(0.1)
    expected = 0.1 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(block.expert_bias, expected)
    assert block.load_counts.sum().item() == 0

    block.eval()
    block(x)
    assert block.load_counts.sum().item() == 0  # evaluation does not count


def test_bias_balancer_reduces_imbalance():
    torch.manual_seed(0)
    block = MoEFeedForward(16, 32, n_experts=4, top_k=1, balancer="bias").train()
    with torch.no_grad():
        block.gate.weight[0] += 0.2  # expert 0 wins every token with positive features
    x = torch.randn(4, 64, 16).abs()
    block(x)
    skew_before = block.expert_load.max().item()
    for _ in range(60):
        block(x)
        block.update_bias(0.01)
    block(x)
    skew_after = block.expert_load.max().item()
    assert skew_before > 0.9
    assert skew_after < 0.4  # balanced would be 0.25


def test_update_bias_rejects_aux_loss_balancer():
    with pytest.raises(RuntimeError, match="balancer='bias'"):
        MoEFeedForward(8, 8, 4).update_bias(0.1)


def test_shared_expert_adds_its_output():
    torch.manual_seed(0)
    shared = MoEFeedForward(16, 32, n_experts=4, top_k=2, shared_d_ff=24)
    routed_only = MoEFeedForward(16, 32, n_experts=4, top_k=2)
    routed_only.load_state_dict(
        {k: v for k, v in shared.state_dict().items() if not k.startswith("shared_expert.")})
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), routed_only(x) + shared.shared_expert(x))


def test_every_parameter_gets_gradient():
    torch.manual_seed(0)
    block = MoEFeedForward(16, 32, n_experts=4, top_k=2, shared_d_ff=24, z_loss_coef=1e-3)
    out = block(torch.randn(2, 16, 16))
    (out.pow(2).mean() + block.aux_loss + block.z_loss).backward()
    for name, param in block.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_aux_loss_reaches_router():
    torch.manual_seed(0)
    block = MoEFeedForward(16, 32, n_experts=4, top_k=2, z_loss_coef=0.0)
    block(torch.randn(2, 8, 16))
    block.aux_loss.backward()
    assert block.gate.weight.grad.abs().sum() > 0
    assert block.experts.gate_up_proj.grad is None


def test_bf16_autocast_routes_in_fp32():
    torch.manual_seed(0)
    block = MoEFeedForward(16, 32, n_experts=4, top_k=2)
    x = torch.randn(2, 8, 16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits, _, weights = block.route(x.reshape(-1, 16))
        out = block(x)
    assert logits.dtype == torch.float32
    assert weights.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_parameter_counts():
    block = MoEFeedForward(16, 32, n_experts=4, top_k=1, shared_d_ff=8)
    router, experts, shared = 4 * 16, 4 * 3 * 16 * 32, 3 * 16 * 8
    counts = block.parameter_counts()
    assert counts["total"] == router + experts + shared
    assert counts["active"] == router + experts // 4 + shared


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="top_k=5"):
        MoEFeedForward(8, 8, n_experts=4, top_k=5)
    with pytest.raises(ValueError, match="balancer 'loss'"):
        MoEFeedForward(8, 8, n_experts=4, balancer="loss")


def test_all_padding_gives_zero_losses():
    block = two_expert_block()
    block(torch.randn(1, 3, 2), mask=torch.zeros(1, 3, dtype=torch.bool))
    assert block.aux_loss.item() == 0.0
    assert block.z_loss.item() == 0.0
    assert torch.equal(block.expert_load, torch.zeros(2))
