"""Activation checkpointing: the same gradients as a plain backward pass, for every architecture."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from codeling.config import ModelConfig, load_config
from codeling.errors import ConfigError
from codeling.models.decoder import CodeModel
from codeling.training.trainer import Trainer

VOCAB = 128
# Tiny shapes of each architecture. The sequence spans several Mamba-2 chunks plus a partial
# one, and MoE uses the bias balancer, whose routing counts the recomputation must not change.
ARCHITECTURES = {
    "dense": {},
    "mamba": {"ssm_chunk": 16, "ssm_head_dim": 32},
    "moe": {"n_experts": 4, "top_k": 2, "balancer": "bias", "shared_d_ff": 32},
    "hybrid": {"attn_period": 2, "ssm_chunk": 16, "ssm_head_dim": 32},
}


def build(arch: str, checkpointing: bool) -> CodeModel:
    torch.manual_seed(0)
    config = ModelConfig(arch=arch, vocab_size=VOCAB, d_model=64, n_layers=3, n_heads=4,
                         n_kv_heads=2, max_seq_len=64, **ARCHITECTURES[arch])
    model = CodeModel(config)
    model.activation_checkpointing = checkpointing
    return model


def backward(model: CodeModel, bf16: bool) -> float:
    """Run the training objective (next-token loss plus MoE losses) forward and backward."""
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, VOCAB, (3, 40), generator=generator)
    targets = torch.randint(0, VOCAB, (3, 40), generator=generator)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    with autocast:
        logits = model(inputs)
    loss = F.cross_entropy(logits.float().view(-1, VOCAB), targets.view(-1))
    objective = loss + model.auxiliary_loss()
    objective.backward()
    return objective.item()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_checkpointing_keeps_gradients(arch, bf16):
    plain, checkpointed = build(arch, False), build(arch, True)
    plain_objective = backward(plain, bf16)
    checkpointed_objective = backward(checkpointed, bf16)

    assert checkpointed_objective == plain_objective
    expected = dict(plain.named_parameters())
    for name, param in checkpointed.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=1e-6, atol=1e-7,
                                   msg=name)
    # Routing counts, balancing losses and expert loads are left as the forward pass set them.
    for name, buffer in plain.named_buffers():
        assert torch.equal(dict(checkpointed.named_buffers())[name], buffer), name
    assert checkpointed.expert_loads() == plain.expert_loads()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_checkpointing_recomputes_each_layer(arch):
    model = build(arch, True)
    calls = [0] * len(model.layers)
    for index, layer in enumerate(model.layers):
        # A pre-hook, because the recomputation stops once it has rebuilt what backward needs.
        layer.register_forward_pre_hook(lambda *unused, index=index: calls.__setitem__(
            index, calls[index] + 1))

    backward(model, bf16=False)
    assert calls == [2] * len(model.layers)  # the forward pass, then once more in backward

    calls[:] = [0] * len(model.layers)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))
    model.eval()
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    assert calls == [2] * len(model.layers)  # once each: nothing is checkpointed


def test_checkpointing_leaves_cached_decoding_alone():
    model = build("hybrid", True)
    model.eval()
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(1, 32)
        prefix = model(tokens[:, :8], cache)
        steps = [model(tokens[:, i:i + 1], cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, rtol=1e-4, atol=1e-5)


def test_compiled_moe_checkpointing_is_rejected(tmp_path):
    config = load_config(None, ["model.arch=moe", "model.vocab_size=128", "model.d_model=32",
                                "model.n_layers=1", "model.n_heads=2", "train.compile=true",
                                "train.activation_checkpointing=true"])
    model = CodeModel(config.model)
    with pytest.raises(ConfigError) as error:
        Trainer(model, config, None, [], tmp_path / "stage", tmp_path, "f" * 64,
                torch.device("cpu"), bf16=False)
    assert "train.compile=true" in str(error.value)
    assert not model.activation_checkpointing
