"""The training memory estimate against measurements, and the check that stops a run early.

Two measurements back the estimate. Saved-tensor hooks count the bytes autograd actually
keeps for backward (the activations); each storage is counted once, and the parameters
themselves are left out. A fresh process measures the growth of its peak resident memory over
real training steps, which takes in gradients, AdamW state and every transient buffer. glibc
is set to serve every block of 64 KiB or more with mmap, so freed tensors leave the resident
set at once and the peak follows the live tensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from codeling.cli import main
from codeling.config import ModelConfig, TrainConfig
from codeling.errors import ConfigError
from codeling.models.decoder import CodeModel
from codeling.training import memory
from runs import tiny_run_config, write_config

GIB = 2**30
# Small shapes of each architecture; with seq_len 50 the Mamba-2 scan pads its last chunk.
ARCHITECTURES = {
    "dense": {"n_heads": 8, "n_kv_heads": 2, "d_ff": 200},
    "mamba": {"ssm_chunk": 16, "ssm_head_dim": 16, "ssm_groups": 2, "ssm_state": 32},
    "moe": {"n_experts": 8, "top_k": 2, "shared_d_ff": 64},
    "hybrid": {"attn_period": 2, "ssm_chunk": 16, "ssm_head_dim": 32},
}


def model_config(arch: str, **changes) -> ModelConfig:
    settings = dict(arch=arch, vocab_size=300, d_model=96, n_layers=3, n_heads=4,
                    n_kv_heads=2, max_seq_len=128)
    settings.update(ARCHITECTURES[arch])
    settings.update(changes)
    return ModelConfig(**settings)


def saved_tensor_bytes(model: CodeModel, batch_size: int, seq_len: int, bf16: bool) -> int:
    """Return the bytes of the distinct storages the forward pass saves for backward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    inputs = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    targets = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
                else contextlib.nullcontext())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast:
            logits = model(inputs)
        F.cross_entropy(logits.float().view(-1, vocab), targets.view(-1))
    return sum(storages.values())


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_activations_match_saved_tensors(arch, bf16):
    config = model_config(arch)
    torch.manual_seed(0)
    model = CodeModel(config)
    batch_size, seq_len = 3, 50
    measured = saved_tensor_bytes(model, batch_size, seq_len, bf16)

    estimate = memory.estimate_memory(config, TrainConfig(batch_size=batch_size,
                                                          seq_len=seq_len), bf16)
    expected = estimate.activations
    if bf16:
        # The bf16 weight copies autocast makes are saved for backward too; the estimate counts
        # them as workspace.
        expected += memory.BF16 * memory.count_parameters(config).cast
    assert expected == pytest.approx(measured, rel=0.03)


def test_activations_scale_with_tokens():
    config = model_config("dense")
    small = memory.estimate_memory(config, TrainConfig(batch_size=2, seq_len=64), False)
    large = memory.estimate_memory(config, TrainConfig(batch_size=4, seq_len=64), False)
    assert large.activations == 2 * small.activations
    assert large.weights == small.weights
    assert large.optimizer == 2 * large.weights


PEAK_SCRIPT = """
import contextlib, json, sys
import torch
import torch.nn.functional as F
from codeling.config import ModelConfig, TrainConfig
from codeling.models.decoder import CodeModel
from codeling.training.memory import estimate_memory

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def backward(model, batch_size, seq_len, bf16):
    inputs = torch.randint(0, 2048, (batch_size, seq_len))
    targets = torch.randint(0, 2048, (batch_size, seq_len))
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        logits = model(inputs)
    loss = F.cross_entropy(logits.float().view(-1, 2048), targets.view(-1))
    del logits
    loss.backward()

torch.set_num_threads(2)
results = []
for arch, precision, checkpointing in json.loads(sys.argv[1]):
    bf16, checkpointing = precision == "bf16", checkpointing == "on"
    config = ModelConfig(arch=arch, vocab_size=2048, d_model=128, n_layers=2, n_heads=4,
                         n_kv_heads=2, attn_period=2, attn_offset=1, max_seq_len=128)
    train = TrainConfig(batch_size=4, seq_len=128, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = CodeModel(config)
    model.activation_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A first step loads the kernels for these shapes and creates the AdamW state, so neither
    # counts in the growth.
    backward(model, train.batch_size, train.seq_len, bf16)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    baseline = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) to the current resident set
    # Two micro-batches, as with grad_accum 2: the second runs with the gradients in memory.
    for _ in range(2):
        backward(model, train.batch_size, train.seq_len, bf16)
    growth = status("VmHWM") - baseline
    estimate = estimate_memory(config, train, bf16)
    results.append({"growth": growth,
                    "estimate": estimate.total - estimate.weights - estimate.optimizer})
    del model, optimizer
print(json.dumps(results))
"""
PEAK_CASES = [("dense", "fp32", "off"), ("dense", "bf16", "on"), ("mamba", "fp32", "on"),
              ("moe", "fp32", "off"), ("hybrid", "fp32", "off")]


