"""The decoder: shapes, cached decoding against a full forward pass, accounting, init."""

import math

import pytest
import torch

from codeling.config import ModelConfig
from codeling.models.decoder import CodeModel
from codeling.models.layers import RotaryEmbedding


def tiny_config(**changes):
    base = dict(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CodeModel(tiny_config()).eval()


def test_forward_shape(model):
    tokens = torch.randint(0, 300, (3, 17))
    assert model(tokens).shape == (3, 17, 300)


@pytest.mark.parametrize("split", [[20], [1] * 20, [7, 5, 1, 1, 6], [13, 1, 6]])
def test_cached_decoding_matches_full_forward(model, split):
    tokens = torch.randint(0, 300, (2, sum(split)))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 64)
        pieces, start = [], 0
        for size in split:
            pieces.append(model(tokens[:, start:start + size], cache))
            start += size
    assert cache.pos == sum(split)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_causality(model):
    tokens = torch.randint(0, 300, (1, 12))
    changed = tokens.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 300
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8], b[:, 8])


def test_tied_embeddings_share_storage():
    tied = CodeModel(tiny_config(tie_embeddings=True))
    untied = CodeModel(tiny_config(tie_embeddings=False))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == 300 * 64


def test_parameter_count_by_hand():
    config = tiny_config(tie_embeddings=False, n_kv_heads=2, d_ff=128)
    model = CodeModel(config)
    head_dim = 64 // 4
    attention = 64 * 64 * 2 + 2 * 64 * (2 * head_dim)
    mlp = 3 * 64 * 128
    norms = 2 * 64
    expected = 2 * 300 * 64 + 2 * (attention + mlp + norms) + 64
    assert model.num_parameters() == expected


def test_derived_d_ff_multiple_of_64():
    assert tiny_config(d_model=256).resolved_d_ff() == 704
    assert tiny_config(d_model=64).resolved_d_ff() % 64 == 0


def test_residual_projections_scaled_down():
    torch.manual_seed(0)
    model = CodeModel(tiny_config(d_model=256, n_layers=8, n_heads=4, max_seq_len=16))
    q_std = model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.layers[0].self_attn.o_proj.weight.std().item()
    assert q_std == pytest.approx(0.02, rel=0.05)
    assert o_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_rotary_rejects_positions_past_max():
    rotary = RotaryEmbedding(16, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        rotary(4, 8)


def test_flops_per_token_grows_with_seq_len(model):
    assert model.flops_per_token(64) > model.flops_per_token(16)
    assert model.flops_per_token(16) > 6 * model.num_parameters(exclude_embeddings=True)
