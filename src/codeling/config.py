"""Typed run configuration: dataclasses, YAML loading, `--set` overrides and validation.

A run config has four sections, one dataclass each: `model`, `tokenizer`, `data` and `train`,
plus top-level `name` and `run_dir`. Every field carries its help text and its validation rules
(`min`, `max`, `choices`) in its metadata. `load_config` collects every problem in a file and
raises them together as one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from codeling.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_PRESET_DIR = REPO_ROOT / "configs" / "models"


def option(default: Any, help: str, **rules: Any) -> Any:
    """Declare a config field with its help text and validation rules."""
    metadata = {"help": help, **rules}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


ARCHITECTURES = ["dense", "mamba", "moe", "hybrid"]
MIXERS = {"A": "causal self-attention", "M": "Mamba-2"}
FEED_FORWARDS = ["auto", "mlp", "moe", "none"]


@dataclass
class ModelConfig:
    """Architecture of the decoder: sizes, the per-layer pattern and each layer type's settings."""

    arch: str = option("dense", "architecture family; sets the default layer pattern and "
                       "feed-forward: dense = attention + MLP, mamba = Mamba-2 only, moe = "
                       "attention + MoE, hybrid = Mamba-2 with attention every attn_period layers",
                       choices=ARCHITECTURES)
    layer_pattern: str = option(
        "", "one letter per layer, A = attention, M = Mamba-2; empty = derived from arch")
    ffn: str = option("auto", "feed-forward after each mixer: mlp (SwiGLU), moe, none; auto = "
                      "moe for arch moe, none for arch mamba, mlp otherwise", choices=FEED_FORWARDS)
    attn_period: int = option(4, "hybrid only: one attention layer in every attn_period layers",
                              min=1)
    attn_offset: int = option(2, "hybrid only: index of the attention layer inside each period",
                              min=0)
    vocab_size: int = option(0, "vocabulary size in tokens; 0 = take it from the run's tokenizer",
                             min=0)
    d_model: int = option(256, "width of the residual stream (hidden size)", min=8)
    n_layers: int = option(4, "number of decoder layers", min=1)
    n_heads: int = option(4, "attention query heads per layer", min=1)
    n_kv_heads: int = option(0, "key/value heads (grouped-query attention); 0 = n_heads", min=0)
    d_ff: int = option(0, "SwiGLU hidden size; 0 = 8/3 * d_model rounded up to a multiple of 64",
                       min=0)
    max_seq_len: int = option(1024, "longest sequence the model is built for, in tokens", min=8)
    rope_theta: float = option(10000.0, "RoPE base frequency", min=1.0)
    norm_eps: float = option(1e-5, "RMSNorm epsilon", min=0.0)
    tie_embeddings: bool = option(True, "share the input embedding and the output projection")
    init_std: float = option(0.02, "standard deviation of the normal weight init", min=0.0)
    # Mamba-2 mixer.
    ssm_state: int = option(64, "Mamba-2 state size N per head", min=1)
    ssm_conv: int = option(4, "Mamba-2 causal convolution width, in tokens", min=1)
    ssm_expand: int = option(2, "Mamba-2 inner width as a multiple of d_model", min=1)
    ssm_head_dim: int = option(64, "Mamba-2 head size; must divide ssm_expand * d_model", min=1)
    ssm_groups: int = option(1, "Mamba-2 groups sharing B and C; must divide the head count",
                             min=1)
    ssm_chunk: int = option(64, "Mamba-2 chunk length of the SSD scan, in tokens", min=1)
    # Mixture of experts.
    n_experts: int = option(8, "MoE routed experts per layer", min=1)
    top_k: int = option(2, "MoE experts chosen per token", min=1)
    moe_d_ff: int = option(0, "hidden size of each MoE expert; 0 = d_ff / top_k, so the active "
                           "feed-forward matches a dense MLP", min=0)
    shared_d_ff: int = option(0, "hidden size of an always-on shared expert; 0 = none", min=0)
    balancer: str = option("aux_loss", "MoE load balancing: aux_loss (Switch auxiliary loss) or "
                           "bias (auxiliary-loss-free routing bias)", choices=["aux_loss", "bias"])
    aux_loss_coef: float = option(0.01, "weight of the MoE load-balancing loss (aux_loss "
                                  "balancer)", min=0.0)
    z_loss_coef: float = option(0.001, "weight of the MoE router z-loss", min=0.0)
    bias_update_rate: float = option(0.001, "bias balancer: step of each routing-bias update, "
                                     "applied once per optimizer step", min=0.0)

    def resolved_layer_pattern(self) -> str:
        """Return the explicit mixer pattern, derived from `arch` when left empty."""
        if self.layer_pattern:
            return self.layer_pattern
        if self.arch == "mamba":
            return "M" * self.n_layers
        if self.arch == "hybrid":
            return "".join("A" if i % self.attn_period == self.attn_offset % self.attn_period
                           else "M" for i in range(self.n_layers))
        return "A" * self.n_layers

    def resolved_ffn(self) -> str:
        """Return the feed-forward kind, derived from `arch` when `auto`."""
        if self.ffn != "auto":
            return self.ffn
        return {"moe": "moe", "mamba": "none"}.get(self.arch, "mlp")

    def resolved_kv_heads(self) -> int:
        """Return the number of key/value heads, defaulting to `n_heads`."""
        return self.n_kv_heads or self.n_heads

    def resolved_d_ff(self) -> int:
        """Return the SwiGLU hidden size, derived from `d_model` when 0."""
        if self.d_ff:
            return self.d_ff
        hidden = int(8 * self.d_model / 3)
        return 64 * ((hidden + 63) // 64)

    def resolved_moe_d_ff(self) -> int:
        """Return each expert's hidden size, derived from d_ff and top_k when 0."""
        return self.moe_d_ff or max(self.resolved_d_ff() // self.top_k, 8)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class TokenizerConfig:
    """Stage 0: the byte-level BPE tokenizer."""

    path: str = option("", "existing tokenizer.json or directory to use; empty = train one")
    vocab_size: int = option(4096, "vocabulary size of a newly trained tokenizer, in tokens",
                             min=512, max=1 << 20)
    sources: list[str] = option([], "sources to train on; empty = the data sources")
    max_bytes_per_source: int = option(8_000_000, "text sampled from each source for training, "
                                       "in bytes", min=1000)


@dataclass
class DataConfig:
    """Training data: the sources, their mixture and the validation split."""

    sources: list[str] = option(
        ["python-stdlib", "shell-scripts"],
        "source specs: python-stdlib, shell-scripts, files:GLOB, jsonl:PATH[:FIELD], hf:DATASET")
    weights: list[float] = option(
        [], "mixture weight per source, same order as sources; empty = proportional to tokens")
    fallback_sources: list[str] = option(
        [], "sources used instead when a hub source cannot be reached (for example python-docs "
        "for tinystories when offline)")
    replay_sources: list[str] = option(
        [], "sources of an earlier stage mixed back in against forgetting")
    replay_fraction: float = option(0.0, "share of training samples drawn from replay_sources",
                                    min=0.0, max=0.9)
    group_by_length: bool = option(
        True, "sft: put conversations of similar length in the same batch (sorted within "
        "windows of 64 batches, batch order shuffled), so less of each batch is padding")
    val_fraction: float = option(0.05, "fraction of documents held out for validation",
                                 min=0.0, max=0.5)
    max_documents: int = option(0, "documents taken per source; 0 = all", min=0)
    num_workers: int = option(0, "processes used to tokenize; 0 = one per CPU core", min=0)


@dataclass
class TrainConfig:
    """The optimization loop: batch, schedule, budget, logging and checkpoints."""

    batch_size: int = option(16, "sequences per micro-batch", min=1)
    seq_len: int = option(256, "tokens per training sequence", min=8)
    grad_accum: int = option(1, "micro-batches per optimizer step", min=1)
    lr: float = option(3e-3, "peak learning rate", min=0.0, exclusive_min=True)
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of lr", min=0.0, max=1.0)
    schedule: str = option("cosine", "decay after warmup", choices=["cosine", "wsd", "constant"])
    warmup_steps: int = option(50, "optimizer steps of linear warmup", min=0)
    decay_fraction: float = option(0.2, "wsd only: fraction of steps spent decaying",
                                   min=0.0, max=1.0)
    weight_decay: float = option(0.1, "AdamW weight decay on matrices (not norms or embeddings)",
                                 min=0.0)
    beta1: float = option(0.9, "AdamW beta1", min=0.0, max=1.0)
    beta2: float = option(0.95, "AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this value; 0 = off", min=0.0)
    max_steps: int = option(1000, "stop after this many optimizer steps", min=1)
    max_tokens: int = option(0, "stop after this many training tokens; 0 = no limit", min=0)
    max_epochs: float = option(0.0, "stop after this many passes over the training data (the "
                               "windows, conversations or pairs of all its sources together); "
                               "0 = no limit", min=0.0)
    max_minutes: float = option(0.0, "stop after this much wall-clock time in minutes; "
                                "0 = no limit", min=0.0)
    eval_every: int = option(100, "optimizer steps between validation passes; 0 = only at the end",
                             min=0)
    eval_batches: int = option(20, "micro-batches per validation pass", min=1)
    log_every: int = option(10, "optimizer steps between log lines", min=1)
    log_to: list[str] = option([], "also send metrics to these trackers (rank 0 only): "
                               "tensorboard (event files in <stage>/tensorboard) or wandb "
                               "(offline unless WANDB_MODE is set); each needs its pip package",
                               choices=["tensorboard", "wandb"])
    checkpoint_every: int = option(200, "optimizer steps between checkpoints; 0 = only at the end",
                                   min=0)
    keep_checkpoints: int = option(2, "most recent checkpoints kept on disk", min=1)
    precision: str = option("auto", "auto = bf16 autocast where the device supports it",
                            choices=["auto", "bf16", "fp32"])
    compile: bool = option(False, "compile the model with torch.compile (slow start, faster steps)")
    activation_checkpointing: bool = option(
        False, "recompute each decoder layer's activations in the backward pass: less memory, "
        "about one more forward pass of compute")
    memory_check: bool = option(True, "stop before training when the memory estimate "
                                "exceeds the free memory of the device; false = only log it")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    distributed: str = option("ddp", "data parallelism under torchrun: ddp = a full copy of "
                              "the model per process; fsdp = FSDP2, parameters, gradients and "
                              "optimizer state sharded across processes", choices=["ddp", "fsdp"])
    seed: int = option(1337, "seed for weights, data order and sampling", min=0)
    objective: str = option("lm", "lm = next-token loss on every token; sft = loss only on the "
                            "assistant's tokens of conversations (chat sources); dpo = direct "
                            "preference optimization on preference pairs; grpo = online RL "
                            "with rewards from running sampled code against unit tests",
                            choices=["lm", "sft", "dpo", "grpo"])
    beta: float = option(0.1, "dpo: strength of the pull towards the reference model; the "
                         "implicit reward is beta times the policy/reference log-ratio",
                         min=0.0, exclusive_min=True)
    dpo_loss: str = option("sigmoid", "dpo: sigmoid = the DPO loss (with label_smoothing, "
                           "conservative DPO); ipo = the IPO squared loss",
                           choices=["sigmoid", "ipo"])
    label_smoothing: float = option(0.0, "dpo: assumed probability that a preference label is "
                                    "flipped (conservative DPO); sigmoid loss only", min=0.0,
                                    max=0.5)
    dpo_nll_weight: float = option(0.0, "dpo: weight of an added next-token loss on the chosen "
                                   "responses (per token), which keeps their likelihood from "
                                   "falling while the margin grows; 0 = plain DPO", min=0.0)
    lora_rank: int = option(0, "rank of LoRA adapters on the lora_targets layers, which freezes "
                            "the rest; 0 = train every weight", min=0)
    lora_alpha: float = option(16.0, "LoRA scale numerator: updates are scaled by alpha / rank",
                               min=0.0, exclusive_min=True)
    lora_dropout: float = option(0.0, "dropout on the LoRA input", min=0.0, max=0.9)
    lora_targets: list[str] = option(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj",
         "out_proj"], "names of the Linear layers that get LoRA adapters")
    grpo_group_size: int = option(8, "grpo: completions sampled per prompt; rewards are "
                                  "normalized within each group", min=2)
    grpo_prompts_per_step: int = option(8, "grpo: code tasks (prompts) per optimizer step", min=1)
    grpo_inner_steps: int = option(1, "grpo: optimizer steps on each batch of samples; above 1 "
                                   "the policy ratio moves away from 1 and clipping applies",
                                   min=1)
    grpo_clip: float = option(0.2, "grpo: clip the policy ratio to [1 - clip, 1 + clip]",
                              min=0.0, max=1.0, exclusive_min=True)
    grpo_kl_coef: float = option(0.04, "grpo: weight of the KL penalty to the reference (the "
                                 "init_from weights)", min=0.0)
    grpo_max_new_tokens: int = option(96, "grpo: maximum number of tokens sampled for one "
                                      "completion", min=1)
    grpo_temperature: float = option(1.0, "grpo: sampling temperature; log-probabilities use the "
                                     "same temperature", min=0.0, exclusive_min=True)
    grpo_partial_credit: float = option(0.5, "grpo: reward of a failing completion per share of "
                                        "asserts passed; a passing one gets 1.0", min=0.0,
                                        max=1.0)


@dataclass
class RunConfig:
    """A whole training run: where it lives and the four config sections."""

    name: str = option("run", "run name; the default run directory is runs/<name>")
    run_dir: str = option("", "directory for tokenizer, data, checkpoints and logs; "
                          "empty = runs/<name>")
    stage: str = option("train", "sub-directory of the run that holds this stage's checkpoints")
    init_from: str = option("", "start from these weights (fresh optimizer): a checkpoint, run "
                            "or stage directory, or the name of an earlier stage of this run")
    model: ModelConfig = field(default_factory=ModelConfig,
                               metadata={"help": "model architecture; a preset name or a mapping"})
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig,
                                       metadata={"help": "stage 0 tokenizer"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "training loop"})

    def resolved_run_dir(self) -> Path:
        """Return the run directory, `runs/<name>` unless set."""
        return Path(self.run_dir or f"runs/{self.name}")


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain mappings, collecting every problem.


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return f"a list of {_type_name(item)}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation))