@pytest.fixture(scope="module")
def peak_memory() -> dict[tuple[str, str, str], dict[str, int]]:
    """Measure the growth of peak resident memory over one training step, for each case.

    One fresh process runs every case and resets its peak between them. The weights and the
    AdamW state exist before the baseline, so the growth is compared with the rest.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, json.dumps(PEAK_CASES)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(zip(PEAK_CASES, json.loads(result.stdout)))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="needs Linux /proc to measure peak resident memory")
@pytest.mark.parametrize("case", PEAK_CASES, ids="-".join)
def test_estimate_matches_peak_memory(peak_memory, case):
    figures = peak_memory[case]
    ratio = figures["estimate"] / figures["growth"]
    assert 0.9 <= ratio <= 1.3, figures


def test_checkpointing_lowers_estimate():
    config = model_config("hybrid", vocab_size=4096)
    plain = memory.estimate_memory(config, TrainConfig(batch_size=8, seq_len=256), False)
    checkpointed = memory.estimate_memory(
        config, TrainConfig(batch_size=8, seq_len=256, activation_checkpointing=True), False)
    assert checkpointed.activations < plain.activations / 2
    assert checkpointed.gradients == plain.gradients


def test_fsdp_shards_weights_and_state():
    config = model_config("dense")
    train = TrainConfig(batch_size=2, seq_len=64)
    single = memory.estimate_memory(config, train, False)
    ddp = memory.estimate_memory(config, train, False, world_size=4)
    fsdp = memory.estimate_memory(config, train, False, world_size=4, sharded=True)
    counts = memory.count_parameters(config)
    assert ddp.weights == single.weights
    assert ddp.workspace == single.workspace + 4 * counts.total  # gradient buckets
    assert fsdp.weights == -(-4 * counts.total // 4)
    assert fsdp.optimizer == 2 * fsdp.weights
    assert fsdp.activations == single.activations


def test_largest_fitting_batch_is_tight():
    config = model_config("moe", vocab_size=4096)
    train = TrainConfig(batch_size=64, seq_len=128)
    estimate = memory.estimate_memory(config, train, False)
    budget = estimate.total / 3
    batch = memory.largest_fitting_batch(estimate, budget)
    assert 0 < batch < 64

    def total(batch_size: int) -> int:
        changed = TrainConfig(batch_size=batch_size, seq_len=128)
        return memory.estimate_memory(config, changed, False).total

    assert total(batch) <= budget < total(batch + 1)


def test_check_names_settings_to_change(caplog):
    config = model_config("dense")
    train = TrainConfig(batch_size=2**26, seq_len=128, grad_accum=3)  # petabytes
    with pytest.raises(ConfigError) as error:
        memory.check_memory(config, train, False, torch.device("cpu"))
    message = str(error.value)
    assert "training needs about" in message
    assert "train.activation_checkpointing=true" in message
    assert "train.seq_len" in message
    assert "model.n_layers" in message
    assert "train.memory_check=false" in message

    assert "train.batch_size=" in message
    suggested = int(message.split("train.batch_size=")[1].split()[0])
    accum = int(message.split("train.grad_accum=")[1].split()[0])
    assert suggested * accum == 3 * 2**26  # the same global batch
    fits = memory.largest_fitting_batch(
        memory.estimate_memory(config, train, False), memory.available_memory(
            torch.device("cpu"))[0])
    assert 0 < suggested <= fits

    train.memory_check = False
    with caplog.at_level(logging.WARNING, logger="codeling.training.memory"):
        estimate = memory.check_memory(config, train, False, torch.device("cpu"))
    assert estimate.total > 2**40
    assert "training needs about" in caplog.text


def test_cpu_memory_is_known():
    available, source = memory.available_memory(torch.device("cpu"))
    assert available is not None and available > 0
    assert source


def test_train_stops_before_training(tmp_path, small_tokenizer, capsys):
    small_tokenizer.save(tmp_path / "tokenizer")
    data = tiny_run_config(tmp_path / "run", batch_size=2**26)
    data["tokenizer"]["path"] = str(tmp_path / "tokenizer")
    config = write_config(tmp_path / "run.yaml", data)

    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "training needs about" in err
    assert "train.activation_checkpointing=true" in err
    assert not (tmp_path / "run" / "code" / "checkpoints").exists()
    assert not (tmp_path / "run" / "data").exists()
