"""Every architecture through the same decoder: presets, cached decoding, gradients, accounting."""

import pytest
import torch
import torch.nn.functional as F

from codeling.config import ModelConfig, load_config
from codeling.models.decoder import CodeModel

ARCHS = ["dense", "mamba", "moe", "hybrid"]


def tiny(arch: str, **changes) -> ModelConfig:
    settings = dict(arch=arch, vocab_size=300, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2,
                    max_seq_len=64, ssm_state=16, ssm_head_dim=16, ssm_chunk=8, n_experts=4,
                    top_k=2, attn_period=2, attn_offset=1)
    settings.update(changes)
    return ModelConfig(**settings)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_presets_build(arch, size):
    config = load_config(None, [f"model={arch}-{size}", "model.vocab_size=4096"]).model
    with torch.device("meta"):
        model = CodeModel(config)
    assert model.num_parameters(active=True) <= model.num_parameters()


def test_default_patterns():
    assert tiny("dense").resolved_layer_pattern() == "AAAA"
    assert tiny("mamba").resolved_layer_pattern() == "MMMM"
    assert tiny("hybrid").resolved_layer_pattern() == "MAMA"
    assert tiny("hybrid", attn_period=4, attn_offset=2).resolved_layer_pattern() == "MMAM"
    assert tiny("mamba").resolved_ffn() == "none"
    assert tiny("moe").resolved_ffn() == "moe"
    assert tiny("hybrid", ffn="moe").resolved_ffn() == "moe"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("split", [[19], [8, 1, 1, 1, 5, 1], [5, 1, 1, 13]])
def test_cached_decoding_matches_full_forward(arch, split):
    torch.manual_seed(0)
    model = CodeModel(tiny(arch)).eval()
    tokens = torch.randint(0, 300, (2, sum(split)))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 64)
        pieces, start = [], 0
        for size in split:
            pieces.append(model(tokens[:, start:start + size], cache))
            start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_scored_logits_match_full_logits(arch):
    """The fast path of a masked loss (the output projection only where a target is scored)
    against the reference (logits everywhere, ignored targets dropped by cross-entropy): the same
    loss and the same gradient for every parameter."""
    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (3, 21))
    targets = tokens[:, 1:].clone()
    targets[torch.rand(targets.shape) < 0.7] = -100
    scored = (targets.reshape(-1) != -100).nonzero().squeeze(1)
    assert 0 < len(scored) < targets.numel()
    losses, grads = [], []
    for fast in (False, True):
        torch.manual_seed(1)
        model = CodeModel(tiny(arch, tie_embeddings=False))
        if fast:
            logits = model(tokens[:, :-1], positions=scored)
            assert logits.shape == (len(scored), 300)
            loss = F.cross_entropy(logits, targets.reshape(-1)[scored])
        else:
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: param.grad for name, param in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_parameter_gets_gradient(arch):
    torch.manual_seed(0)
    model = CodeModel(tiny(arch, tie_embeddings=False))
    tokens = torch.randint(0, 300, (2, 24))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:]) + model.auxiliary_loss()
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_moe_auxiliary_loss_and_loads():
    torch.manual_seed(0)
    model = CodeModel(tiny("moe"))
    model(torch.randint(0, 300, (2, 16)))
    assert model.auxiliary_loss().item() > 0
    loads = model.expert_loads()
    assert len(loads) == 4
    for layer in loads:
        assert sum(layer) == pytest.approx(1.0)


def test_bias_balancer_updates_once_per_step():
    torch.manual_seed(0)
    model = CodeModel(tiny("moe", balancer="bias", bias_update_rate=0.01))
    model.train()
    model(torch.randint(0, 300, (2, 16)))
    biases = [layer.moe.expert_bias.clone() for layer in model.layers]
    assert all(b.abs().sum() == 0 for b in biases)
    model.after_optimizer_step()
    assert any(layer.moe.expert_bias.abs().sum() > 0 for layer in model.layers)


def test_moe_active_parameters():
    model = CodeModel(tiny("moe", tie_embeddings=True))
    expert = model.layers[0].moe.experts
    per_expert = (expert.gate_up_proj.numel() + expert.down_proj.numel()) // 4
    inactive = 4 * 2 * per_expert  # 4 layers, 2 of 4 experts unused per token
    assert model.num_parameters() - model.num_parameters(active=True) == inactive


def test_mamba_flops_estimate_counts_scan():
    model = CodeModel(tiny("mamba"))
    params_only = 6 * (model.num_parameters(exclude_embeddings=True) + model.lm_head.weight.numel())
    assert model.flops_per_token(64) > params_only
