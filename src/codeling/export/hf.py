"""Export a codeling checkpoint as a transformers model directory.

Each supported layout maps onto one transformers class by renaming parameters:

    attention + SwiGLU on every layer       -> LlamaForCausalLM
    attention + routed experts              -> MixtralForCausalLM
    Mamba-2 on every layer, no feed-forward -> Mamba2ForCausalLM
    Mamba-2 and attention, SwiGLU per layer -> BambaForCausalLM

The output has config.json, model.safetensors and the tokenizer files that
`AutoTokenizer.from_pretrained` reads. A model that one of these classes would
compute differently raises `CodelingError` instead of being exported.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from codeling.config import ModelConfig
from codeling.errors import CodelingError
from codeling.models.decoder import CodeModel
from codeling.tokenizer import Tokenizer
from codeling.training import checkpoint as ckpt


def load_checkpoint_model(checkpoint_path: str | Path) -> tuple[CodeModel, Tokenizer, Path]:
    """Load the newest checkpoint under a run, stage or checkpoint directory onto the CPU."""
    loaded = ckpt.read_checkpoint_config(ckpt.resolve_checkpoint(checkpoint_path))
    if loaded.meta.get("quantization"):
        source = loaded.meta.get("source_checkpoint", "the fp32 checkpoint it was made from")
        raise CodelingError(f"{loaded.path} contains {loaded.meta['quantization']} weights, which "
                            f"export does not take; export {source} instead")
    tokenizer = Tokenizer.load(loaded.tokenizer_path)
    ckpt.check_tokenizer(loaded.meta, loaded.path, tokenizer.fingerprint,
                         str(loaded.tokenizer_path))
    model = CodeModel(loaded.config.model)
    ckpt.load_weights(model, loaded.path)
    return model.eval(), tokenizer, loaded.path


def hf_architecture(config: ModelConfig) -> str:
    """Return the transformers class that computes the same function as `config`, or raise."""
    pattern = config.resolved_layer_pattern()
    ffn = config.resolved_ffn()
    mixers = set(pattern)
    if mixers == {"A"} and ffn == "mlp":
        return "LlamaForCausalLM"
    if mixers == {"A"} and ffn == "moe":
        if config.shared_d_ff > 0:
            raise CodelingError(f"cannot export model.shared_d_ff={config.shared_d_ff}: "
                                "MixtralForCausalLM has no shared expert; only MoE models "
                                "with shared_d_ff=0 export to transformers")
        return "MixtralForCausalLM"
    if mixers == {"M"} and ffn == "none":
        return "Mamba2ForCausalLM"
    if "M" in mixers and ffn == "mlp":
        return "BambaForCausalLM"
    raise CodelingError(f"cannot export layer pattern {pattern!r} with ffn={ffn!r}: transformers "
                        "has no matching class; supported are all-attention with mlp (Llama) or "
                        "moe (Mixtral), all-Mamba-2 with ffn none (Mamba2), and Mamba-2 layers "
                        "mixed with attention with mlp (Bamba)")


def _special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            "pad_token_id": tokenizer.pad_id}


def _rope_parameters(config: ModelConfig, partial_rotary_factor: float | None = None) -> dict:
    parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if partial_rotary_factor is not None:
        parameters["partial_rotary_factor"] = partial_rotary_factor
    return parameters


def _attention_fields(config: ModelConfig) -> dict[str, Any]:
    return {
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.resolved_kv_heads(),
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rope_parameters": _rope_parameters(config),
        "attention_bias": False,
        "attention_dropout": 0.0,
    }


def llama_export(model: CodeModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return the LlamaForCausalLM config fields and state dict of a dense model."""
    config = model.config
    fields = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.resolved_d_ff(),
        "num_hidden_layers": config.n_layers,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        **_attention_fields(config),
    }
    return fields, _prefixed_state(model, "model.")


