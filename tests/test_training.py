"""The trainer: schedule, exact resume, checkpoint atomicity, and parameter groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codeling.config import TrainConfig, load_config
from codeling.data.chat_data import scored_positions
from codeling.data.loader import PackedLoader, iter_eval_batches
from codeling.models.decoder import CodeModel
from codeling.training import checkpoint as ckpt
from codeling.training.optim import lr_at, parameter_groups
from codeling.training.trainer import Trainer, ValidationSplit


def make_trainer(tmp_path, tokens: np.ndarray, max_steps: int, tokenizer_dir) -> Trainer:
    config = load_config(None, [
        f"run_dir={tmp_path}", "model.vocab_size=256", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.max_seq_len=32", "train.batch_size=4", "train.seq_len=16",
        "train.grad_accum=2", f"train.max_steps={max_steps}", "train.warmup_steps=2",
        "train.eval_every=0", "train.checkpoint_every=0", "train.precision=fp32",
        "train.lr=0.01"])
    torch.manual_seed(0)
    model = CodeModel(config.model)
    loader = PackedLoader([tokens], weights=[1.0], batch_size=4, seq_len=16, seed=5)
    val = ValidationSplit("val", lambda: iter_eval_batches(tokens[:400], 4, 16, 2), 3.0)
    return Trainer(model, config, loader, [val], tmp_path / "stage", tokenizer_dir, "f" * 64,
                   torch.device("cpu"), bf16=False)


@pytest.fixture
def tokens():
    return np.random.default_rng(0).integers(0, 256, size=5000).astype(np.uint16)


@pytest.fixture
def tokenizer_dir(tmp_path):
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    (directory / "tokenizer.json").write_text("{}")
    return directory


def test_resume_matches_uninterrupted_run(tmp_path, tokens, tokenizer_dir):
    straight = make_trainer(tmp_path / "a", tokens, 8, tokenizer_dir)
    straight.fit()

    first = make_trainer(tmp_path / "b", tokens, 8, tokenizer_dir)
    first.fit(stop_at_step=4)
    checkpoint = ckpt.latest_checkpoint(tmp_path / "b" / "stage")
    assert checkpoint.name == "step-000004"

    second = make_trainer(tmp_path / "b", tokens, 8, tokenizer_dir)
    ckpt.load_weights(second.model, checkpoint)
    second.load_state_dict(ckpt.load_trainer_state(checkpoint))
    second.fit()

    for (name, a), b in zip(straight.model.state_dict().items(),
                            second.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    losses = lambda t: [r for r in t.metrics_path.read_text().splitlines() if '"loss"' in r]
    assert len(losses(straight)) == len(losses(second))


def test_budget_in_tokens_sets_total_steps(tmp_path, tokens, tokenizer_dir):
    trainer = make_trainer(tmp_path, tokens, 100, tokenizer_dir)
    trainer.train.max_tokens = 4 * 16 * 2 * 3  # three optimizer steps
    trainer.total_steps = trainer._total_steps()
    result = trainer.fit()
    assert result.step == 3
    assert result.stop_reason == "token budget"


def test_epoch_budget_draws_each_window_once(tmp_path, tokens, tokenizer_dir):
    trainer = make_trainer(tmp_path, tokens, 1000, tokenizer_dir)
    windows = trainer.loader.window_counts[0]
    assert trainer.loader.batches_per_epoch == windows / 4
    trainer.train.max_epochs = 1.0
    trainer.total_steps = trainer._total_steps()
    result = trainer.fit()
    assert result.stop_reason == "epoch budget"
    assert result.step == -(-windows // (4 * 2))  # batch 4, grad_accum 2, rounded up
    assert trainer.loader.steps * 4 >= windows
    assert (trainer.loader.steps - 2) * 4 < windows  # one optimizer step at most past the epoch


def test_checkpoint_is_atomic_and_pruned(tmp_path, tokens, tokenizer_dir):
    trainer = make_trainer(tmp_path, tokens, 3, tokenizer_dir)
    for step in range(1, 4):
        trainer.step = step
        trainer.save()
    root = tmp_path / "stage" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000003"]
    assert not list(root.glob(".*"))



def test_resolve_checkpoint_from_any_level(tmp_path, tokens, tokenizer_dir):
    trainer = make_trainer(tmp_path, tokens, 3, tokenizer_dir)
    trainer.step = 3
    trainer.save()
    root = tmp_path / "stage" / "checkpoints"
    expected = root / "step-000003"
    for path in (tmp_path, tmp_path / "stage", root, root / "latest", expected):
        assert ckpt.resolve_checkpoint(path) == expected, path
    with pytest.raises(ckpt.CheckpointError, match="is a file; pass a run directory"):
        ckpt.resolve_checkpoint(expected / "config.json")


def test_tokens_count_the_rows_processed(tmp_path, tokens, tokenizer_dir):
    """SFT batches are cut to their longest conversation, so the token count (and the tokens/s
    and MFU computed from it) follows the batches' real lengths, not batch_size x seq_len."""
    trainer = make_trainer(tmp_path, tokens, 2, tokenizer_dir)
    lengths = iter([8, 16, 8, 16])  # two micro-batches per step (grad_accum 2)
    trainer.loader = ((torch.randint(0, 256, (4, n)), torch.randint(0, 256, (4, n)))
                      for n in lengths)
    trainer.train_step()
    assert trainer.tokens == 4 * 8 + 4 * 16
    trainer.train_step()
    assert trainer.tokens == 2 * (4 * 8 + 4 * 16)
    assert trainer.tokens < 2 * trainer.tokens_per_step
    model = trainer.model
    expected = 4 * 8 * model.flops_per_token(8) + 4 * 16 * model.flops_per_token(16)
    assert trainer.last_step_flops == pytest.approx(expected)


