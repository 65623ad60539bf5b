"""Supervised fine-tuning on conversations: masked targets, the loader, LoRA, and `codeling train`
with `train.objective: sft` on a tiny run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from runs import write_config
from safetensors.torch import load_file

from codeling import chat
from codeling.cli import main
from codeling.config import ModelConfig, load_config
from codeling.data import chat_data
from codeling.data.chat_data import IGNORE_INDEX, SFTLoader
from codeling.data.loader import PackedLoader
from codeling.inference.generate import GenerationConfig, Generator
from codeling.models import lora
from codeling.models.decoder import CodeModel
from codeling.stages.pretrain import run_training
from codeling.training import checkpoint as ckpt
from codeling.training.trainer import Trainer


def conversation(index: int) -> dict:
    return {"messages": [{"role": "user", "content": f"add {index} and 2"},
                         {"role": "assistant", "content": f"{index + 2}"}]}


def test_targets_cover_only_assistant_tokens(small_tokenizer):
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "list files"},
                           {"role": "assistant", "content": "",
                            "tool_calls": [{"type": "function", "function": {
                                "name": "list_files", "arguments": {"path": "."}}}]},
                           {"role": "tool", "content": "a.py"},
                           {"role": "assistant", "content": "Just a.py."}]}
    (example,) = chat_data.tokenize_conversations([record], small_tokenizer, 1000, "test")
    inputs, targets = chat_data.examples_to_batch([example], 1000, small_tokenizer.pad_id)
    assert inputs.shape[1] % chat_data.PAD_MULTIPLE == 0
    trained = targets[0][targets[0] != IGNORE_INDEX].tolist()
    assert small_tokenizer.decode(trained) == (
        '<|tool_call|>{"name": "list_files", "arguments": {"path": "."}}<|end_turn|>'
        "Just a.py.<|end_turn|>")
    size = len(example.ids) - 1
    assert inputs[0, :size].tolist() == example.ids[:-1].tolist()
    assert (inputs[0, size:] == small_tokenizer.pad_id).all()
    # Each target is the token after its input position.
    positions = (targets[0] != IGNORE_INDEX).nonzero().flatten()
    assert all(targets[0, p] == example.ids[p + 1] for p in positions.tolist())


def test_long_conversations_are_dropped(small_tokenizer, caplog):
    records = [conversation(1), {"messages": [{"role": "user", "content": "x " * 400},
                                              {"role": "assistant", "content": "ok"}]}]
    examples = chat_data.tokenize_conversations(records, small_tokenizer, 64, "test")
    assert len(examples) == 1
    assert "dropped 1 of 2 conversations longer than train.seq_len + 1 = 64 tokens" in caplog.text


def test_loader_resumes_and_shards_by_rank(small_tokenizer):
    examples = chat_data.tokenize_conversations([conversation(i) for i in range(10)],
                                                small_tokenizer, 64, "test")
    first = SFTLoader(examples, 3, 64, small_tokenizer.pad_id, seed=1)
    for _ in range(4):
        next(first)
    second = SFTLoader(examples, 3, 64, small_tokenizer.pad_id, seed=1)
    second.load_state_dict(first.state_dict())
    for _ in range(5):  # past the end of an epoch
        (inputs_a, targets_a), (inputs_b, targets_b) = next(first), next(second)
        assert torch.equal(inputs_a, inputs_b)
        assert torch.equal(targets_a, targets_b)
    whole = SFTLoader(examples, 4, 64, small_tokenizer.pad_id, seed=2)
    ranks = [SFTLoader(examples, 2, 64, small_tokenizer.pad_id, seed=2, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3):
        inputs, _ = next(whole)
        parts = [next(loader)[0] for loader in ranks]
        for row in range(4):
            part = parts[row // 2][row % 2]
            assert inputs[row][inputs[row] != small_tokenizer.pad_id].tolist() == \
                part[part != small_tokenizer.pad_id].tolist()
    with pytest.raises(Exception, match="global batch size"):
        SFTLoader(examples, 3, 64, small_tokenizer.pad_id, seed=1).load_state_dict(
            SFTLoader(examples, 4, 64, small_tokenizer.pad_id, seed=1).state_dict())


def test_length_grouping_cuts_padding(small_tokenizer):
    records = [{"messages": [{"role": "user", "content": "word " * (1 + (i * 37) % 90)},
                             {"role": "assistant", "content": f"{i}"}]} for i in range(96)]
    examples = chat_data.tokenize_conversations(records, small_tokenizer, 512, "test")
    assert len(examples) == 96

    def epoch(loader: SFTLoader) -> tuple[list[int], int]:
        """Return the numbers that the assistant turns of one epoch contain, and the padding."""
        answers, padding = [], 0
        for _ in range(12):  # 96 conversations, 8 per batch
            inputs, targets = next(loader)
            padding += int((inputs == small_tokenizer.pad_id).sum())
            for row in targets:
                trained = row[row != IGNORE_INDEX].tolist()
                answers.append(int(small_tokenizer.decode(trained[:-1])))
        return answers, padding

    plain_answers, plain_padding = epoch(SFTLoader(examples, 8, 512, small_tokenizer.pad_id))
    grouped = SFTLoader(examples, 8, 512, small_tokenizer.pad_id, group_by_length=True)
    grouped_answers, grouped_padding = epoch(grouped)
    assert sorted(plain_answers) == sorted(grouped_answers) == list(range(96))
    assert grouped_padding < plain_padding / 2
    # The next epoch is another order, again complete, and a resumed loader follows it.
    resumed = SFTLoader(examples, 8, 512, small_tokenizer.pad_id, group_by_length=True)
    resumed.load_state_dict(grouped.state_dict())
    second, _ = epoch(grouped)
    assert sorted(second) == list(range(96))
    assert second != grouped_answers
    assert epoch(resumed)[0] == second


def test_replay_rows_are_fully_trained(small_tokenizer):
    examples = chat_data.tokenize_conversations([conversation(i) for i in range(10)],
                                                small_tokenizer, 64, "test")
    text = np.arange(16, 400, dtype=np.int64) % small_tokenizer.vocab_size
    replay = PackedLoader(text, batch_size=1, seq_len=64, seed=0)
    loader = SFTLoader(examples, 8, 64, small_tokenizer.pad_id, seed=0, replay=replay,
                       replay_fraction=0.5)
    full_rows = 0
    for _ in range(10):
        inputs, targets = next(loader)
        assert inputs.shape[1] == 64  # a replay row makes the batch full length
        full_rows += int((targets != IGNORE_INDEX).all(dim=1).sum())
    assert 20 <= full_rows <= 60  # about half of 80 rows
    # An epoch of 10 conversations at 4 conversations per batch on average.
    assert loader.batches_per_epoch == pytest.approx(2.5)
    assert SFTLoader(examples, 5, 64, small_tokenizer.pad_id, seed=0).batches_per_epoch == 2.0


def tiny_model(**overrides) -> CodeModel:
    torch.manual_seed(0)
    return CodeModel(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                                 **overrides))


@pytest.mark.parametrize("arch", ["dense", "hybrid"])
def test_lora_starts_at_the_model_and_merges_exactly(arch):
    model = tiny_model(arch=arch)
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        before = model(tokens)
    layers = lora.apply_lora(model, rank=4, alpha=8, targets=lora.DEFAULT_TARGETS)
    assert layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_a", ".lora_b")) for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before)
        for module in model.modules():
            if isinstance(module, lora.LoRALinear):
                module.lora_b.normal_(std=0.1)
        adapted = model(tokens)
        merged = lora.merged_copy(model)(tokens)
    assert not torch.allclose(adapted, before)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, lora.LoRALinear) for m in lora.merged_copy(model).modules())


def test_lora_rejects_unknown_targets():
    with pytest.raises(Exception, match="match no Linear layer.*q_proj"):
        lora.apply_lora(tiny_model(), rank=4, alpha=8, targets=["qkv"])


# -- `codeling train` with the sft objective ----------------------------------------------------


def sft_config(run_dir, data_file, **train) -> dict:
    settings = dict(objective="sft", batch_size=4, seq_len=64, max_steps=4, warmup_steps=1,
                    eval_every=2, eval_batches=1, checkpoint_every=2, log_every=1,
                    precision="fp32", lr=1e-3)
    settings.update(train)
    return {"name": "tiny", "run_dir": str(run_dir), "stage": "tools", "init_from": "code",
            "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
            "data": {"sources": [f"chat:{data_file}"], "val_fraction": 0.2},
            "train": settings}


@pytest.fixture
def run_copy(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    data_file = tmp_path / "chats.jsonl"
    data_file.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(40)))
    return run_dir, data_file


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_sft_trains_resumes_and_generates(run_copy, tmp_path, lora_rank, caplog):
    run_dir, data_file = run_copy
    config = write_config(tmp_path / "sft.yaml",
                          sft_config(run_dir, data_file, max_steps=2, lora_rank=lora_rank))
    assert main(["train", "--config", str(config)]) == 0
    # The tiny starting checkpoint trained for seconds, so it cannot copy yet.
    assert "the starting checkpoint does not copy from its context" in caplog.text
    caplog.clear()
    write_config(config, sft_config(run_dir, data_file, max_steps=4, lora_rank=lora_rank))
    assert main(["train", "--config", str(config), "--resume"]) == 0
    assert "copy from its context" not in caplog.text  # probed on a fresh start only
    checkpoint = ckpt.latest_checkpoint(run_dir / "tools")
    assert checkpoint.name == "step-000004"
    metrics = [json.loads(line) for line in (run_dir / "tools" / "metrics.jsonl").read_text()
               .splitlines()]
    assert any(record.get("split") == "conversations" for record in metrics)
    generator = Generator.from_checkpoint(run_dir / "tools")  # merged weights, plain model
    assert not lora.has_lora(generator.model)
    prompt = chat.render([{"role": "user", "content": "add 3 and 2"}], generator.tokenizer)
    turn = generator.generate_turn(prompt, GenerationConfig(max_new_tokens=4, temperature=0))
    assert isinstance(turn, list)


def test_lora_resume_equals_straight_run(run_copy, tmp_path, monkeypatch):
    run_dir, data_file = run_copy
    straight = write_config(tmp_path / "a.yaml", {**sft_config(run_dir, data_file, lora_rank=4),
                                                  "stage": "straight"})
    assert main(["train", "--config", str(straight)]) == 0
    split = write_config(tmp_path / "b.yaml", {**sft_config(run_dir, data_file, lora_rank=4),
                                               "stage": "split"})
    fit = Trainer.fit
    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", lambda self, stop_at_step=None: fit(self, stop_at_step=2))
        assert run_training(load_config(split)).step == 2
    assert run_training(load_config(split), resume=True).step == 4
    first = load_file(ckpt.latest_checkpoint(run_dir / "straight") / "model.safetensors")
    second = load_file(ckpt.latest_checkpoint(run_dir / "split") / "model.safetensors")
    assert first.keys() == second.keys()
    assert not any("lora" in key for key in first)
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-5, atol=1e-6)


def test_sft_rejects_text_sources(run_copy, tmp_path, capsys):
    run_dir, data_file = run_copy
    raw = sft_config(run_dir, data_file)
    raw["data"]["sources"] = ["python-stdlib"]
    config = write_config(tmp_path / "bad.yaml", raw)
    assert main(["train", "--config", str(config)]) == 2
    assert "must be chat sources" in capsys.readouterr().err
    raw = sft_config(run_dir, data_file, objective="lm")
    config = write_config(tmp_path / "bad2.yaml", raw)
    assert main(["train", "--config", str(config)]) == 2
    assert "train.objective: sft" in capsys.readouterr().err
    raw = sft_config(run_dir, data_file, lora_rank=4)
    raw["init_from"] = ""
    config = write_config(tmp_path / "bad3.yaml", raw)
    assert main(["train", "--config", str(config)]) == 2
    assert "init_from is empty" in capsys.readouterr().err
    assert not (run_dir / "tools").exists()
