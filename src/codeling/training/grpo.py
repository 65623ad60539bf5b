"""GRPO: online RL with rewards from running sampled code against tests (`train.objective: grpo`).

Group Relative Policy Optimization, introduced with DeepSeekMath (Shao et al., 2024): PPO's
clipped objective with the group's mean reward as the baseline in place of a value model.
One optimizer step:

1. Take `grpo_prompts_per_step` tasks from the train split of `codeling.data.code_tasks`, and
   sample `grpo_group_size` (G) completions of each prompt with the current policy, G rows in
   one batch with a KV cache. A completion ends at eos, at the end of the function body (the
   first unindented line), or after `grpo_max_new_tokens` tokens.
2. Reward each completion by running it against the task's tests in the sandbox:
   1.0 when every assert holds, otherwise `grpo_partial_credit` times the share of asserts
   that held (0 for a syntax error, a timeout or an error before any assert).
3. Advantage of completion i of a group: A_i = (r_i - mean(r)) / (std(r) + eps), with the
   population standard deviation of the G rewards. A group whose rewards are all equal has
   A = 0 and contributes only the KL term.
4. Loss, for each completion token t of completion i, with the policy ratio
   rho = exp(log pi(t) - log pi_old(t)):

       l_t = -( min(rho * A_i, clip(rho, 1 - eps_clip, 1 + eps_clip) * A_i) - beta * kl_t )
       kl_t = exp(log ref(t) - log pi(t)) - (log ref(t) - log pi(t)) - 1   (the k3 estimator)

   averaged over the tokens of each completion, then over completions. pi_old is the policy
   that sampled (its log-probabilities are computed once before the first update), and ref is
   the frozen `init_from` model. All log-probabilities divide the logits by
   `grpo_temperature`, the distribution the completions were sampled from.
5. Take `grpo_inner_steps` optimizer steps on this batch. With one step, rho is exactly 1 and
   clipping never applies.

Per step the log and metrics.jsonl record the mean reward, pass rate, KL, clip fraction,
completion length and loss. `reward.png` plots the mean reward against the step. Checkpoints
have the standard layout, so generate, eval and serve load them, and `--resume` continues the
run. The greedy pass rate on held-out test tasks is measured at the start, every
`eval_every` steps and at the end.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from codeling.config import RunConfig
from codeling.data import code_tasks
from codeling.data.code_tasks import CodeTask, ExecResult
from codeling.errors import CodelingError, ConfigError
from codeling.inference.generate import decode_in_bf16
from codeling.inference.sampling import sample_next
from codeling.models import lora
from codeling.models.decoder import CodeModel
from codeling.tokenizer import SPECIAL_TOKENS, Tokenizer
from codeling.training import checkpoint as ckpt
from codeling.training.device import autocast, resolve_device, use_bf16
from codeling.training.optim import build_optimizer, lr_at
from codeling.training.trainer import TrainResult, _StopRequest, format_duration

log = logging.getLogger(__name__)

# Added to the group's standard deviation, so a group with nearly equal rewards does not blow
# up its advantages.
ADVANTAGE_EPS = 1e-4
# Sandboxes running the tests of one batch at the same time.
CHECK_WORKERS = 2
EVAL_SPLIT = "code_tasks_test"
TASK_SOURCE = "code-tasks:train"


# -- the objective -------------------------------------------------------------------------------


def completion_reward(result: ExecResult, partial_credit: float) -> float:
    """Return 1.0 for a passing completion, else partial_credit times the share of asserts held."""
    if result.passed:
        return 1.0
    return partial_credit * result.fraction_passed


def group_advantages(rewards: torch.Tensor, group_size: int,
                     eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """Normalize rewards (N,) within consecutive groups of group_size: (r - mean) / (std + eps).

    The standard deviation is the population one (divided by G, not G - 1).
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise CodelingError(f"rewards of shape {tuple(rewards.shape)} do not split into groups "
                            f"of {group_size}")
    groups = rewards.float().view(-1, group_size)  # (P, G)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Estimate KL(pi || ref) per token from samples of pi: exp(d) - d - 1 with d = ref - logp.

    This is the "k3" estimator. It is unbiased because E_pi[exp(d)] = 1 and E_pi[-d] is the
    KL divergence, it is never negative, and it is exactly 0 where the two models agree.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class GRPOLoss:
    """The loss of one micro-batch and the statistics logged with it."""

    loss: torch.Tensor  # sum over sequences of each sequence's mean token loss
    kl: torch.Tensor  # the same sum of the mean KL per token
    clipped_tokens: torch.Tensor  # completion tokens where the clipped term was the minimum
    tokens: torch.Tensor  # completion tokens


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float,
              kl_coef: float) -> GRPOLoss:
    """Compute the clipped GRPO loss with a KL penalty, summed over the sequences of a batch.

    logp, old_logp, ref_logp and mask are (B, T) over target positions; mask is 1 on
    completion tokens. advantages is (B,). Divide `loss` by the number of sequences of the
    whole batch to get the mean.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)  # (B, T)
    advantage = advantages[:, None]  # (B, 1)
    unclipped = ratio * advantage
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantage
    surrogate = torch.minimum(unclipped, clipped)
    kl = kl_k3(logp, ref_logp)
    per_token = -(surrogate - kl_coef * kl)  # (B, T)
    lengths = mask.sum(dim=1).clamp(min=1.0)  # (B,)
    loss = ((per_token * mask).sum(dim=1) / lengths).sum()
    kl_sum = ((kl * mask).sum(dim=1) / lengths).sum()
    was_clipped = ((clipped < unclipped) & (mask > 0)).sum()
    return GRPOLoss(loss, kl_sum.detach(), was_clipped.detach(), mask.sum().detach())


def token_logprobs(model: torch.nn.Module, tokens: torch.Tensor, temperature: float,
                   device: torch.device, bf16: bool) -> torch.Tensor:
    """Return log p(tokens[:, t + 1] | tokens[:, :t + 1]) as (B, T - 1), at the given temperature."""
    with autocast(device, bf16):
        logits = model(tokens[:, :-1])  # (B, T - 1, V)
    logits = logits.float() / temperature
    targets = tokens[:, 1:]  # (B, T - 1)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


# -- sampling ------------------------------------------------------------------------------------


@dataclass
class Completion:
    """One sampled completion: its token ids (the stop token included) and its code."""

    ids: list[int]
    text: str


def body_ended(text: str) -> bool:
    """Return True once the text has a line after the function body (an unindented line)."""
    return len(code_tasks.truncate_body(text)) < len(text)


@torch.inference_mode()
def sample_completions(model: CodeModel, tokenizer: Tokenizer, prompt_ids: list[int], n: int,
                       max_new_tokens: int, temperature: float, device: torch.device,
                       bf16: bool = False, generator: torch.Generator | None = None
                       ) -> list[Completion]:
    """Sample n completions of one prompt as one batch of n rows; temperature 0 is greedy.

    A row ends at eos or <|end_turn|> (kept in `ids`), or with the token that starts a line
    after the function body (kept in `ids`, cut from `text`). Other special tokens are never
    sampled, as in `Generator`.
    """
    was_training = model.training
    model.eval()
    stop_ids = {tokenizer.eos_id, tokenizer.token_id("<|end_turn|>")}
    banned = [i for i in range(len(SPECIAL_TOKENS)) if i not in stop_ids]
    cache = model.new_cache(n, len(prompt_ids) + max_new_tokens)
    tokens = torch.tensor([prompt_ids] * n, device=device)  # (n, T)
    rows: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(max_new_tokens):
        with autocast(device, bf16):
            logits = model(tokens, cache)[:, -1].float()  # (n, V)
        logits[:, banned] = float("-inf")
        next_ids = sample_next(logits, temperature, 0, 1.0, generator)  # (n,)
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            rows[row].append(token)
            if token in stop_ids or body_ended(tokenizer.decode(rows[row])):
                done[row] = True
        if all(done):
            break
        tokens = next_ids[:, None]
    model.train(was_training)
    completions = []
    for row in rows:
        content = row[:-1] if row and row[-1] in stop_ids else row
        completions.append(Completion(row, code_tasks.truncate_body(tokenizer.decode(content))))
    return completions


# -- one batch of rollouts -----------------------------------------------------------------------


@dataclass
class Rollout:
    """Sampled completions of a batch of prompts, their rewards and the padded token tensor."""

    tasks: list[CodeTask]  # one per sequence, G in a row for each prompt
    completions: list[Completion]
    results: list[ExecResult]
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    tokens: torch.Tensor  # (N, L) prompt + completion, right-padded
    mask: torch.Tensor  # (N, L - 1) 1 where the target token is a completion token


def build_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad prompt + completion sequences; return tokens (N, L) and the target mask (N, L - 1).

    Padding at the end does not change the logits of earlier positions under causal attention.
    """
    sequences = [prompt + completion for prompt, completion in zip(prompts, completions)]
    length = max(len(sequence) for sequence in sequences)
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length - 1), dtype=torch.bool)
    for row, (prompt, sequence) in enumerate(zip(prompts, sequences)):
        tokens[row, :len(sequence)] = torch.tensor(sequence)
        # Target position t predicts token t + 1, so completion tokens start at len(prompt) - 1.
        mask[row, len(prompt) - 1:len(sequence) - 1] = True
    return tokens, mask