def test_flops_count_the_head_only_where_scored(tmp_path, tokens, tokenizer_dir):
    """SFT computes logits only at the scored positions, so the MFU estimate charges the
    output head for those alone."""
    trainer = make_trainer(tmp_path, tokens, 1, tokenizer_dir)
    model = trainer.model
    targets = torch.full((4, 16), -100)
    targets[:, 10:13] = 7  # 3 scored positions per row
    flops = trainer._batch_flops(torch.zeros(4, 16, dtype=torch.long),
                                 scored_positions(targets))
    body = model.flops_per_token(16, head=False)
    assert flops == pytest.approx(64 * body + 12 * model.head_flops_per_token())
    assert body + model.head_flops_per_token() == pytest.approx(model.flops_per_token(16))

def test_validation_reports_bits_per_byte(tmp_path, tokens, tokenizer_dir):
    trainer = make_trainer(tmp_path, tokens, 1, tokenizer_dir)
    results = trainer.evaluate()["val"]
    assert results["loss"] == pytest.approx(np.log(256), rel=0.1)
    assert results["bits_per_byte"] == pytest.approx(results["loss"] / np.log(2) / 3.0)


def test_schedules():
    config = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, 0.0, config) == pytest.approx(1 / 11)
    assert lr_at(10, 0.0, config) == pytest.approx(1.0)
    assert lr_at(50, 0.5, config) == pytest.approx(0.55)
    assert lr_at(99, 1.0, config) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, warmup_steps=0, min_lr_ratio=0.0, schedule="wsd",
                      decay_fraction=0.2)
    assert lr_at(50, 0.7, wsd) == pytest.approx(1.0)
    assert lr_at(90, 0.9, wsd) == pytest.approx(0.5)
    assert lr_at(100, 1.0, wsd) == pytest.approx(0.0)


def test_no_decay_on_norms_and_embeddings():
    config = load_config(None, ["model.vocab_size=256", "model.d_model=32", "model.n_layers=1",
                                "model.n_heads=2"]).model
    model = CodeModel(config)
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.embed_tokens.weight) not in decayed
    assert id(model.norm.weight) not in decayed
    assert id(model.layers[0].self_attn.q_proj.weight) in decayed
    assert no_decay["weight_decay"] == 0.0
    total = sum(p.numel() for group in (decay, no_decay) for p in group["params"])
    assert total == model.num_parameters()
