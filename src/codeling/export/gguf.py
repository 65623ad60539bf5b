"""Export a dense codeling checkpoint as a GGUF file for llama.cpp (architecture `llama`).

Rotary layout: codeling, like transformers' Llama, rotates the pair (i, i + E/2) of each head
(half-split). llama.cpp runs the `llama` architecture with its "normal" RoPE, which rotates
adjacent pairs (2i, 2i + 1), the layout of Meta's original Llama weights. So llama.cpp's own
converter (convert_hf_to_gguf.py, `LlamaModel.permute`) reorders the output rows of each head
of attn_q and attn_k from half-split to interleaved order. `interleave_rotary_rows` does the
same here: row 2i of a head takes old row i, and row 2i + 1 takes old row i + E/2. Rotating
adjacent pairs of the reordered rows gives the same query-key dot products as rotating
half-split pairs of the original rows, so the model's outputs are unchanged (see
tests/test_export.py). `deinterleave_rotary_rows` undoes the reordering.

Tensors are written in float32 (GGML type F32), so values round-trip exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from codeling.chat import CHAT_TEMPLATE
from codeling.errors import CodelingError
from codeling.export.hf import load_checkpoint_model
from codeling.models.decoder import CodeModel
from codeling.tokenizer import SPECIAL_TOKENS, Tokenizer

try:
    import gguf
except ImportError:  # export_gguf raises CodelingError when gguf is missing
    gguf = None

# llama.cpp names for the llama architecture (gguf.TENSOR_NAMES in the gguf package).
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_TENSORS = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def interleave_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder each head's output rows from half-split RoPE pairs to adjacent pairs.

    weight is (n_heads * E, D). Within a head, new row 2i is old row i, and new row 2i + 1 is
    old row i + E/2.
    """
    rows, columns = weight.shape
    half = rows // n_heads // 2
    per_head = weight.reshape(n_heads, 2, half, columns)  # [head, which half, i, column]
    return per_head.swapaxes(1, 2).reshape(rows, columns)


def deinterleave_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo `interleave_rotary_rows`: adjacent RoPE pairs back to half-split order."""
    rows, columns = weight.shape
    half = rows // n_heads // 2
    per_head = weight.reshape(n_heads, half, 2, columns)  # [head, i, which half, column]
    return per_head.swapaxes(1, 2).reshape(rows, columns)


def gguf_tensors(model: CodeModel) -> dict[str, np.ndarray]:
    """Return the llama.cpp tensor names and float32 arrays of a dense model, Q and K permuted."""
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        array = tensor.detach().to("cpu", torch.float32).numpy()
        if name in TOP_TENSORS:
            tensors[TOP_TENSORS[name]] = array
            continue
        _, index, rest = name.split(".", 2)
        if name.endswith("q_proj.weight"):
            array = interleave_rotary_rows(array, config.n_heads)
        elif name.endswith("k_proj.weight"):
            array = interleave_rotary_rows(array, config.resolved_kv_heads())
        tensors[f"blk.{index}.{LAYER_TENSORS[rest]}"] = array
    # lm_head is in the state dict even when tied, so output.weight is always written.
    return tensors


def _merges(tokenizer: Tokenizer) -> list[str]:
    """Return BPE merges as "left right" strings, the form llama.cpp reads."""
    merges = json.loads(tokenizer.backend.to_str())["model"]["merges"]
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]


def _add_tokenizer(writer: "gguf.GGUFWriter", tokenizer: Tokenizer, vocab_size: int) -> None:
    """Write gpt2-style BPE metadata. Ids past the tokenizer's vocabulary get unused tokens."""
    if vocab_size < tokenizer.vocab_size:
        raise CodelingError(f"model vocab_size {vocab_size} is smaller than the tokenizer's "
                            f"{tokenizer.vocab_size} tokens; the checkpoint is inconsistent")
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{index}]" for index in range(vocab_size)]
    for token, index in vocab.items():
        tokens[index] = token
    special = set(SPECIAL_TOKENS)
    types = [gguf.TokenType.NORMAL] * vocab_size
    for index, token in enumerate(tokens):
        if index >= tokenizer.vocab_size:
            types[index] = gguf.TokenType.UNUSED
        elif token in special:
            types[index] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    # NOTE: llama.cpp has no pre-tokenizer type for codeling's split regex. "default" selects
    # its GPT-2-like split, so llama.cpp may encode some text to other ids than codeling does.
    # No test runs llama.cpp itself. Decoding gives the same text, because the BPE is byte-level.
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    # Chat runtimes render this template and stop a reply at the end-of-turn token.
    writer.add_eot_token_id(tokenizer.token_id("<|end_turn|>"))
    writer.add_chat_template(CHAT_TEMPLATE)


def export_gguf(checkpoint_path: str | Path, out_file: str | Path) -> Path:
    """Write a llama-architecture GGUF file for the newest dense checkpoint under a path."""
    if gguf is None:
        raise CodelingError("GGUF export needs the gguf package; install it with: "
                            "pip install gguf")
    out_file = Path(out_file)
    if out_file.is_dir():
        raise CodelingError(f"GGUF output {str(out_file)!r} is a directory; pass a file name "
                            "such as model.gguf")
    model, tokenizer, _ = load_checkpoint_model(checkpoint_path)
    config = model.config
    pattern = config.resolved_layer_pattern()
    if set(pattern) != {"A"} or config.resolved_ffn() != "mlp":
        raise CodelingError(f"GGUF export supports dense models only (attention and mlp on "
                            f"every layer), not layer pattern {pattern!r} with ffn="
                            f"{config.resolved_ffn()!r}; export it with --format hf instead")

    out_file.parent.mkdir(parents=True, exist_ok=True)
    temp = out_file.with_name(f".{out_file.name}.tmp")
    architecture = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    writer = gguf.GGUFWriter(str(temp), architecture)
    try:
        writer.add_name(Path(checkpoint_path).name or "codeling")
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(config.max_seq_len)
        writer.add_embedding_length(config.d_model)
        writer.add_block_count(config.n_layers)
        writer.add_feed_forward_length(config.resolved_d_ff())
        writer.add_head_count(config.n_heads)
        writer.add_head_count_kv(config.resolved_kv_heads())
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for name, array in gguf_tensors(model).items():
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temp, out_file)
    except BaseException:
        writer.close()
        temp.unlink(missing_ok=True)
        raise
    return out_file
