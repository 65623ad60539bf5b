"""Export to transformers and GGUF: the exported models compute what codeling computes."""

import argparse
import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from codeling.config import config_from_dict
from codeling.errors import CodelingError
from codeling.export.command import add_export_parser, run_export
from codeling.export.hf import export_hf
from codeling.models.decoder import CodeModel
from codeling.tokenizer import Tokenizer, train_tokenizer
from codeling.training.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")

VOCAB_SIZE = 512
SAMPLE_TEXT = "def add(a, b):\n    return a + b  # <|eos|> stays text\n"

# init_std 0.3 makes greedy decoding of the random models pick varied tokens instead of
# repeating one, so the generation comparison checks the caches.
BASE = {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 64, "rope_theta": 500.0,
        "norm_eps": 1e-5, "init_std": 0.3}
MAMBA = {"ssm_state": 8, "ssm_head_dim": 8, "ssm_expand": 2, "ssm_chunk": 8, "ssm_conv": 4}
MODELS = {
    "dense": {**BASE, "arch": "dense", "n_kv_heads": 2, "d_ff": 48},
    "dense-untied": {**BASE, "arch": "dense", "tie_embeddings": False, "d_ff": 48},
    "moe": {**BASE, "arch": "moe", "n_experts": 4, "top_k": 2, "moe_d_ff": 24},
    "moe-bias-zero": {**BASE, "arch": "moe", "n_experts": 4, "top_k": 2, "moe_d_ff": 24,
                      "balancer": "bias"},
    "mamba": {**BASE, **MAMBA, "arch": "mamba", "ssm_groups": 2, "tie_embeddings": False},
    "hybrid": {**BASE, **MAMBA, "arch": "hybrid", "n_layers": 4, "attn_period": 2,
               "attn_offset": 1, "ssm_groups": 2, "d_ff": 48, "n_kv_heads": 2},
}
EXPECTED_CLASS = {"dense": "LlamaForCausalLM", "dense-untied": "LlamaForCausalLM",
                  "moe": "MixtralForCausalLM", "moe-bias-zero": "MixtralForCausalLM",
                  "mamba": "Mamba2ForCausalLM", "hybrid": "BambaForCausalLM"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "string.py", "bisect.py")]
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts, VOCAB_SIZE).save(directory)
    return directory


def randomize(model: CodeModel, seed: int) -> None:
    """Give norms, biases and routers random values, so a swapped name changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):  # MoE router: spread logits so routing varies
                param.copy_(torch.randn(param.shape, generator=generator))
            elif param.dim() == 1 and not name.endswith(("A_log", "dt_bias")):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def make_checkpoint(tmp_path: Path, tokenizer_dir: Path, model_settings: dict,
                    seed: int = 0) -> tuple[Path, CodeModel]:
    run_config = config_from_dict({"model": {**model_settings, "vocab_size": VOCAB_SIZE},
                                   "train": {"seq_len": 32}})
    torch.manual_seed(seed)
    model = CodeModel(run_config.model).eval()
    randomize(model, seed)
    tokenizer = Tokenizer.load(tokenizer_dir)
    path = save_checkpoint(tmp_path / "run" / "train", 10, model, run_config, {}, tokenizer_dir,
                           tokenizer.fingerprint)
    return path, model


@torch.no_grad()
def greedy(model: CodeModel, prompt: list[int], new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Decode greedily with codeling's cache, stopping after a stop id as transformers does."""
    cache = model.new_cache(1, len(prompt) + new_tokens)
    tokens = torch.tensor([prompt])
    generated = []
    for _ in range(new_tokens):
        next_id = int(model(tokens, cache)[0, -1].argmax())
        generated.append(next_id)
        if next_id in stop_ids:
            break
        tokens = torch.tensor([[next_id]])
    return generated


@pytest.mark.parametrize("name", list(MODELS))
def test_hf_export_matches_codeling(name, tmp_path, tokenizer_dir):
    checkpoint, model = make_checkpoint(tmp_path, tokenizer_dir, MODELS[name])
    out_dir = export_hf(tmp_path / "run", tmp_path / "hf")
    assert checkpoint.is_dir()
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out_dir / file).is_file(), file
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == [
        EXPECTED_CLASS[name]]

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(theirs).__name__ == EXPECTED_CLASS[name]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out_dir)
    ours_tokenizer = Tokenizer.load(tokenizer_dir)
    prompt = ours_tokenizer.encode(SAMPLE_TEXT)
    # Special-token strings in text stay text only when the tokenizer is asked to split them.
    assert hf_tokenizer(SAMPLE_TEXT, add_special_tokens=False,
                        split_special_tokens=True)["input_ids"] == prompt
    assert hf_tokenizer.decode(prompt) == SAMPLE_TEXT

    tokens = torch.tensor([prompt[:21]])  # 21 tokens span several Mamba-2 chunks of 8
    with torch.no_grad():
        expected = model(tokens)
        got = theirs(tokens).logits
    print(f"{name}: max abs logit difference {(got - expected).abs().max().item():.2e}")
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    with torch.no_grad():
        generated = theirs.generate(tokens, do_sample=False, max_new_tokens=8)
    hf_new = generated[0, tokens.shape[1]:].tolist()
    stop_ids = {ours_tokenizer.eos_id, ours_tokenizer.token_id("<|end_turn|>")}
    assert hf_new == greedy(model, prompt[:21], 8, stop_ids)
    assert len(set(hf_new)) > 2