def mixtral_export(model: CodeModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return the MixtralForCausalLM config fields and state dict of an attention + MoE model.

    Mixtral routes by softmax, top-k and renormalization over the chosen k, as codeling does.
    A nonzero routing bias of the bias balancer changes which experts are chosen, which
    Mixtral cannot express, so such a model raises.
    """
    config = model.config
    for index, layer in enumerate(model.layers):
        bias = getattr(layer.moe, "expert_bias", None)
        if bias is not None and bool(bias.abs().max() > 0):
            raise CodelingError(
                f"cannot export layer {index}: its MoE routing bias (balancer='bias') is "
                f"nonzero (max |bias| = {bias.abs().max().item():.3g}), and MixtralForCausalLM "
                "has no routing bias; train with balancer=aux_loss to export to transformers")
        if not layer.moe.normalize_weights:
            raise CodelingError(f"cannot export layer {index}: its MoE weights are not "
                                "renormalized over the top-k experts, which Mixtral always does")
    fields = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.resolved_moe_d_ff(),
        "num_hidden_layers": config.n_layers,
        "num_local_experts": config.n_experts,
        "num_experts_per_tok": config.top_k,
        "router_jitter_noise": 0.0,
        "router_aux_loss_coef": config.aux_loss_coef,
        "output_router_logits": False,
        "sliding_window": None,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        **_attention_fields(config),
    }
    state = {}
    for name, tensor in _prefixed_state(model, "model.").items():
        if name.endswith("moe.expert_bias"):
            continue  # checked to be zero above
        state[name.replace(".moe.", ".mlp.")] = tensor
    return fields, state


def _mamba_fields(config: ModelConfig) -> dict[str, Any]:
    inner = config.ssm_expand * config.d_model
    return {"heads": inner // config.ssm_head_dim, "head_dim": config.ssm_head_dim,
            "state": config.ssm_state, "expand": config.ssm_expand, "conv": config.ssm_conv,
            "groups": config.ssm_groups, "chunk": config.ssm_chunk}


def mamba2_export(model: CodeModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return the Mamba2ForCausalLM config fields and state dict of an all-Mamba-2 model.

    Mamba2ForCausalLM uses one epsilon (`layer_norm_epsilon`) for the block norms and the
    gated norm inside the mixer, as codeling does with `norm_eps`.
    """
    config = model.config
    mamba = _mamba_fields(config)
    fields = {
        "model_type": "mamba2",
        "architectures": ["Mamba2ForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_heads": mamba["heads"],
        "head_dim": mamba["head_dim"],
        "state_size": mamba["state"],
        "expand": mamba["expand"],
        "conv_kernel": mamba["conv"],
        "n_groups": mamba["groups"],
        "chunk_size": mamba["chunk"],
        "layer_norm_epsilon": config.norm_eps,
        "use_bias": False,
        "use_conv_bias": True,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "time_step_limit": [0.0, float("inf")],
        "tie_word_embeddings": config.tie_embeddings,
    }
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "embed_tokens.weight":
            name = "backbone.embeddings.weight"
        elif name == "norm.weight":
            name = "backbone.norm_f.weight"
        elif name.startswith("layers."):
            name = "backbone." + name.replace(".input_layernorm.", ".norm.").replace(
                ".mamba.", ".mixer.")
        state[name] = tensor
    return fields, state


def bamba_export(model: CodeModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return the BambaForCausalLM config fields and state dict of a Mamba-2 hybrid with MLPs.

    BambaConfig hard-codes partial_rotary_factor=0.5 unless `rope_parameters` sets it, and
    codeling rotates the whole head, so the config sets it to 1.0 explicitly.
    """
    config = model.config
    pattern = config.resolved_layer_pattern()
    mamba = _mamba_fields(config)
    fields = {
        "model_type": "bamba",
        "architectures": ["BambaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.resolved_d_ff(),
        "num_hidden_layers": config.n_layers,
        "attn_layer_indices": [i for i, letter in enumerate(pattern) if letter == "A"],
        "mamba_n_heads": mamba["heads"],
        "mamba_d_head": mamba["head_dim"],
        "mamba_n_groups": mamba["groups"],
        "mamba_d_state": mamba["state"],
        "mamba_d_conv": mamba["conv"],
        "mamba_expand": mamba["expand"],
        "mamba_chunk_size": mamba["chunk"],
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
        "time_step_limit": [0.0, float("inf")],
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        **_attention_fields(config),
        "rope_parameters": _rope_parameters(config, partial_rotary_factor=1.0),
    }
    state = {}
    for name, tensor in _prefixed_state(model, "model.").items():
        name = name.replace(".post_attention_layernorm.", ".pre_ff_layernorm.")
        name = name.replace(".mlp.", ".feed_forward.").replace("model.norm.", "model.final_layernorm.")
        state[name] = tensor
    return fields, state


def _prefixed_state(model: CodeModel, prefix: str) -> dict[str, torch.Tensor]:
    """Return the state dict with `prefix` on every name except lm_head (Llama-style layout)."""
    return {(name if name.startswith("lm_head.") else prefix + name): tensor
            for name, tensor in model.state_dict().items()}


EXPORTERS = {
    "LlamaForCausalLM": llama_export,
    "MixtralForCausalLM": mixtral_export,
    "Mamba2ForCausalLM": mamba2_export,
    "BambaForCausalLM": bamba_export,
}


def _write_safetensors(state: dict[str, torch.Tensor], file: Path, tied: bool) -> None:
    """Write tensors, leaving out lm_head when tied, because transformers ties it again on load."""
    tensors = {}
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    save_file(tensors, str(file), metadata={"format": "pt"})


def export_hf(checkpoint_path: str | Path, out_dir: str | Path) -> Path:
    """Write a transformers model directory for the newest checkpoint under `checkpoint_path`.

    The directory gets config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (with the chat template) and special_tokens_map.json. It is written
    next to `out_dir` and renamed into place, so a failed export leaves nothing behind. Raises `CodelingError` for a model that no
    transformers class computes exactly.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CodelingError(f"output directory {str(out_dir)!r} is not empty; pass a new or "
                            "empty directory")
    model, tokenizer, source = load_checkpoint_model(checkpoint_path)
    architecture = hf_architecture(model.config)
    fields, state = EXPORTERS[architecture](model)

    dtype = next(iter(state.values())).dtype
    fields.update(_special_ids(tokenizer))
    fields["dtype"] = str(dtype).removeprefix("torch.")
    fields["use_cache"] = True

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_safetensors(state, temp / "model.safetensors", model.config.tie_embeddings)
        (temp / "config.json").write_text(json.dumps(fields, indent=2) + "\n")
        # `generate` stops at the end of a document and at the end of a chat turn.
        generation = {"bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id,
                      "eos_token_id": [tokenizer.eos_id, tokenizer.token_id("<|end_turn|>")]}
        (temp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        tokenizer.save(temp)
        (temp / "codeling_source.json").write_text(
            json.dumps({"checkpoint": str(source)}, indent=2) + "\n")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out_dir
