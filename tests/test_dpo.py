"""DPO: the loss against hand-computed values, the loss hook on a real model, and `codeling train`
with `train.objective: dpo` (resume, LoRA, metrics) on a tiny run."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from runs import write_config
from safetensors.torch import load_file
from test_distributed import free_port, loopback_env

from codeling.cli import main
from codeling.config import ModelConfig, load_config
from codeling.data.chat_data import IGNORE_INDEX
from codeling.data.preferences import PairExample, PreferenceLoader
from codeling.models.decoder import CodeModel
from codeling.stages.pretrain import run_training
from codeling.training import checkpoint as ckpt
from codeling.training import distributed
from codeling.training.dpo import DPOLoss, preference_loss, sequence_log_probs
from codeling.training.trainer import Trainer

# -- the loss by hand -----------------------------------------------------------------------------
#
# One pair with policy log-probabilities log π(y_w) = -2.0, log π(y_l) = -3.0 and reference
# log-probabilities -2.5 for both responses:
#   chosen log-ratio   = -2.0 - (-2.5) = 0.5
#   rejected log-ratio = -3.0 - (-2.5) = -0.5
#   h = 0.5 - (-0.5) = 1.0
# With beta = 0.5, beta * h = 0.5:
#   sigmoid loss = -log σ(0.5) = log(1 + e^-0.5) = log(1.6065307) = 0.4740770
#   with label smoothing ε = 0.1:
#     0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.9 * 0.4740770 + 0.1 * 0.9740770 = 0.5240770
#   rewards: chosen 0.5 * 0.5 = 0.25, rejected 0.5 * -0.5 = -0.25
# IPO with beta = 0.25: (h - 1 / (2 * 0.25))² = (1.0 - 2.0)² = 1.0


def hand_case() -> tuple[torch.Tensor, ...]:
    return (torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-2.5]),
            torch.tensor([-2.5]))


def test_sigmoid_loss_matches_hand_value():
    result = preference_loss(*hand_case(), beta=0.5)
    assert result.losses.item() == pytest.approx(0.4740770, abs=1e-6)
    assert result.chosen_rewards.item() == pytest.approx(0.25)
    assert result.rejected_rewards.item() == pytest.approx(-0.25)


def test_label_smoothing_matches_hand_value():
    result = preference_loss(*hand_case(), beta=0.5, label_smoothing=0.1)
    assert result.losses.item() == pytest.approx(0.5240770, abs=1e-6)


def test_ipo_loss_matches_hand_value():
    result = preference_loss(*hand_case(), beta=0.25, loss_type="ipo")
    assert result.losses.item() == pytest.approx(1.0, abs=1e-6)
    at_target = preference_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]),
                                torch.tensor([0.0]), beta=0.25, loss_type="ipo")
    assert at_target.losses.item() == pytest.approx(0.0, abs=1e-9)  # h = 2 = 1 / (2 beta)


def test_unknown_loss_type_is_rejected():
    with pytest.raises(Exception, match="train.dpo_loss"):
        preference_loss(*hand_case(), beta=0.5, loss_type="hinge")


def test_sequence_log_probs_score_only_targets():
    # Vocabulary of 2. Position 0 is not scored; positions 1 and 2 give the target 3/4:
    # log(3/4) + log(3/4) = 2 * -0.2876821 = -0.5753641.
    three = math.log(3)
    logits = torch.tensor([[[5.0, -5.0], [three, 0.0], [0.0, three]]])  # (1, 3, 2)
    targets = torch.tensor([[IGNORE_INDEX, 0, 1]])
    total, count = sequence_log_probs(logits, targets)
    assert total.item() == pytest.approx(-0.5753641, abs=1e-6)
    assert count.item() == 2


def test_sequence_log_probs_match_a_slow_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    targets = torch.randint(0, 7, (3, 5))
    targets[0, :2] = IGNORE_INDEX
    targets[2, :] = IGNORE_INDEX
    total, count = sequence_log_probs(logits, targets)
    for row in range(3):
        expected = sum(torch.log_softmax(logits[row, t], -1)[targets[row, t]].item()
                       for t in range(5) if targets[row, t] != IGNORE_INDEX)
        assert total[row].item() == pytest.approx(expected, abs=1e-5)
    assert count.tolist() == [3, 5, 0]


# -- the hook on a real model ---------------------------------------------------------------------


def tiny_model() -> CodeModel:
    torch.manual_seed(0)
    return CodeModel(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                                 max_seq_len=32))


def toy_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two pairs: rows 0-1 chosen, rows 2-3 rejected; the last 3 positions are the response."""
    torch.manual_seed(1)
    prompt = torch.randint(16, 64, (2, 5))
    chosen = torch.tensor([[20, 21, 22], [30, 31, 32]])
    rejected = torch.tensor([[40, 41, 42], [50, 51, 52]])
    sequences = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])
    inputs, targets = sequences[:, :-1], sequences[:, 1:].clone()
    targets[:, :4] = IGNORE_INDEX  # score only the 3 response tokens
    return inputs, targets