def test_hf_export_routes_nontrivially(tmp_path, tokenizer_dir):
    _, model = make_checkpoint(tmp_path, tokenizer_dir, MODELS["moe"])
    with torch.no_grad():
        model(torch.randint(0, VOCAB_SIZE, (1, 32)))
    loads = torch.tensor(model.expert_loads())
    assert (loads > 0).sum() > model.config.top_k  # more experts used than one token picks


@pytest.mark.parametrize("settings, message", [
    ({**MODELS["moe"], "shared_d_ff": 16}, "shared_d_ff=16"),
    ({**BASE, "arch": "dense", "ffn": "none"}, "ffn='none'"),
    ({**BASE, **MAMBA, "arch": "hybrid", "n_layers": 4, "ffn": "none"}, "ffn='none'"),
    ({**BASE, **MAMBA, "arch": "mamba", "ffn": "moe"}, "ffn='moe'"),
])
def test_hf_export_rejects_unsupported(settings, message, tmp_path, tokenizer_dir):
    make_checkpoint(tmp_path, tokenizer_dir, settings)
    with pytest.raises(CodelingError, match=message):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hf_export_rejects_nonzero_routing_bias(tmp_path, tokenizer_dir):
    run_config = config_from_dict({"model": {**MODELS["moe-bias-zero"], "vocab_size": VOCAB_SIZE},
                                   "train": {"seq_len": 32}})
    model = CodeModel(run_config.model)
    model.layers[1].moe.expert_bias[2] = 0.5
    tokenizer = Tokenizer.load(tokenizer_dir)
    save_checkpoint(tmp_path / "run" / "train", 1, model, run_config, {}, tokenizer_dir,
                    tokenizer.fingerprint)
    with pytest.raises(CodelingError, match="layer 1: its MoE routing bias"):
        export_hf(tmp_path / "run", tmp_path / "hf")


def test_hf_export_rejects_nonempty_output(tmp_path, tokenizer_dir):
    make_checkpoint(tmp_path, tokenizer_dir, MODELS["dense"])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(CodelingError, match="not empty"):
        export_hf(tmp_path / "run", tmp_path / "hf")


# -- GGUF ------------------------------------------------------------------------------------


def field_value(reader, key: str):
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


