"""The Mamba-2 mixer: chunked scan vs the sequential reference, decoding cache, transformers parity."""

import math

import pytest
import torch
import torch.nn.functional as F

from codeling.models.mamba import (
    NO_WEIGHT_DECAY_ATTR,
    Mamba2Mixer,
    segment_sum,
    sequential_scan,
    ssd_chunked,
)


def make_mixer(**overrides) -> Mamba2Mixer:
    settings = dict(d_model=32, d_state=8, d_conv=4, expand=2, head_dim=16, n_groups=2,
                    chunk_size=8)
    settings.update(overrides)
    return Mamba2Mixer(**settings)


def random_scan_inputs(length: int, batch=2, heads=4, head_dim=8, groups=2, state_size=16):
    x = torch.randn(batch, length, heads, head_dim)
    dt = torch.rand(batch, length, heads) * 0.5 + 0.01
    A = -torch.linspace(0.5, 4.0, heads)
    B = torch.randn(batch, length, groups, state_size)
    C = torch.randn(batch, length, groups, state_size)
    D = torch.randn(heads)
    return x, dt, A, B, C, D


def test_segment_sum_values():
    log_decay = torch.tensor([-1.0, -2.0, -4.0])
    out = segment_sum(log_decay)
    inf = float("-inf")
    expected = torch.tensor([[0.0, inf, inf],
                             [-2.0, 0.0, inf],
                             [-6.0, -4.0, 0.0]])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("length", [8, 13, 32, 5])
def test_chunked_scan_matches_sequential(length):
    torch.manual_seed(length)
    x, dt, A, B, C, D = random_scan_inputs(length)
    initial = torch.randn(2, 4, 8, 16)

    for start in (None, initial):
        expected_y, expected_state = sequential_scan(x, dt, A, B, C, D, start)
        y, state = ssd_chunked(x, dt, A, B, C, D, chunk_size=8, initial_state=start)
        assert y.shape == (2, length, 4, 8)
        assert state.shape == (2, 4, 8, 16)
        torch.testing.assert_close(y, expected_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, expected_state, rtol=1e-5, atol=1e-5)


def test_chunked_scan_gradients_match_sequential():
    torch.manual_seed(0)
    inputs = [t.requires_grad_() for t in random_scan_inputs(11)]
    upstream = torch.randn(2, 11, 4, 8)

    y, _ = sequential_scan(*inputs)
    expected = torch.autograd.grad((y * upstream).sum(), inputs)
    y, _ = ssd_chunked(*inputs, chunk_size=4)
    got = torch.autograd.grad((y * upstream).sum(), inputs)

    for name, g, e in zip(["x", "dt", "A", "B", "C", "D"], got, expected):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=f"gradient of {name}")


