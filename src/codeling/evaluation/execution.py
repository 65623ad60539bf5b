"""The `execution` suite: pass rate of sampled code on the held-out code tasks.

Each held-out task of `codeling.data.code_tasks` (a function signature and docstring with unit
tests) is run in two modes:

- chat: the task is a user message (`code_prompt`), and the model's assistant turn is the
  function body. This is the layout of the code pairs of `codeling data preferences`, so it
  shows what preference tuning changed;
- completion: the prompt is the bare signature and docstring, continued as plain text up to
  the first new top-level statement, as in HumanEval.

Every response runs against the task's tests in `codeling.sandbox`. Reported per mode: pass@1
(the mean share of passing samples per task), the share of tasks solved by at least one sample,
the mean share of asserts that held, and how the failures split into syntax errors, wrong
results, timeouts and other errors.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from codeling import chat
from codeling.errors import CodelingError
from codeling.inference.generate import GenerationConfig, Generator
from codeling.inference.sampling import sample_next
from codeling.tokenizer import SPECIAL_TOKENS
from codeling.training.device import autocast

log = logging.getLogger(__name__)

MODES = ("chat", "completion")
REASONS = ("passed", "syntax_error", "wrong_result", "timeout", "error")
CODE_INSTRUCTION = "Complete the body of this Python function."


class PromptTooLongError(CodelingError):
    """A prompt that leaves no room for new tokens in the model's context."""


def code_prompt(task: Any) -> list[dict[str, str]]:
    """Return the chat prompt of a code task: one user message with the signature and docstring.

    The expected assistant response is the indented function body, which `check_solution` runs
    after the task's prompt.
    """
    return [{"role": "user", "content": f"{CODE_INSTRUCTION}\n\n{task.prompt}"}]


def body_is_complete(text: str) -> bool:
    """Return True when text has a function body followed by an unindented line."""
    return response_body(text) != text


def response_body(text: str) -> str:
    """Cut a response where the function body ends (the first unindented line)."""
    from codeling.data.code_tasks import truncate_body

    return truncate_body(text)


@torch.inference_mode()
def sample_turns(generator: Generator, prompt_ids: Sequence[int], n: int,
                 config: GenerationConfig, stop_after_body: bool = False) -> list[list[int]]:
    """Sample `n` assistant turns that continue `prompt_ids` together, as one batch.

    A row ends at `<|end_turn|>` or eos (neither is returned) or after max_new_tokens, and with
    `stop_after_body` also once it has a complete function body (a line that starts without
    indentation follows it). Other special tokens are never sampled, so a response is plain
    text. `config.seed` makes the samples repeatable.
    """
    if n < 1:
        raise CodelingError(f"number of samples must be at least 1, got {n}")
    config.validate()
    model, tokenizer = generator.model, generator.tokenizer
    context = model.config.max_seq_len
    max_new = min(config.max_new_tokens, context - len(prompt_ids))
    if max_new < 1:
        raise PromptTooLongError(f"prompt is {len(prompt_ids)} tokens but the model's context "
                                 f"is {context}; shorten the prompt")
    stops = {tokenizer.token_id("<|end_turn|>"), tokenizer.eos_id}
    banned = [index for index in range(len(SPECIAL_TOKENS)) if index not in stops]
    rng = None
    if config.seed is not None:
        rng = torch.Generator(device=generator.device).manual_seed(config.seed)
    cache = model.new_cache(n, len(prompt_ids) + max_new)
    tokens = torch.tensor([list(prompt_ids)] * n, device=generator.device)  # (n, T)
    rows: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for _ in range(max_new):
        with autocast(generator.device, generator.bf16):
            logits = model(tokens, cache)[:, -1].float()  # (n, V)
        logits[:, banned] = float("-inf")
        next_ids = sample_next(logits, config.temperature, config.top_k, config.top_p, rng)
        for row, token in enumerate(next_ids.tolist()):
            if done[row]:
                continue
            if token in stops:
                done[row] = True
                continue
            rows[row].append(token)
            if stop_after_body and body_is_complete(tokenizer.decode(rows[row])):
                done[row] = True
        if all(done):
            break
        tokens = next_ids[:, None]  # (n, 1)
    return rows


def sample_chat_responses(generator: Generator, task: Any, n: int,
                        config: GenerationConfig) -> list[str]:
    """Sample `n` chat responses to a code task; return each as a function body."""
    prompt = chat.render(code_prompt(task), generator.tokenizer)
    turns = sample_turns(generator, prompt, n, config, stop_after_body=True)
    return [response_body(generator.tokenizer.decode(turn)) for turn in turns]