@pytest.mark.parametrize("name", ["dense", "dense-untied"])
def test_gguf_export_round_trips(name, tmp_path, tokenizer_dir):
    gguf = pytest.importorskip("gguf")
    from codeling.export.gguf import deinterleave_rotary_rows, export_gguf

    _, model = make_checkpoint(tmp_path, tokenizer_dir, MODELS[name])
    config = model.config
    out_file = export_gguf(tmp_path / "run", tmp_path / "model.gguf")
    reader = gguf.GGUFReader(out_file)

    state = {key: value.numpy() for key, value in model.state_dict().items()}
    expected = {"token_embd.weight": state["embed_tokens.weight"],
                "output_norm.weight": state["norm.weight"],
                "output.weight": state["lm_head.weight"]}
    layer_names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                   "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                   "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                   "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj"}
    for index in range(config.n_layers):
        for theirs, ours in layer_names.items():
            expected[f"blk.{index}.{theirs}.weight"] = state[f"layers.{index}.{ours}.weight"]

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert sorted(tensors) == sorted(expected)
    for tensor_name, array in expected.items():
        tensor = tensors[tensor_name]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor_name
        # GGUF lists dimensions fastest-varying first, the reverse of numpy's order.
        assert tuple(int(d) for d in tensor.shape) == tuple(reversed(array.shape)), tensor_name
        data = np.asarray(tensor.data).reshape(array.shape)
        if tensor_name.endswith("attn_q.weight"):
            data = deinterleave_rotary_rows(data, config.n_heads)
        elif tensor_name.endswith("attn_k.weight"):
            data = deinterleave_rotary_rows(data, config.resolved_kv_heads())
        np.testing.assert_array_equal(data, array, err_msg=tensor_name)

    assert field_value(reader, "general.architecture") == "llama"
    assert field_value(reader, "llama.context_length") == config.max_seq_len
    assert field_value(reader, "llama.embedding_length") == config.d_model
    assert field_value(reader, "llama.block_count") == config.n_layers
    assert field_value(reader, "llama.feed_forward_length") == config.resolved_d_ff()
    assert field_value(reader, "llama.attention.head_count") == config.n_heads
    assert field_value(reader, "llama.attention.head_count_kv") == config.resolved_kv_heads()
    assert field_value(reader, "llama.rope.freq_base") == pytest.approx(config.rope_theta)
    assert field_value(reader, "llama.rope.dimension_count") == config.head_dim
    assert field_value(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(
        config.norm_eps)

    tokenizer = Tokenizer.load(tokenizer_dir)
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    assert field_value(reader, "tokenizer.ggml.model") == "gpt2"
    assert len(tokens) == VOCAB_SIZE
    assert tokens[tokenizer.eos_id] == "<|eos|>"
    assert all(tokenizer.backend.token_to_id(token) == index for index, token in enumerate(tokens))
    types = field_value(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.bos_id] == gguf.TokenType.CONTROL
    assert types[100] == gguf.TokenType.NORMAL
    merges = field_value(reader, "tokenizer.ggml.merges")
    assert len(merges) == VOCAB_SIZE - 16 - 256
    assert all(len(merge.split(" ")) == 2 for merge in merges)
    assert field_value(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_id
    assert field_value(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_id
    assert field_value(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_id
    assert field_value(reader, "tokenizer.ggml.eot_token_id") == tokenizer.token_id("<|end_turn|>")
    from codeling.chat import CHAT_TEMPLATE

    assert field_value(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


def test_gguf_rotary_permutation_keeps_attention_scores():
    from codeling.export.gguf import interleave_rotary_rows
    from codeling.models.layers import RotaryEmbedding, apply_rotary

    torch.manual_seed(0)
    heads, head_dim, d_model = 2, 8, 16
    q_weight = torch.randn(heads * head_dim, d_model)
    k_weight = torch.randn(heads * head_dim, d_model)
    x = torch.randn(5, d_model)
    cos, sin = RotaryEmbedding(head_dim, 16, 500.0)(0, 5)  # (T, E)

    def half_split_scores(qw, kw):
        q = apply_rotary((x @ qw.T).view(5, heads, head_dim).transpose(0, 1), cos, sin)
        k = apply_rotary((x @ kw.T).view(5, heads, head_dim).transpose(0, 1), cos, sin)
        return q @ k.transpose(-1, -2)

    def interleaved_scores(qw, kw):
        # llama.cpp's normal RoPE: rotate adjacent pairs (2i, 2i + 1) by the angle of pair i.
        def rotate(t):
            pairs = t.view(heads, 5, head_dim // 2, 2)
            c, s = cos[:, : head_dim // 2, None], sin[:, : head_dim // 2, None]
            first, second = pairs[..., :1], pairs[..., 1:]
            return torch.cat([first * c - second * s, first * s + second * c], -1).flatten(-2)
        q = rotate((x @ qw.T).view(5, heads, head_dim).transpose(0, 1))
        k = rotate((x @ kw.T).view(5, heads, head_dim).transpose(0, 1))
        return q @ k.transpose(-1, -2)

    permuted_q = torch.from_numpy(interleave_rotary_rows(q_weight.numpy(), heads))
    permuted_k = torch.from_numpy(interleave_rotary_rows(k_weight.numpy(), heads))
    torch.testing.assert_close(interleaved_scores(permuted_q, permuted_k),
                               half_split_scores(q_weight, k_weight), rtol=1e-5, atol=1e-5)


def test_gguf_export_rejects_moe(tmp_path, tokenizer_dir):
    pytest.importorskip("gguf")
    from codeling.export.gguf import export_gguf

    make_checkpoint(tmp_path, tokenizer_dir, MODELS["moe"])
    with pytest.raises(CodelingError, match="dense models only"):
        export_gguf(tmp_path / "run", tmp_path / "model.gguf")


# -- command line ----------------------------------------------------------------------------


def test_export_command_writes_hf(tmp_path, tokenizer_dir, capsys):
    make_checkpoint(tmp_path, tokenizer_dir, MODELS["dense"])
    parser = argparse.ArgumentParser(prog="codeling")
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(tmp_path / "run"), "--format", "hf",
                              str(tmp_path / "out")])
    assert run_export(args) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert str(tmp_path / "out") in capsys.readouterr().out