@dataclass
class MicroBatch:
    """Consecutive sequences of a rollout, moved to the device for one forward pass."""

    tokens: torch.Tensor  # (b, W) cut to the longest sequence of these b
    mask: torch.Tensor  # (b, W - 1)
    advantages: torch.Tensor  # (b,)


# -- the trainer ---------------------------------------------------------------------------------


class GRPOTrainer:
    """Owns the policy, the frozen reference, the optimizer and the loop of one GRPO stage."""

    def __init__(self, model: CodeModel, reference: CodeModel, tokenizer: Tokenizer,
                 config: RunConfig, stage_dir: Path, tokenizer_dir: Path,
                 device: torch.device, bf16: bool):
        self.model = model
        self.reference = reference.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.train = config.train
        self.stage_dir = Path(stage_dir)
        self.tokenizer_dir = Path(tokenizer_dir)
        self.device = device
        self.bf16 = bf16
        self.decode_bf16 = decode_in_bf16(self.train.precision, device)
        self.optimizer = build_optimizer(model, self.train, device)
        self.tasks = code_tasks.load_code_tasks("train")
        self.eval_tasks = code_tasks.load_code_tasks("test")[:self.train.eval_batches
                                                             * self.train.batch_size]
        self.prompt_ids = {task.task_id: tokenizer.encode(task.prompt) for task in self.tasks}
        self.sampler = torch.Generator(device=device).manual_seed(self.train.seed)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.epoch = 0
        self.cursor = 0
        self.metrics_path = self.stage_dir / "metrics.jsonl"

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Return the counters, optimizer, task order position and every RNG state."""
        return {
            "step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
            "optimizer": self.optimizer.state_dict(),
            "tasks": {"epoch": self.epoch, "cursor": self.cursor},
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(), "sampler": self.sampler.get_state()},
            **({"lora": lora.adapter_state_dict(self.model)} if lora.has_lora(self.model) else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.cursor = state["tasks"]["epoch"], state["tasks"]["cursor"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.sampler.set_state(state["rng"]["sampler"])

    def trim_metrics(self) -> None:
        """Drop metrics logged after the current step, left by a run killed before its checkpoint."""
        if not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def save(self) -> Path:
        path = ckpt.save_checkpoint(self.stage_dir, self.step, self.model, self.config,
                                    self.state_dict(), self.tokenizer_dir,
                                    self.tokenizer.fingerprint, keep=self.train.keep_checkpoints)
        log.info("saved checkpoint %s", path)
        return path

    def _write_metrics(self, record: dict) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    # -- one step -------------------------------------------------------------------------------

    def next_tasks(self) -> list[CodeTask]:
        """Return the next prompts_per_step tasks of a shuffled order that is redrawn each epoch."""
        chosen = []
        while len(chosen) < self.train.grpo_prompts_per_step:
            order = list(range(len(self.tasks)))
            random.Random(self.train.seed * 1_000_003 + self.epoch).shuffle(order)
            chosen.append(self.tasks[order[self.cursor]])
            self.cursor += 1
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return chosen

    def rollout(self, tasks: list[CodeTask]) -> Rollout:
        """Sample a group of completions per task, run their tests and compute advantages."""
        group = self.train.grpo_group_size
        prompts, completions, rollout_tasks = [], [], []
        for task in tasks:
            prompt = self.prompt_ids[task.task_id]
            sampled = sample_completions(self.model, self.tokenizer, prompt, group,
                                         self.train.grpo_max_new_tokens,
                                         self.train.grpo_temperature, self.device,
                                         self.decode_bf16, self.sampler)
            prompts += [prompt] * group
            completions += sampled
            rollout_tasks += [task] * group
        results = code_tasks.check_many(
            [(task, completion.text) for task, completion in zip(rollout_tasks, completions)],
            workers=CHECK_WORKERS)
        rewards = torch.tensor([completion_reward(result, self.train.grpo_partial_credit)
                                for result in results])
        tokens, mask = build_batch(prompts, [completion.ids for completion in completions],
                                   self.tokenizer.pad_id)
        return Rollout(rollout_tasks, completions, results, rewards,
                       group_advantages(rewards, group), tokens, mask)

    def micro_batches(self, batch: Rollout) -> list[MicroBatch]:
        """Split a rollout into micro-batches of train.batch_size sequences, each cut to the
        length of its longest sequence, so short groups do not pay for long ones."""
        parts = []
        for start in range(0, len(batch.tokens), self.train.batch_size):
            rows = slice(start, start + self.train.batch_size)
            mask = batch.mask[rows]
            # Every row has a completion token, so the last masked position exists.
            width = int(mask.any(dim=0).nonzero().max()) + 2
            parts.append(MicroBatch(batch.tokens[rows, :width].to(self.device),
                                    mask[:, :width - 1].to(self.device),
                                    batch.advantages[rows].to(self.device)))
        return parts

    @torch.no_grad()
    def _logprobs_without_grad(self, model: torch.nn.Module, parts: list[MicroBatch]
                               ) -> list[torch.Tensor]:
        was_training = model.training
        model.eval()
        logprobs = [token_logprobs(model, part.tokens, self.train.grpo_temperature,
                                   self.device, self.bf16) for part in parts]
        model.train(was_training)
        return logprobs

    def optimize(self, batch: Rollout) -> dict[str, float]:
        """Take grpo_inner_steps optimizer steps on one rollout; return the last step's statistics."""
        parts = self.micro_batches(batch)
        reference = self._logprobs_without_grad(self.reference, parts)
        old = None
        if self.train.grpo_inner_steps > 1:
            old = self._logprobs_without_grad(self.model, parts)
        lr = lr_at(self.step, self.progress(), self.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats: dict[str, float] = {}
        for _ in range(self.train.grpo_inner_steps):
            stats = self._inner_step(parts, reference, old)
        stats["lr"] = lr
        return stats

    def _inner_step(self, parts: list[MicroBatch], reference: list[torch.Tensor],
                    old: list[torch.Tensor] | None) -> dict[str, float]:
        count = sum(len(part.tokens) for part in parts)
        totals: Counter[str] = Counter()
        self.model.train()
        for index, part in enumerate(parts):
            logp = token_logprobs(self.model, part.tokens, self.train.grpo_temperature,
                                  self.device, self.bf16)
            old_logp = old[index] if old is not None else logp.detach()
            result = grpo_loss(logp, old_logp, reference[index], part.advantages, part.mask,
                               self.train.grpo_clip, self.train.grpo_kl_coef)
            (result.loss / count).backward()
            totals["loss"] += float(result.loss.detach())
            totals["kl"] += float(result.kl)
            totals["clipped"] += float(result.clipped_tokens)
            totals["tokens"] += float(result.tokens)
        if self.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": totals["loss"] / count, "kl": totals["kl"] / count,
                "clip_fraction": totals["clipped"] / max(totals["tokens"], 1.0),
                "grad_norm": float(norm)}

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Return the greedy pass rate and mean reward on the held-out test tasks."""
        results = evaluate_code_tasks(self.model, self.tokenizer, self.eval_tasks, self.device,
                                      self.train.grpo_max_new_tokens, self.decode_bf16)
        rewards = [completion_reward(result, self.train.grpo_partial_credit)
                   for result in results]
        summary = {"pass_rate": sum(result.passed for result in results) / max(len(results), 1),
                   "reward": sum(rewards) / max(len(rewards), 1), "tasks": len(results)}
        log.info("step %d | held-out code tasks (greedy) | pass rate %.3f | reward %.3f | "
                 "%d tasks", self.step, summary["pass_rate"], summary["reward"], len(results))
        self._write_metrics({"step": self.step, "split": EVAL_SPLIT, **summary})
        return summary

    # -- loop -----------------------------------------------------------------------------------

    def progress(self) -> float:
        """Fraction of the budget used: the further along of steps and time."""
        fraction = self.step / self.train.max_steps
        if self.train.max_minutes:
            fraction = max(fraction, self.elapsed / (60 * self.train.max_minutes))
        return fraction

    def _stop_reason(self) -> str:
        if self.step >= self.train.max_steps:
            return "step budget"
        if self.train.max_tokens and self.tokens >= self.train.max_tokens:
            return "token budget"
        if self.train.max_minutes and self.elapsed >= 60 * self.train.max_minutes:
            return "time budget"
        return ""

    def train_step(self) -> dict[str, Any]:
        """Sample, reward and optimize one batch; return the step's metrics record."""
        started = time.perf_counter()
        batch = self.rollout(self.next_tasks())
        sampled = time.perf_counter()
        stats = self.optimize(batch)
        self.step += 1
        self.tokens += int(batch.mask.sum())
        reasons = Counter(result.reason for result in batch.results)
        lengths = [len(completion.ids) for completion in batch.completions]
        return {
            "step": self.step, "reward_mean": float(batch.rewards.mean()),
            "reward_std": float(batch.rewards.std(unbiased=False)),
            "pass_rate": reasons["passed"] / len(batch.results), **stats,
            "completion_tokens": sum(lengths) / len(lengths),
            "reasons": dict(sorted(reasons.items())), "tokens": self.tokens,
            "rollout_seconds": sampled - started, "update_seconds": time.perf_counter() - sampled,
        }

    def fit(self, stop_at_step: int | None = None) -> TrainResult:
        """Train until a budget runs out; return the last metrics and checkpoint.

        `stop_at_step` ends the run early, as an interruption would.
        """
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        val: dict[str, dict[str, float]] = {}
        if self.step == 0 and self.eval_tasks:
            val = {EVAL_SPLIT: self._timed_evaluate()}
        stop_reason, loss, latest = self._train_until_stop(stop_at_step)
        val = latest or val
        log.info("stopped at step %d (%s)", self.step, stop_reason)

        interrupted = stop_reason in ("interrupted", "SIGTERM", "stop_at_step")
        if not interrupted and self.eval_tasks:
            val = {EVAL_SPLIT: self._timed_evaluate()}
        path = self.save() if self.step > 0 else None
        if interrupted:
            log.info("resume with the same command plus --resume")
        plot_rewards(self.metrics_path, self.stage_dir / "reward.png")
        return TrainResult(self.step, self.tokens, self.elapsed, loss, val, stop_reason, path)

    def _train_until_stop(self, stop_at_step: int | None
                          ) -> tuple[str, float, dict[str, dict[str, float]]]:
        """Run steps until a budget, a signal or stop_at_step ends them.

        Returns the stop reason, the last loss and the last held-out evaluation (or {}).
        """
        stop_reason, loss, val = "", float("nan"), {}
        with _StopRequest() as stop:
            try:
                while not (stop_reason := self._stop_reason()):
                    started = time.perf_counter()
                    record = self.train_step()
                    self.elapsed += time.perf_counter() - started
                    record["elapsed"] = self.elapsed
                    loss = record["loss"]
                    if not math.isfinite(loss):
                        raise FloatingPointError(
                            f"GRPO loss became {loss} at step {self.step}; lower train.lr or "
                            "set train.grad_clip, then resume from the last checkpoint")
                    self._write_metrics(record)
                    if self.step % self.train.log_every == 0 or self.step == 1:
                        self._log_step(record)

                    if self.train.eval_every and self.step % self.train.eval_every == 0:
                        val = {EVAL_SPLIT: self._timed_evaluate()}
                    if self.train.checkpoint_every and self.step % self.train.checkpoint_every == 0:
                        self.save()
                    if stop.requested:
                        return "SIGTERM", loss, val
                    if stop_at_step is not None and self.step >= stop_at_step:
                        return "stop_at_step", loss, val
            except KeyboardInterrupt:
                stop_reason = "interrupted"
        return stop_reason, loss, val

    def _timed_evaluate(self) -> dict[str, float]:
        started = time.perf_counter()
        summary = self.evaluate()
        self.elapsed += time.perf_counter() - started
        return summary

    def _log_step(self, record: dict[str, Any]) -> None:
        progress = max(self.progress(), 1e-9)
        eta = self.elapsed / progress - self.elapsed
        log.info("step %d/%d | reward %.3f | pass %.3f | loss %.4f | KL %.4f | clip %.3f | "
                 "length %.1f | lr %.2e | grad norm %.3f | %s | elapsed %s | ETA %s",
                 self.step, self.train.max_steps, record["reward_mean"], record["pass_rate"],
                 record["loss"], record["kl"], record["clip_fraction"],
                 record["completion_tokens"], record["lr"], record["grad_norm"],
                 " ".join(f"{reason} {count}" for reason, count in record["reasons"].items()),
                 format_duration(self.elapsed), format_duration(eta))