def sample_completions(generator: Generator, task: Any, n: int,
                       config: GenerationConfig) -> list[str]:
    """Sample `n` plain-text continuations of a task's prompt, cut at the end of the body."""
    from codeling.data.code_tasks import STOP_SEQUENCES

    if len(generator.tokenizer.encode(task.prompt)) >= generator.model.config.max_seq_len:
        raise PromptTooLongError(f"code task {task.task_id} does not fit the model's context")
    completion_config = GenerationConfig(config.max_new_tokens, config.temperature, config.top_k,
                                         config.top_p, STOP_SEQUENCES, config.seed)
    return [response_body(text) for text in generator.complete_many(task.prompt, n,
                                                                   completion_config)]


def summarize(per_task: list[list[str]], samples: int) -> dict[str, Any]:
    """Turn the reasons of each task's samples into the mode's metrics."""
    reasons = Counter(reason for task in per_task for reason in task)
    total = sum(reasons.values())
    return {
        "tasks": len(per_task),
        "samples_per_task": samples,
        "pass_at_1": sum(task.count("passed") / len(task) for task in per_task)
        / max(len(per_task), 1),
        "solved": sum("passed" in task for task in per_task) / max(len(per_task), 1),
        "reasons": {reason: reasons.get(reason, 0) / max(total, 1) for reason in REASONS},
    }


def evaluate_execution(generator: Generator, split: str = "test", samples: int = 4,
                       temperature: float = 0.8, max_new_tokens: int = 128, limit: int = 0,
                       modes: Sequence[str] = MODES, seed: int = 0, workers: int = 2,
                       examples_kept: int = 3) -> dict[str, Any]:
    """Sample responses to the code tasks of `split` in each mode and run their tests.

    Task i samples with seed `seed + i`, so a run is repeatable and two checkpoints see the
    same random draws. Tasks whose prompt does not fit the model's context are skipped and
    counted in `skipped_too_long`.
    """
    from codeling.data.code_tasks import check_many, load_code_tasks

    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        raise CodelingError(f"execution mode {unknown[0]!r} is not one of {', '.join(MODES)}")
    tasks = load_code_tasks(split)[:limit or None]
    started = time.perf_counter()
    results: dict[str, Any] = {"split": split, "settings": {
        "samples": samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
        "seed": seed}, "modes": {}}
    for mode in modes:
        sampler = sample_chat_responses if mode == "chat" else sample_completions
        per_task, mean_fraction, examples, skipped = [], 0.0, [], 0
        for index, task in enumerate(tasks):
            config = GenerationConfig(max_new_tokens, temperature, seed=seed + index)
            try:
                responses = sampler(generator, task, samples, config)
            except PromptTooLongError:
                skipped += 1
                continue
            checks = check_many([(task, response) for response in responses], workers=workers)
            per_task.append([check.reason for check in checks])
            mean_fraction += sum(check.fraction_passed for check in checks) / len(checks)
            if len(examples) < examples_kept:
                examples.append({"task_id": task.task_id, "response": responses[0],
                                 "reason": checks[0].reason, "detail": checks[0].detail})
        summary = summarize(per_task, samples)
        summary["tests_passed"] = mean_fraction / max(len(per_task), 1)
        summary["skipped_too_long"] = skipped
        summary["examples"] = examples
        results["modes"][mode] = summary
        log.info("execution: %s mode, pass@1 %.1f%%, solved %.1f%% of %d %s tasks, asserts "
                 "held %.1f%%%s", mode, 100 * summary["pass_at_1"], 100 * summary["solved"],
                 len(per_task), split, 100 * summary["tests_passed"],
                 f" ({skipped} tasks longer than the context skipped)" if skipped else "")
    results["seconds"] = time.perf_counter() - started
    return results


def report_section(stage: str, result: dict[str, Any]) -> list[str]:
    """Lines of the report card for one stage's execution results."""
    settings = result["settings"]
    lines = [f"## Execution of sampled code ({stage})", "",
             f"Held-out code tasks ({result['split']} split), {settings['samples']} samples each "
             f"at temperature {settings['temperature']}, tests run in `codeling.sandbox`. Chat: "
             "the task as a user message, the response as the assistant's turn; completion: the "
             "bare prompt continued as text.", "",
             "| mode | tasks | pass@1 | solved | asserts held | syntax error | wrong result | "
             "timeout | other error |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, summary in result["modes"].items():
        reasons = summary["reasons"]
        lines.append(f"| {mode} | {summary['tasks']} | {100 * summary['pass_at_1']:.1f}% | "
                     f"{100 * summary['solved']:.1f}% | {100 * summary['tests_passed']:.1f}% | "
                     + " | ".join(f"{100 * reasons[name]:.1f}%" for name in REASONS[1:]) + " |")
    return lines + [""]
