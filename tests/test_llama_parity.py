"""The dense model computes what transformers' LlamaForCausalLM computes with the same weights."""

import pytest
import torch

from codeling.config import ModelConfig
from codeling.models.decoder import CodeModel

transformers = pytest.importorskip("transformers")


def to_llama(model: CodeModel) -> "transformers.LlamaForCausalLM":
    config = model.config
    llama_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=config.resolved_d_ff(), num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads, num_key_value_heads=config.resolved_kv_heads(),
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
        attention_bias=False, mlp_bias=False)
    llama = transformers.LlamaForCausalLM(llama_config).eval()
    state = {("lm_head.weight" if name == "lm_head.weight" else f"model.{name}"): tensor
             for name, tensor in model.state_dict().items()}
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected
    assert all("rotary" in name for name in missing)
    return llama


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_llama(tie):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=64, tie_embeddings=tie)
    model = CodeModel(config).eval()
    llama = to_llama(model)
    tokens = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        ours = model(tokens)
        theirs = llama(tokens).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