def evaluate_code_tasks(model: CodeModel, tokenizer: Tokenizer, tasks: list[CodeTask],
                        device: torch.device, max_new_tokens: int, bf16: bool = False,
                        workers: int = CHECK_WORKERS) -> list[ExecResult]:
    """Complete each task greedily and run its tests; return the results in task order."""
    completions = []
    for task in tasks:
        prompt = tokenizer.encode(task.prompt)
        budget = min(max_new_tokens, model.config.max_seq_len - len(prompt))
        if budget < 1:
            raise CodelingError(f"code task {task.task_id} has a {len(prompt)}-token prompt, "
                                f"which fills the model's context of {model.config.max_seq_len}")
        completions.append(sample_completions(model, tokenizer, prompt, 1, budget, 0.0, device,
                                              bf16)[0].text)
    return code_tasks.check_many(list(zip(tasks, completions)), workers=workers)


def plot_rewards(metrics_path: Path, out_path: Path) -> Path | None:
    """Plot the mean reward and pass rate per step from metrics.jsonl into a PNG."""
    if not metrics_path.is_file():
        return None
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "reward_mean" in r]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["step"] for r in steps]
    rewards = [r["reward_mean"] for r in steps]
    window = max(1, len(steps) // 10)
    smoothed = []
    for index in range(len(rewards)):
        recent = rewards[max(0, index - window + 1):index + 1]
        smoothed.append(sum(recent) / len(recent))
    pass_rates = [r["pass_rate"] for r in steps]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(x, rewards, linewidth=0.8, alpha=0.4, label="mean reward per step")
    if window > 1:
        axis.plot(x, smoothed, linewidth=1.8, label=f"mean reward, {window}-step moving average")
    axis.plot(x, pass_rates, linewidth=0.8, alpha=0.6, label="pass rate per step")
    held_out = [(r["step"], r["pass_rate"]) for r in records if r.get("split") == EVAL_SPLIT]
    if held_out:
        axis.plot(*zip(*held_out), marker="o", markersize=4, linestyle="--",
                  label="held-out pass rate (greedy)")
    highest = max(rewards + pass_rates + [rate for _, rate in held_out])
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("reward / pass rate")
    axis.set_ylim(0.0, min(1.02, 1.15 * highest + 0.02))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path


# -- the stage -----------------------------------------------------------------------------------


def check_grpo_config(config: RunConfig) -> None:
    """Raise ConfigError for GRPO settings that cannot work together."""
    problems = []
    if not config.init_from:
        problems.append("train.objective is grpo but init_from is empty; GRPO improves a "
                        "trained model, so set init_from to an earlier stage or checkpoint")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("train.objective grpo runs in one process; start it without torchrun")
    if config.train.max_epochs:
        problems.append(f"train.max_epochs: {config.train.max_epochs} does not apply to grpo, "
                        "which samples its own prompts; use train.max_steps or max_minutes")
    if problems:
        raise ConfigError(problems)


def _check_prompt_lengths(trainer: GRPOTrainer, max_seq_len: int) -> None:
    longest = max(len(ids) for ids in trainer.prompt_ids.values())
    if longest + trainer.train.grpo_max_new_tokens > max_seq_len:
        raise ConfigError([f"train.grpo_max_new_tokens: {trainer.train.grpo_max_new_tokens} plus "
                           f"the longest code task prompt ({longest} tokens) exceeds "
                           f"model.max_seq_len ({max_seq_len}); lower grpo_max_new_tokens"])


def _load_tokenizer(config: RunConfig, run_dir: Path, init_checkpoint: Path) -> Tokenizer:
    """Load the run's tokenizer, or copy the init checkpoint's into the run."""
    target = run_dir / "tokenizer"
    if (target / "tokenizer.json").is_file():
        return Tokenizer.load(target)
    tokenizer = Tokenizer.load(config.tokenizer.path or init_checkpoint / "tokenizer.json")
    tokenizer.save(target)
    return tokenizer


def run_grpo(config: RunConfig, resume: bool = False) -> TrainResult:
    """Run a GRPO stage: policy and reference from init_from, then train and checkpoint."""
    from codeling.config import save_config
    from codeling.stages.pretrain import (build_model, check_resume, find_init_checkpoint,
                                          initialize_from, mark_done, restore)

    check_grpo_config(config)
    run_dir = config.resolved_run_dir()
    stage_dir = run_dir / config.stage
    checkpoint = check_resume(config, stage_dir, resume)
    init_checkpoint = find_init_checkpoint(config)
    device = resolve_device(config.train.device)
    bf16 = use_bf16(config.train.precision, device)
    torch.manual_seed(config.train.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _load_tokenizer(config, run_dir, init_checkpoint)
    if config.data.sources:
        log.info("train.objective grpo samples its prompts from %s; data.sources is not used",
                 TASK_SOURCE)

    model = build_model(config, tokenizer).to(device)
    initialize_from(model, init_checkpoint, tokenizer)
    reference = copy.deepcopy(model)
    if config.train.lora_rank:
        lora.apply_lora(model, config.train.lora_rank, config.train.lora_alpha,
                        config.train.lora_targets, config.train.lora_dropout)
    trainer = GRPOTrainer(model, reference, tokenizer, config, stage_dir, run_dir / "tokenizer",
                          device, bf16)
    _check_prompt_lengths(trainer, config.model.max_seq_len)
    if checkpoint is not None:
        restore(trainer, model, checkpoint, tokenizer, config)
    save_config(config, run_dir / "config.yaml")
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, stage_dir / "config.yaml")
    _describe_grpo(config, trainer, device, bf16)
    result = trainer.fit()
    if result.stop_reason not in ("interrupted", "SIGTERM", "stop_at_step"):
        mark_done(stage_dir, result, [TASK_SOURCE])
    return result


def _describe_grpo(config: RunConfig, trainer: GRPOTrainer, device: torch.device,
                   bf16: bool) -> None:
    """Log the model size, the device and every GRPO setting."""
    t = config.train
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: %s, %.2fM parameters, %.2fM trainable; device %s, %s training forward, "
             "%s sampling", config.model.arch, model.num_parameters() / 1e6, trainable / 1e6,
             device, "bf16" if bf16 else "fp32", "bf16" if trainer.decode_bf16 else "fp32")
    log.info("GRPO: %d train code tasks, %d prompts x %d completions per step, up to %d new "
             "tokens at temperature %g", len(trainer.tasks), t.grpo_prompts_per_step,
             t.grpo_group_size, t.grpo_max_new_tokens, t.grpo_temperature)
    log.info("GRPO: clip %g, KL coefficient %g (k3 estimator), %d optimizer step(s) per batch, "
             "partial credit %g, micro-batches of %d sequences", t.grpo_clip, t.grpo_kl_coef,
             t.grpo_inner_steps, t.grpo_partial_credit, t.batch_size)
    log.info("held-out evaluation: %d test code tasks, greedy (train.eval_batches x "
             "train.batch_size caps the count)", len(trainer.eval_tasks))
