"""Data-parallel training on CPU with gloo and 2 processes, under DDP and FSDP2.

Two ranks with batch_size B and grad_accum 1 see the same global batch as one process with
batch_size B and grad_accum 2, so their losses and weights must match. All rendezvous traffic
stays on 127.0.0.1, and every child process is killed if a test fails or times out.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from codeling.config import load_config
from codeling.data.loader import PackedLoader, iter_eval_batches
from codeling.models.decoder import CodeModel
from codeling.training import checkpoint as ckpt
from codeling.training import distributed
from codeling.training.trainer import Trainer, ValidationSplit
from runs import tiny_run_config, write_config

pytestmark = pytest.mark.skipif(not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

STEPS = 4
SPAWN_TIMEOUT_S = 60
CLI_TIMEOUT_S = 90
# MoE with the bias balancer checks the DDP options for MoE: experts that get no token on a
# rank, and per-rank load counts that must not be overwritten by rank 0's buffers.
MODEL_SETTINGS = {
    "dense": [],
    "moe": ["model.ffn=moe", "model.n_experts=4", "model.top_k=1", "model.balancer=bias"],
    # FSDP shards each layer and the root; test_cli_fsdp_checkpoints_load_anywhere covers dense.
    "moe-fsdp": ["train.distributed=fsdp", "model.ffn=moe", "model.n_experts=4",
                 "model.top_k=1", "model.balancer=bias"],
    # The SFT loss projects only the scored positions, and their count differs between ranks.
    "dense-sft": ["train.objective=sft"],
}


class MaskedLoader:
    """A PackedLoader whose targets are scored only where the target token is even, as an SFT
    batch scores only the assistant's tokens. The mask follows the data, so two ranks and one
    process with grad accumulation get the same mask."""

    def __init__(self, loader: PackedLoader):
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self):
        inputs, targets = next(self.loader)
        return inputs, targets.masked_fill(targets % 2 == 1, -100)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_env(port: int) -> dict[str, str]:
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1"}


def make_trainer(directory: Path, batch_size: int, grad_accum: int,
                 dist: distributed.DistInfo, model_settings: list[str]) -> Trainer:
    tokens = np.random.default_rng(0).integers(0, 256, size=5000).astype(np.uint16)
    tokenizer_dir = directory / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    config = load_config(None, [
        f"run_dir={directory}", "model.vocab_size=256", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.max_seq_len=32", f"train.batch_size={batch_size}",
        "train.seq_len=16", f"train.grad_accum={grad_accum}", f"train.max_steps={STEPS}",
        "train.warmup_steps=2", "train.eval_every=2", "train.checkpoint_every=2",
        "train.log_every=1", "train.precision=fp32", "train.lr=0.01", "train.grad_clip=1.0",
        *model_settings])
    torch.manual_seed(0)
    model = CodeModel(config.model)
    loader = PackedLoader([tokens], weights=[1.0], batch_size=batch_size, seq_len=16, seed=5,
                          rank=dist.rank, world_size=dist.world_size)
    if "train.objective=sft" in model_settings:
        loader = MaskedLoader(loader)
    # Three batches, so the two ranks evaluate an unequal number of them.
    val = ValidationSplit("val", lambda: iter_eval_batches(tokens[:400], 4, 16, 3), 3.0)
    return Trainer(model, config, loader, [val], directory / "stage", tokenizer_dir, "f" * 64,
                   torch.device("cpu"), bf16=False, dist=dist)


def train_rank(rank: int, world_size: int, port: int, directory: str,
               model_settings: list[str]) -> None:
    """Train one rank of the spawned job and save its final weights as rank<r>.pt.

    Under FSDP only rank 0 gets the gathered weights, so only rank0.pt is written. Every rank
    writes how many parameter elements it stores to rank<r>.json.
    """
    os.environ.update(loopback_env(port))
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    dist = distributed.init_distributed(torch.device("cpu"))
    try:
        trainer = make_trainer(Path(directory), batch_size=2, grad_accum=1, dist=dist,
                               model_settings=model_settings)
        trainer.fit()
        local = sum(getattr(p, "to_local", lambda p=p: p)().numel()
                    for p in trainer.model.parameters())
        (Path(directory) / f"rank{rank}.json").write_text(json.dumps({"local_numel": local}))
        full = distributed.full_model(trainer.model)
        if full is not None:
            torch.save(full.state_dict(), Path(directory) / f"rank{rank}.pt")
    finally:
        distributed.destroy()


def spawn_ranks(world_size: int, directory: Path, model_settings: list[str]) -> None:
    """Run train_rank on world_size spawned processes; kill them all on error or timeout."""
    context = mp.start_processes(train_rank,
                                 args=(world_size, free_port(), str(directory), model_settings),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{world_size} spawned ranks did not finish in {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()


def metric_records(stage_dir: Path, key: str) -> list[dict]:
    lines = (stage_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if key in record]


@pytest.mark.parametrize("model", sorted(MODEL_SETTINGS))
def test_two_ranks_match_grad_accum(tmp_path, model):
    spawn_ranks(2, tmp_path / "ddp", MODEL_SETTINGS[model])
    single = make_trainer(tmp_path / "single", batch_size=2, grad_accum=2,
                          dist=distributed.DistInfo(), model_settings=MODEL_SETTINGS[model])
    single.fit()

    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    for name, expected in single.model.state_dict().items():
        # The two runs sum gradients in different orders, which left MoE weights 2e-6 apart on
        # an AVX2-only CPU. Unaveraged gradients would move them by up to lr 0.01 per step.
        torch.testing.assert_close(rank0[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    held = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text())["local_numel"]
            for r in range(2)]
    total = single.model.num_parameters()
    if "fsdp" in model:
        assert not (tmp_path / "ddp" / "rank1.pt").exists()
        assert sum(held) == total  # each element on exactly one rank
        assert max(held) < 0.6 * total
    else:
        rank1 = torch.load(tmp_path / "ddp" / "rank1.pt")
        for name, value in rank0.items():
            torch.testing.assert_close(rank1[name], value, rtol=0, atol=0, msg=name)
        assert held == [total, total]

    ddp_steps = metric_records(tmp_path / "ddp" / "stage", "loss")
    single_steps = metric_records(tmp_path / "single" / "stage", "loss")
    assert [r["step"] for r in ddp_steps] == [r["step"] for r in single_steps] == [1, 2, 3, 4]
    for ddp, reference in zip(ddp_steps, single_steps):
        assert ddp["loss"] == pytest.approx(reference["loss"], rel=1e-6)
        assert ddp["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
        assert ddp["tokens"] == reference["tokens"]

    ddp_val = metric_records(tmp_path / "ddp" / "stage", "val_loss")
    single_val = metric_records(tmp_path / "single" / "stage", "val_loss")
    assert [r["step"] for r in ddp_val] == [r["step"] for r in single_val]
    for ddp, reference in zip(ddp_val, single_val):
        assert ddp["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6)

    checkpoint = ckpt.latest_checkpoint(tmp_path / "ddp" / "stage")
    assert checkpoint.name == f"step-{STEPS:06d}"
    assert ckpt.load_trainer_state(checkpoint)["loader"]["global_batch_size"] == 4


def run_cli(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.CompletedProcess:
    """Run a command in its own process group; kill the whole group if it times out."""
    with log_path.open("w") as log_file:
        process = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, **env}, start_new_session=True)
        try:
            process.wait(timeout=CLI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(args)} did not finish in {CLI_TIMEOUT_S} s; log:\n"
                        f"{log_path.read_text()[-3000:]}")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    return subprocess.CompletedProcess(args, process.returncode, log_path.read_text(), "")


def test_cli_resume_two_ranks_to_one(tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_run_config(
        run_dir, batch_size=2, max_steps=4, eval_every=2, checkpoint_every=2))
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                "-m", "codeling", "train", "--config", str(config)]
    first = run_cli(torchrun, loopback_env(port), tmp_path / "ddp.log")
    assert first.returncode == 0, first.stdout[-3000:]
    stage_dir = run_dir / "code"
    assert ckpt.latest_checkpoint(stage_dir).name == "step-000004"
    assert [r["step"] for r in metric_records(stage_dir, "loss")] == [1, 2, 3, 4]
    assert first.stdout.count("step 4/4 | loss") == 1  # only rank 0 logs step lines

    codeling = [sys.executable, "-m", "codeling", "train", "--config", str(config), "--resume",
                "--set", "train.max_steps=6"]
    same_batch = run_cli(codeling + ["--set", "train.batch_size=2"], {}, tmp_path / "bad.log")
    assert same_batch.returncode == 2
    assert "global_batch_size 4 != 2" in same_batch.stdout

    resumed = run_cli(codeling + ["--set", "train.batch_size=4"], {}, tmp_path / "resume.log")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    latest = ckpt.latest_checkpoint(stage_dir)
    assert latest.name == "step-000006"
    state = ckpt.load_trainer_state(latest)
    assert state["loader"]["steps"] == 6
    assert state["tokens"] == 6 * 4 * 32
    steps = [r["step"] for r in metric_records(stage_dir, "loss")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cli_fsdp_checkpoints_load_anywhere(tmp_path):
    """FSDP on 2 ranks, then 1 process, then FSDP again equals one process throughout.

    Steps 1-4 run under FSDP, 5-6 in a single process from the FSDP checkpoint, and 7-8 under
    FSDP from the single-process checkpoint. With the same global batch and a constant
    schedule, the weights and losses must match a single process that ran all 8 steps. The
    FSDP run also checkpoints activations, so each sharded layer gathers its parameters again
    for the recomputation in backward.
    """
    settings = dict(batch_size=4, max_steps=8, eval_every=4, checkpoint_every=2,
                    schedule="constant")
    reference_dir = tmp_path / "reference"
    reference = write_config(tmp_path / "reference.yaml", tiny_run_config(reference_dir,
                                                                          **settings))
    single = [sys.executable, "-m", "codeling", "train"]
    result = run_cli(single + ["--config", str(reference)], {}, tmp_path / "reference.log")
    assert result.returncode == 0, result.stdout[-3000:]

    run_dir = tmp_path / "run"
    data = tiny_run_config(run_dir, **{**settings, "batch_size": 2, "distributed": "fsdp",
                                       "activation_checkpointing": True})
    data["tokenizer"]["path"] = str(reference_dir / "tokenizer")  # the same token ids
    config = write_config(tmp_path / "run.yaml", data)
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                "-m", "codeling", "train", "--config", str(config)]
    first = run_cli(torchrun + ["--set", "train.max_steps=4"], loopback_env(port),
                    tmp_path / "fsdp1.log")
    assert first.returncode == 0, first.stdout[-3000:]
    assert "FSDP: 2 decoder layers and the root sharded over 2 processes" in first.stdout

    resume = ["--config", str(config), "--resume"]
    middle = run_cli(single + resume + ["--set", "train.max_steps=6", "--set",
                                        "train.batch_size=4"], {}, tmp_path / "single.log")
    assert middle.returncode == 0, middle.stdout[-3000:]
    assert "resumed from" in middle.stdout

    port = free_port()
    torchrun[torchrun.index("--master_port") + 1] = str(port)
    last = run_cli(torchrun + ["--resume"], loopback_env(port), tmp_path / "fsdp2.log")
    assert last.returncode == 0, last.stdout[-3000:]

    stage_dir, reference_stage = run_dir / "code", reference_dir / "code"
    latest = ckpt.latest_checkpoint(stage_dir)
    assert latest.name == "step-000008"
    weights = load_file(latest / "model.safetensors")
    expected = load_file(ckpt.latest_checkpoint(reference_stage) / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], rtol=1e-5, atol=1e-6,
                                   msg=name)
    losses = metric_records(stage_dir, "loss")
    reference_losses = metric_records(reference_stage, "loss")
    assert [r["step"] for r in losses] == list(range(1, 9))
    for record, reference_record in zip(losses, reference_losses):
        assert record["loss"] == pytest.approx(reference_record["loss"], rel=1e-6)

    generated = run_cli([sys.executable, "-m", "codeling", "generate", str(run_dir), "--prompt",
                         "import ", "--max-new-tokens", "4"], {}, tmp_path / "generate.log")
    assert generated.returncode == 0, generated.stdout[-3000:]