def test_hook_log_probs_match_full_logits():
    """The hook's fast path (logits at scored positions only) against sequence_log_probs over
    logits at every position, with a row that has no scored target."""
    model = tiny_model()
    inputs, targets = toy_batch()
    targets[3] = IGNORE_INDEX
    hook = DPOLoss(model, model, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                   device=torch.device("cpu"), bf16=False)
    total, count = hook.log_probs(model, inputs, targets)
    expected_total, expected_count = sequence_log_probs(model(inputs), targets)
    torch.testing.assert_close(total, expected_total)
    assert count.tolist() == expected_count.tolist() == [3, 3, 3, 0]

def test_hook_starts_at_log_two_with_zero_rewards():
    model = tiny_model()
    hook = DPOLoss(model, copy.deepcopy(model).eval(), beta=0.1, loss_type="sigmoid",
                   label_smoothing=0.0, device=torch.device("cpu"), bf16=False)
    objective, loss = hook(model, *toy_batch())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    objective.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    metrics = hook.step_metrics()
    assert metrics["reward_accuracy"] == 0.0  # ties are not counted as correct
    assert metrics["margin"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl_chosen"] == pytest.approx(0.0, abs=1e-6)


def test_chosen_nll_matches_hand_value():
    model = tiny_model()
    inputs, targets = toy_batch()
    hook = DPOLoss(model, copy.deepcopy(model).eval(), beta=0.1, loss_type="sigmoid",
                   label_smoothing=0.0, device=torch.device("cpu"), bf16=False, nll_weight=0.5)
    objective, loss = hook(model, inputs, targets)
    # By hand: the chosen rows are 0 and 1, with 3 scored tokens each.
    with torch.no_grad():
        log_probs = torch.log_softmax(model(inputs[:2]).float(), dim=-1)
    picked = [log_probs[row, position, targets[row, position]]
              for row in range(2) for position in range(4, 7)]
    nll = -sum(float(value) for value in picked) / 6
    assert objective.item() == pytest.approx(loss.item() + 0.5 * nll, rel=1e-5)
    assert hook.step_metrics()["nll_chosen"] == pytest.approx(nll, rel=1e-5)


def test_chosen_nll_keeps_chosen_likely():
    """Plain DPO may lower the chosen response too, and the NLL term keeps it higher."""
    inputs, targets = toy_batch()
    final = {}
    for weight in (0.0, 1.0):
        model = tiny_model()
        hook = DPOLoss(model, copy.deepcopy(model).eval(), beta=0.5, loss_type="sigmoid",
                       label_smoothing=0.0, device=torch.device("cpu"), bf16=False,
                       nll_weight=weight)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(15):
            objective, _ = hook(model, inputs, targets)
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
        hook.step_metrics()
        hook(model, inputs, targets)
        final[weight] = hook.step_metrics()
    assert final[1.0]["nll_chosen"] < final[0.0]["nll_chosen"]
    assert final[1.0]["reward_accuracy"] == 1.0


def test_hook_training_separates_the_responses():
    model = tiny_model()
    reference = copy.deepcopy(model).eval()
    hook = DPOLoss(model, reference, beta=0.5, loss_type="sigmoid", label_smoothing=0.0,
                   device=torch.device("cpu"), bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs, targets = toy_batch()
    losses = []
    for _ in range(15):
        objective, loss = hook(model, inputs, targets)
        optimizer.zero_grad()
        objective.backward()
        optimizer.step()
        losses.append(loss.item())
    metrics = hook.step_metrics()  # averaged over the 15 calls
    _, last = hook(model, inputs, targets)
    final = hook.step_metrics()
    assert last.item() < 0.5 * math.log(2)
    assert final["reward_accuracy"] == 1.0
    assert final["chosen_reward"] > final["rejected_reward"]
    assert final["margin"] > metrics["margin"] > 0


# -- `codeling train` with the dpo objective ------------------------------------------------------


def pair(index: int) -> dict:
    return {"prompt": f"add {index} and 2", "chosen": f"{index + 2}",
            "rejected": f"{index + 3}"}


def dpo_config(run_dir, data_file, **train) -> dict:
    settings = dict(objective="dpo", beta=0.1, batch_size=4, seq_len=64, max_steps=4,
                    warmup_steps=1, eval_every=2, eval_batches=1, checkpoint_every=2, log_every=1,
                    precision="fp32", lr=1e-3)
    settings.update(train)
    return {"name": "tiny", "run_dir": str(run_dir), "stage": "rlhf", "init_from": "code",
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
            "data": {"sources": [f"prefs:{data_file}"], "val_fraction": 0.2},
            "train": settings}


@pytest.fixture
def run_copy(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(pair(i)) + "\n" for i in range(40)))
    return run_dir, data_file


def read_metrics(stage_dir) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_dpo_trains_resumes_and_logs(run_copy, tmp_path, lora_rank):
    run_dir, data_file = run_copy
    config = write_config(tmp_path / "dpo.yaml",
                          dpo_config(run_dir, data_file, max_steps=2, lora_rank=lora_rank))
    assert main(["train", "--config", str(config)]) == 0
    write_config(config, dpo_config(run_dir, data_file, max_steps=4, lora_rank=lora_rank))
    assert main(["train", "--config", str(config), "--resume"]) == 0
    assert ckpt.latest_checkpoint(run_dir / "rlhf").name == "step-000004"
    records = read_metrics(run_dir / "rlhf")
    steps = [record for record in records if "loss" in record]
    assert [record["step"] for record in steps] == [1, 2, 3, 4]
    # The policy starts as the reference, so the first loss is log 2 and every reward is 0.
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[0]["margin"] == pytest.approx(0.0, abs=1e-5)
    for name in ("reward_accuracy", "chosen_reward", "rejected_reward", "margin", "kl_chosen"):
        assert all(name in record for record in steps)
    assert any(record.get("split") == "chosen responses" for record in records)
    merged = load_file(ckpt.latest_checkpoint(run_dir / "rlhf") / "model.safetensors")
    assert not any("lora" in key for key in merged)


def test_dpo_resume_equals_straight_run(run_copy, tmp_path, monkeypatch):
    run_dir, data_file = run_copy
    straight = write_config(tmp_path / "a.yaml", {**dpo_config(run_dir, data_file),
                                                  "stage": "straight"})
    assert main(["train", "--config", str(straight)]) == 0
    split = write_config(tmp_path / "b.yaml", {**dpo_config(run_dir, data_file),
                                               "stage": "split"})
    fit = Trainer.fit
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", lambda self, stop_at_step=None: fit(self, stop_at_step=2))
        assert run_training(load_config(split)).step == 2
    assert run_training(load_config(split), resume=True).step == 4
    first = load_file(ckpt.latest_checkpoint(run_dir / "straight") / "model.safetensors")
    second = load_file(ckpt.latest_checkpoint(run_dir / "split") / "model.safetensors")
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)
    losses = [[r["loss"] for r in read_metrics(run_dir / stage) if "loss" in r]
              for stage in ("straight", "split")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_dpo_config_errors(run_copy, tmp_path, capsys):
    run_dir, data_file = run_copy
    raw = dpo_config(run_dir, data_file)
    raw["init_from"] = ""
    assert main(["train", "--config", str(write_config(tmp_path / "a.yaml", raw))]) == 2
    assert "init_from is empty" in capsys.readouterr().err
    raw = dpo_config(run_dir, data_file)
    raw["data"]["sources"] = ["python-stdlib"]
    assert main(["train", "--config", str(write_config(tmp_path / "b.yaml", raw))]) == 2
    assert "must be preference sources" in capsys.readouterr().err
    raw = dpo_config(run_dir, data_file, dpo_loss="ipo", label_smoothing=0.1)
    assert main(["train", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 2
    assert "sigmoid loss only" in capsys.readouterr().err
    assert not (run_dir / "rlhf").exists()


# -- data parallel --------------------------------------------------------------------------------

DDP_STEPS = 3


def make_dpo_trainer(directory: Path, batch_size: int, grad_accum: int,
                     dist: distributed.DistInfo) -> Trainer:
    """A DPO trainer on 12 random pairs: 5 prompt tokens, then 3 response tokens."""
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(12):
        prompt = rng.integers(16, 64, 5)
        mask = np.array([0] * 5 + [1] * 3, dtype=np.uint8)
        chosen = np.concatenate([prompt, rng.integers(16, 64, 3)]).astype(np.int32)
        rejected = np.concatenate([prompt, rng.integers(16, 64, 3)]).astype(np.int32)
        examples.append(PairExample(chosen, mask, rejected, mask.copy()))
    tokenizer_dir = directory / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    config = load_config(None, [
        f"run_dir={directory}", "model.vocab_size=64", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.max_seq_len=32", f"train.batch_size={batch_size}",
        "train.seq_len=16", f"train.grad_accum={grad_accum}", f"train.max_steps={DDP_STEPS}",
        "train.warmup_steps=1", "train.eval_every=0", "train.checkpoint_every=0",
        "train.log_every=1", "train.precision=fp32", "train.lr=0.01", "train.objective=dpo",
        "train.beta=0.5"])
    torch.manual_seed(0)
    model = CodeModel(config.model)
    hook = DPOLoss(model, copy.deepcopy(model).eval(), 0.5, "sigmoid", 0.0,
                   torch.device("cpu"), False)
    loader = PreferenceLoader(examples, batch_size, 16, pad_id=0, seed=3, rank=dist.rank,
                              world_size=dist.world_size)
    return Trainer(model, config, loader, [], directory / "stage", tokenizer_dir, "f" * 64,
                   torch.device("cpu"), bf16=False, dist=dist, loss_hook=hook)


def train_dpo_rank(rank: int, world_size: int, port: int, directory: str) -> None:
    """Train one rank of a spawned DPO job; rank 0 saves its final weights as rank0.pt."""
    os.environ.update(loopback_env(port))
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    dist = distributed.init_distributed(torch.device("cpu"))
    try:
        trainer = make_dpo_trainer(Path(directory), batch_size=2, grad_accum=1, dist=dist)
        trainer.fit()
        if rank == 0:
            torch.save(trainer.model.state_dict(), Path(directory) / "rank0.pt")
    finally:
        distributed.destroy()


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_dpo_two_ranks_match_grad_accum(tmp_path):
    context = mp.start_processes(train_dpo_rank, args=(2, free_port(), str(tmp_path / "ddp")),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("2 spawned DPO ranks did not finish in 120 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    single = make_dpo_trainer(tmp_path / "single", batch_size=2, grad_accum=2,
                              dist=distributed.DistInfo())
    single.fit()
    rank0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    for name, expected in single.model.state_dict().items():
        torch.testing.assert_close(rank0[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    ddp_steps = [r for r in read_metrics(tmp_path / "ddp" / "stage") if "loss" in r]
    single_steps = [r for r in read_metrics(tmp_path / "single" / "stage") if "loss" in r]
    assert [r["step"] for r in ddp_steps] == list(range(1, DDP_STEPS + 1))
    for ddp, reference in zip(ddp_steps, single_steps, strict=True):
        for name in ("loss", "reward_accuracy", "margin", "kl_chosen"):
            assert ddp[name] == pytest.approx(reference[name], rel=1e-5, abs=1e-7), name