def test_chunked_scan_stable_with_strong_decay():
    # Large dt * |A| would overflow exp() of a differenced cumulative sum; segment sums do not.
    torch.manual_seed(0)
    x, dt, A, B, C, D = random_scan_inputs(16)
    dt = dt * 200.0
    y, state = ssd_chunked(x, dt, A, B, C, D, chunk_size=16)
    expected_y, _ = sequential_scan(x, dt, A, B, C, D)
    assert torch.isfinite(y).all()
    assert torch.isfinite(state).all()
    torch.testing.assert_close(y, expected_y, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("prompt_length", [8, 5, 13, 1])
def test_prefill_then_steps_match_full_forward(prompt_length):
    torch.manual_seed(prompt_length)
    mixer = make_mixer().eval()
    x = torch.randn(2, prompt_length + 9, 32)
    with torch.no_grad():
        expected = mixer(x)
        cache = mixer.new_cache(2)
        pieces = [mixer(x[:, :prompt_length], cache)]
        for t in range(prompt_length, prompt_length + 6):
            pieces.append(mixer(x[:, t:t + 1], cache))
        pieces.append(mixer(x[:, prompt_length + 6:], cache))  # a multi-token chunk after steps
    got = torch.cat(pieces, dim=1)

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert cache.seen_tokens == x.shape[1]
    assert cache.conv_state.shape == (2, mixer.conv_channels, 4)
    assert cache.ssm_state.shape == (2, mixer.n_heads, 16, 8)
    assert cache.ssm_state.dtype == torch.float32


def test_cache_reset_restarts_sequences():
    torch.manual_seed(0)
    mixer = make_mixer().eval()
    x = torch.randn(1, 6, 32)
    cache = mixer.new_cache(1)
    with torch.no_grad():
        first = mixer(x, cache)
        cache.reset()
        second = mixer(x, cache)
    torch.testing.assert_close(second, first)
    assert cache.seen_tokens == 6


def test_cache_batch_mismatch_raises():
    mixer = make_mixer()
    cache = mixer.new_cache(3)
    with pytest.raises(ValueError, match="batch size 3"):
        mixer(torch.randn(2, 4, 32), cache)


def test_invalid_sizes_raise():
    with pytest.raises(ValueError, match="head_dim=24"):
        Mamba2Mixer(32, head_dim=24)
    with pytest.raises(ValueError, match="n_groups=3"):
        Mamba2Mixer(32, head_dim=16, n_groups=3)


def test_init_follows_mamba2_reference():
    torch.manual_seed(0)
    mixer = Mamba2Mixer(256, head_dim=16, dt_min=0.001, dt_max=0.1)
    A = torch.exp(mixer.A_log)
    assert A.min() >= 1.0
    assert A.max() <= 16.0
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 0.001 * (1 - 1e-4)
    assert dt.max() <= 0.1 * (1 + 1e-4)
    assert torch.equal(mixer.D, torch.ones(32))


def test_ssm_parameters_skip_weight_decay():
    mixer = make_mixer()
    for name in ("A_log", "D", "dt_bias"):
        assert getattr(getattr(mixer, name), NO_WEIGHT_DECAY_ATTR, False) is True, name
    assert not getattr(mixer.in_proj.weight, NO_WEIGHT_DECAY_ATTR, False)


def test_every_parameter_gets_gradient():
    torch.manual_seed(0)
    mixer = make_mixer()
    mixer(torch.randn(2, 11, 32)).pow(2).mean().backward()
    for name, param in mixer.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_bf16_autocast_keeps_ssm_in_fp32():
    torch.manual_seed(0)
    mixer = make_mixer()
    x = torch.randn(2, 13, 32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = mixer(x)
        step_cache = mixer.new_cache(2)
        mixer(x[:, :5], step_cache)
        step = mixer(x[:, 5:6], step_cache)
    out.float().sum().backward()

    assert torch.isfinite(out).all()
    assert torch.isfinite(step).all()
    assert step_cache.ssm_state.dtype == torch.float32
    for name in ("A_log", "D", "dt_bias"):
        assert getattr(mixer, name).dtype == torch.float32, name
        assert torch.isfinite(getattr(mixer, name).grad).all(), name
    reference = mixer(x)
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


# -- parity with transformers' Mamba2Mixer (torch path) ---------------------------------------------


def hf_mixer_for(mixer: Mamba2Mixer):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    config = transformers.Mamba2Config(
        hidden_size=mixer.d_model, num_heads=mixer.n_heads, head_dim=mixer.head_dim,
        state_size=mixer.d_state, expand=mixer.d_inner // mixer.d_model,
        conv_kernel=mixer.d_conv, n_groups=mixer.n_groups, chunk_size=mixer.chunk_size,
        layer_norm_epsilon=mixer.norm.eps, use_bias=False, use_conv_bias=True,
        hidden_act="silu", num_hidden_layers=1)
    return HFMamba2Mixer(config, layer_idx=0).eval()


def test_parameter_names_match_transformers():
    mixer = make_mixer()
    theirs = hf_mixer_for(mixer)
    ours = {name: tuple(t.shape) for name, t in mixer.state_dict().items()}
    expected = {name: tuple(t.shape) for name, t in theirs.state_dict().items()}
    assert ours == expected


@pytest.mark.parametrize("n_groups", [1, 2])
def test_outputs_match_transformers_mixer(n_groups):
    torch.manual_seed(n_groups)
    mixer = make_mixer(n_groups=n_groups).eval()
    theirs = hf_mixer_for(mixer)
    theirs.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 21, 32)  # 21 is not a multiple of chunk_size 8
    with torch.no_grad():
        expected = theirs(x)
        got = mixer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert math.isclose(mixer.norm.eps, theirs.norm.variance_epsilon)