def _coerce(value: Any, annotation: Any, key: str, problems: list[str]) -> Any:
    """Check `value` against a field type; append a problem and return None when it fails."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list):
            problems.append(f"{key}: expected {_type_name(annotation)}, got {value!r}")
            return None
        items = [_coerce(item, item_type, f"{key}[{i}]", problems) for i, item in enumerate(value)]
        return items
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(f"{key}: expected {_type_name(annotation)}, got {value!r}")
    return None


def _check_rules(value: Any, rules: dict[str, Any], key: str, problems: list[str]) -> None:
    values = value if isinstance(value, list) else [value]
    for item in values:
        if item is None:
            continue
        if "choices" in rules and item not in rules["choices"]:
            allowed = ", ".join(rules["choices"])
            problems.append(f"{key}: {item!r} is not one of: {allowed}")
        if "min" in rules and isinstance(item, (int, float)):
            if rules.get("exclusive_min") and item <= rules["min"]:
                problems.append(f"{key}: {item!r} must be greater than {rules['min']}")
            elif item < rules["min"]:
                problems.append(f"{key}: {item!r} must be at least {rules['min']}")
        if "max" in rules and isinstance(item, (int, float)) and item > rules["max"]:
            problems.append(f"{key}: {item!r} must be at most {rules['max']}")


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, appending each problem found to `problems`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix or 'config'}: expected a mapping of keys to values, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            allowed = ", ".join(fields)
            problems.append(f"{prefix}{key}: unknown key; allowed keys here: {allowed}")
    kwargs = {}
    for name, spec in fields.items():
        if name not in data:
            continue
        key = f"{prefix}{name}"
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, data[name], f"{key}.", problems)
            continue
        value = _coerce(data[name], annotation, key, problems)
        if value is None:
            continue
        _check_rules(value, dict(spec.metadata), key, problems)
        kwargs[name] = value
    return cls(**kwargs)


def build_section(cls: type, data: Any, problems: list[str]) -> Any:
    """Build any config dataclass from a mapping, appending each problem to `problems`."""
    return _build(cls, data, "", problems)


def _check_relations(config: RunConfig, problems: list[str]) -> None:
    """Append problems that involve more than one field."""
    model = config.model
    if model.d_model % model.n_heads:
        problems.append(f"model.d_model: {model.d_model} is not divisible by model.n_heads "
                        f"({model.n_heads}); pick sizes where d_model / n_heads is a whole number")
    elif model.head_dim % 2:
        problems.append(f"model.d_model: head size d_model / n_heads = {model.head_dim} must be "
                        "even for rotary embeddings")
    kv_heads = model.resolved_kv_heads()
    if model.n_heads % kv_heads:
        problems.append(f"model.n_kv_heads: {kv_heads} does not divide model.n_heads "
                        f"({model.n_heads})")
    pattern = model.layer_pattern
    if pattern:
        bad = sorted(set(pattern) - set(MIXERS))
        if bad:
            allowed = ", ".join(f"{letter} ({name})" for letter, name in MIXERS.items())
            problems.append(f"model.layer_pattern: unknown layer letters {''.join(bad)!r} in "
                            f"{pattern!r}; allowed: {allowed}")
        if len(pattern) != model.n_layers:
            problems.append(f"model.layer_pattern: {pattern!r} has {len(pattern)} letters but "
                            f"model.n_layers is {model.n_layers}; make them equal")
    if "M" in model.resolved_layer_pattern():
        inner = model.ssm_expand * model.d_model
        if inner % model.ssm_head_dim:
            problems.append(f"model.ssm_head_dim: {model.ssm_head_dim} does not divide "
                            f"ssm_expand * d_model = {inner}; pick a head size that divides it")
        elif (inner // model.ssm_head_dim) % model.ssm_groups:
            problems.append(f"model.ssm_groups: {model.ssm_groups} does not divide the "
                            f"{inner // model.ssm_head_dim} Mamba-2 heads")
    if model.resolved_ffn() == "moe" and model.top_k > model.n_experts:
        problems.append(f"model.top_k: {model.top_k} exceeds model.n_experts "
                        f"({model.n_experts}); choose top_k <= n_experts")
    if config.train.seq_len > model.max_seq_len:
        problems.append(f"train.seq_len: {config.train.seq_len} exceeds model.max_seq_len "
                        f"({model.max_seq_len}); lower train.seq_len or raise model.max_seq_len")
    if config.data.weights and len(config.data.weights) != len(config.data.sources):
        problems.append(f"data.weights: {len(config.data.weights)} weights for "
                        f"{len(config.data.sources)} sources; give one weight per source or none")
    if not config.data.sources:
        problems.append("data.sources: empty; name at least one source, for example python-stdlib")


# ---------------------------------------------------------------------------------------------
# Public API.


def find_model_preset(name: str) -> Path | None:
    """Return the YAML file of a model preset such as `dense-tiny`, or None."""
    for base in (Path.cwd() / "configs" / "models", MODEL_PRESET_DIR):
        candidate = base / f"{name}.yaml"
        if candidate.is_file():
            return candidate
    return None


def _expand_model_preset(raw: dict, problems: list[str]) -> None:
    """Replace `model: NAME` or `model: {preset: NAME, ...}` with the preset's mapping."""
    model = raw.get("model")
    if isinstance(model, str):
        model = {"preset": model}
    if not isinstance(model, dict) or "preset" not in model:
        return
    model = dict(model)  # the caller's mapping stays as it was
    name = model.pop("preset")
    path = find_model_preset(str(name))
    if path is None:
        available = sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))
        problems.append(f"model.preset: no preset named {name!r}; available: "
                        f"{', '.join(available) or 'none found'}")
        raw["model"] = model
        return
    preset = yaml.safe_load(path.read_text()) or {}
    raw["model"] = {**preset, **model}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split a `--set key.path=value` override into its key path and YAML-typed value."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} has no '='; write it as key.path=value, "
                           "for example train.lr=0.001"], source="--set")
    key, raw_value = text.split("=", 1)
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` overrides to a raw config mapping, in order."""
    for text in overrides:
        path, value = parse_override(text)
        target = raw
        for part in path[:-1]:
            if part == "model" and isinstance(target.get("model"), str):
                target["model"] = {"preset": target["model"]}
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError([f"{'.'.join(path)}: {part!r} is not a section"], source="--set")
        target[path[-1]] = value
    return raw


def config_from_dict(raw: dict, source: str = "config") -> RunConfig:
    """Validate a raw mapping and return a RunConfig, or raise one ConfigError with all problems."""
    problems: list[str] = []
    raw = dict(raw or {})
    _expand_model_preset(raw, problems)
    config = _build(RunConfig, raw, "", problems)
    _check_relations(config, problems)
    if problems:
        raise ConfigError(problems, source=source)
    return config


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"file {str(path)!r} not found; pass an existing YAML file, for example "
                           "configs/runs/dense-tiny.yaml"], source="config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError([f"{path} is not valid YAML{where}; fix the syntax"], source=str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path} must contain a mapping of keys to values"], source=str(path))
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or defaults), apply overrides, and validate it."""
    raw = load_yaml(path) if path else {}
    raw = apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path) if path else "config")


def config_to_dict(config: Any) -> dict:
    """Return a plain mapping of a config dataclass, suitable for YAML or JSON."""
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def iter_fields(cls: type = RunConfig, prefix: str = "") -> typing.Iterator[tuple[str, Any, Any, dict]]:
    """Yield (key, type, default, metadata) for every leaf field, depth first."""
    hints = typing.get_type_hints(cls)
    instance = cls()
    for spec in dataclasses.fields(cls):
        annotation = hints[spec.name]
        if dataclasses.is_dataclass(annotation):
            yield from iter_fields(annotation, f"{prefix}{spec.name}.")
        else:
            yield (f"{prefix}{spec.name}", annotation, getattr(instance, spec.name),
                   dict(spec.metadata))

