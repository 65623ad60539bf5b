"""GRPO: advantages, the clipped objective, the KL estimator, sampling, and a 2-step run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from codeling.config import ModelConfig, RunConfig, TrainConfig
from codeling.data import code_tasks
from codeling.data.code_tasks import ExecResult
from codeling.errors import ConfigError
from codeling.inference.generate import Generator
from codeling.models.decoder import CodeModel
from codeling.stages.pretrain import run_training
from codeling.training import checkpoint as ckpt
from codeling.training import grpo

CPU = torch.device("cpu")


def tiny_model(vocab_size: int, seed: int = 0) -> CodeModel:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=2,
                         max_seq_len=256)
    return CodeModel(config).eval()


# -- the objective -------------------------------------------------------------------------------


def test_advantages_normalized_per_group() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    advantages = grpo.group_advantages(rewards, group_size=4, eps=0.0 + 1e-4)
    std = math.sqrt(0.75 * 0.25)  # population std of one 1 and three 0s
    expected_first = [0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3
    assert advantages[:4].tolist() == pytest.approx(expected_first, rel=1e-5)
    assert advantages[4:].tolist() == [0.0] * 4  # equal rewards carry no signal
    assert float(advantages[:4].sum()) == pytest.approx(0.0, abs=1e-5)


def test_advantages_reject_partial_group() -> None:
    with pytest.raises(Exception, match="groups of 4"):
        grpo.group_advantages(torch.zeros(6), group_size=4)


def test_kl_k3_zero_when_equal() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.1, 0.9]]))
    assert torch.equal(grpo.kl_k3(logp, logp), torch.zeros_like(logp))


def test_kl_k3_hand_value() -> None:
    logp = torch.log(torch.tensor([0.5]))
    ref = torch.log(torch.tensor([0.25]))
    # d = log(0.25 / 0.5) = -log 2, so exp(d) - d - 1 = 0.5 + log 2 - 1.
    assert float(grpo.kl_k3(logp, ref)) == pytest.approx(0.5 + math.log(2) - 1, rel=1e-6)
    assert float(grpo.kl_k3(ref, logp)) > 0


def test_clipped_objective_hand_computed() -> None:
    # Ratios 1.5, 0.5, 0.5, 1.5 against advantages +1, +1, -1, -1 with clip 0.2:
    #   A = +1, ratio 1.5: min(1.5, 1.2) = 1.2   (clipped)
    #   A = +1, ratio 0.5: min(0.5, 0.8) = 0.5
    #   A = -1, ratio 0.5: min(-0.5, -0.8) = -0.8 (clipped)
    #   A = -1, ratio 1.5: min(-1.5, -1.2) = -1.5
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]]))
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(4, 1)
    result = grpo.grpo_loss(logp, old, logp.clone(), advantages, mask, clip=0.2, kl_coef=0.5)
    expected = -(1.2 + 0.5 - 0.8 - 1.5)  # the KL term is 0: reference == policy
    assert float(result.loss) == pytest.approx(expected, rel=1e-6)
    assert int(result.clipped_tokens) == 2
    assert int(result.tokens) == 4
    assert float(result.kl) == pytest.approx(0.0, abs=1e-7)


def test_loss_averages_tokens_then_sequences_with_kl() -> None:
    # Sequence 0 has two completion tokens and one masked token; sequence 1 has one token.
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.2, 0.3, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.5, 0.1], [0.2, 0.6, 0.3]]))
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    advantages = torch.tensor([2.0, -1.0])
    kl_coef = 0.1
    kl_a = 0.5 + math.log(2) - 1  # ref/pi = 0.5
    kl_b = 2 - math.log(2) - 1  # ref/pi = 2
    # Ratio 1 everywhere, so the surrogate is the advantage on every token.
    sequence_0 = -((2.0 - kl_coef * kl_a) + (2.0 - 0.0)) / 2
    sequence_1 = -(-1.0 - kl_coef * kl_b)
    result = grpo.grpo_loss(logp, logp.detach(), ref, advantages, mask, clip=0.2,
                            kl_coef=kl_coef)
    assert float(result.loss) == pytest.approx(sequence_0 + sequence_1, rel=1e-5)
    assert float(result.kl) == pytest.approx(kl_a / 2 + kl_b, rel=1e-5)
    assert int(result.tokens) == 3


def test_completion_reward() -> None:
    passed = ExecResult(True, "passed", "", 5, 5)
    partial = ExecResult(False, "wrong_result", "", 2, 5)
    syntax = ExecResult(False, "syntax_error", "", 0, 5)
    assert grpo.completion_reward(passed, 0.5) == 1.0
    assert grpo.completion_reward(partial, 0.5) == pytest.approx(0.2)
    assert grpo.completion_reward(partial, 0.0) == 0.0
    assert grpo.completion_reward(syntax, 0.5) == 0.0


def test_build_batch_masks_completion_targets() -> None:
    tokens, mask = grpo.build_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    # Target t is tokens[:, t + 1]: completion tokens 1, 2 and 3, 4, 9.
    assert mask.tolist() == [[False, False, True, True], [True, True, True, False]]


def test_token_logprobs_match_unpadded_reference(small_tokenizer) -> None:
    model = tiny_model(small_tokenizer.vocab_size)
    prompts, completions = [[10, 11, 12, 13], [20, 21]], [[30, 31], [40, 41, 42, 43, 44]]
    tokens, mask = grpo.build_batch(prompts, completions, small_tokenizer.pad_id)
    batched = grpo.token_logprobs(model, tokens, 0.7, CPU, False)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        sequence = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(sequence)[0, :-1].float() / 0.7
        reference = torch.log_softmax(logits, -1)[torch.arange(len(sequence[0]) - 1),
                                                  sequence[0, 1:]]
        got = batched[row, :len(sequence[0]) - 1]
        assert torch.allclose(got, reference, atol=1e-5)
        assert int(mask[row].sum()) == len(completion)


def test_positive_advantage_raises_logprob(small_tokenizer) -> None:
    model = tiny_model(small_tokenizer.vocab_size).train()
    tokens, mask = grpo.build_batch([[10, 11], [10, 11]], [[50, 51, 52], [60, 61, 62]],
                                    small_tokenizer.pad_id)
    advantages = torch.tensor([1.0, -1.0])

    def sequence_logprobs() -> torch.Tensor:
        with torch.no_grad():
            logp = grpo.token_logprobs(model, tokens, 1.0, CPU, False)
        return (logp * mask).sum(dim=1)

    before = sequence_logprobs()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    logp = grpo.token_logprobs(model, tokens, 1.0, CPU, False)
    result = grpo.grpo_loss(logp, logp.detach(), logp.detach(), advantages, mask, 0.2, 0.0)
    result.loss.backward()
    optimizer.step()
    after = sequence_logprobs()
    assert after[0] > before[0]
    assert after[1] < before[1]


# -- sampling ------------------------------------------------------------------------------------


def test_sample_completions_shapes_and_text(small_tokenizer) -> None:
    model = tiny_model(small_tokenizer.vocab_size)
    prompt = small_tokenizer.encode(code_tasks.load_code_tasks("train")[0].prompt)
    completions = grpo.sample_completions(model, small_tokenizer, prompt, 4, 12, 1.0, CPU,
                                          generator=torch.Generator().manual_seed(0))
    assert len(completions) == 4
    stop_ids = {small_tokenizer.eos_id, small_tokenizer.token_id("<|end_turn|>")}
    for completion in completions:
        assert 1 <= len(completion.ids) <= 12
        content = [i for i in completion.ids if i not in stop_ids]
        assert completion.text == code_tasks.truncate_body(small_tokenizer.decode(content))
        # Only the last token may end the row.
        assert not grpo.body_ended(small_tokenizer.decode(completion.ids[:-1]))


def test_greedy_sampling_matches_uncached_decoding(small_tokenizer) -> None:
    model = tiny_model(small_tokenizer.vocab_size, seed=3)
    prompt = small_tokenizer.encode("def add(a, b):\n")
    (fast,) = grpo.sample_completions(model, small_tokenizer, prompt, 1, 10, 0.0, CPU)
    # Slow reference: a full forward pass over the whole sequence for every new token.
    stop_ids = {small_tokenizer.eos_id, small_tokenizer.token_id("<|end_turn|>")}
    banned = [i for i in range(len(grpo.SPECIAL_TOKENS)) if i not in stop_ids]
    sequence, slow = list(prompt), []
    for _ in range(10):
        with torch.no_grad():
            logits = model(torch.tensor([sequence]))[0, -1].float()
        logits[banned] = float("-inf")
        token = int(logits.argmax())
        slow.append(token)
        sequence.append(token)
        if token in stop_ids or grpo.body_ended(small_tokenizer.decode(slow)):
            break
    assert fast.ids == slow


# -- a whole run ---------------------------------------------------------------------------------


def write_init_checkpoint(directory: Path, tokenizer) -> Path:
    """Save a tiny random model as a standard checkpoint, the start of a GRPO run."""
    model = tiny_model(tokenizer.vocab_size)
    tokenizer_dir = directory / "tokenizer"
    tokenizer.save(tokenizer_dir)
    config = RunConfig(name="init", run_dir=str(directory), stage="code",
                       model=model.config)
    return ckpt.save_checkpoint(directory / "code", 1, model, config, {}, tokenizer_dir,
                                tokenizer.fingerprint)


def grpo_config(tmp_path: Path, init: Path, max_steps: int) -> RunConfig:
    model = ModelConfig(vocab_size=0, d_model=32, n_layers=2, n_heads=2, max_seq_len=256)
    train = TrainConfig(objective="grpo", max_steps=max_steps, batch_size=2, lr=1e-3,
                        warmup_steps=0, grpo_group_size=2, grpo_prompts_per_step=2,
                        grpo_max_new_tokens=6, grpo_inner_steps=2, eval_batches=1,
                        eval_every=0, checkpoint_every=1, log_every=1, precision="fp32")
    return RunConfig(name="grpo", run_dir=str(tmp_path / "run"), stage="rlhf",
                     init_from=str(init), model=model, train=train)


def test_two_step_run_writes_loadable_checkpoint(tmp_path, small_tokenizer) -> None:
    init = write_init_checkpoint(tmp_path / "init", small_tokenizer)
    result = run_training(grpo_config(tmp_path, init, max_steps=2))
    stage = tmp_path / "run" / "rlhf"
    assert result.step == 2
    assert result.stop_reason == "step budget"
    assert ckpt.latest_checkpoint(stage).name == "step-000002"
    generator = Generator.from_checkpoint(stage, device="cpu")
    assert isinstance(generator.complete_many("def f():\n", 2, grpo_generation()), list)

    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "reward_mean" in record]
    assert [record["step"] for record in steps] == [1, 2]
    for key in ("reward_mean", "pass_rate", "kl", "clip_fraction", "completion_tokens", "loss"):
        assert all(math.isfinite(record[key]) for record in steps), key
    assert all(sum(record["reasons"].values()) == 4 for record in steps)
    held_out = [record for record in records if record.get("split") == grpo.EVAL_SPLIT]
    assert [record["step"] for record in held_out] == [0, 2]
    assert held_out[0]["tasks"] == 2
    assert (stage / "reward.png").stat().st_size > 0
    assert json.loads((stage / "done.json").read_text())["step"] == 2


def test_resume_continues_steps(tmp_path, small_tokenizer) -> None:
    init = write_init_checkpoint(tmp_path / "init", small_tokenizer)
    run_training(grpo_config(tmp_path, init, max_steps=1))
    with pytest.raises(Exception, match="--resume"):
        run_training(grpo_config(tmp_path, init, max_steps=2))
    result = run_training(grpo_config(tmp_path, init, max_steps=2), resume=True)
    assert result.step == 2
    stage = tmp_path / "run" / "rlhf"
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "reward_mean" in record] == [1, 2]
    state = ckpt.load_trainer_state(ckpt.latest_checkpoint(stage))
    assert state["tasks"] == {"epoch": 0, "cursor": 4}


def test_grpo_requires_init_from(tmp_path) -> None:
    config = RunConfig(name="grpo", run_dir=str(tmp_path / "run"), stage="rlhf",
                       train=TrainConfig(objective="grpo"))
    with pytest.raises(ConfigError, match="init_from"):
        run_training(config)


def grpo_generation():
    from codeling.inference.generate import GenerationConfig

    return GenerationConfig(max_new_tokens=4, seed=0)
