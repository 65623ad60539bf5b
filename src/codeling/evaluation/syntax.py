"""Syntax validity of sampled completions: the share of prompt + completion that parses.

Python is parsed in this process with `ast.parse`, which builds a syntax tree and never runs
the code. Bash is checked with `bash -n` (read commands without executing them) inside
`codeling.sandbox`, because the shell is an outside program.
"""

from __future__ import annotations

import ast
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from codeling import sandbox
from codeling.errors import CodelingError
from codeling.inference.generate import GenerationConfig, Generator

LANGUAGES = ("python", "bash")
# Longer sources count as invalid without parsing, so one huge sample cannot stall the check.
MAX_SOURCE_CHARS = 200_000
BASH_TIMEOUT = 5.0
BASH_MEMORY_MB = 256
BASH_MAX_PROCESSES = 8


def python_syntax_ok(source: str, max_chars: int = MAX_SOURCE_CHARS) -> bool:
    """Return True when `ast.parse` accepts the source.

    Sources longer than `max_chars` and nesting too deep for the parser (RecursionError or
    MemoryError) count as invalid. Syntax warnings, such as invalid escape sequences, are
    silenced and do not make a source invalid.
    """
    if len(source) > max_chars:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        # ValueError: source code containing null bytes.
        return False
    return True


def bash_syntax_ok(script: str, timeout: float = BASH_TIMEOUT,
                   max_chars: int = MAX_SOURCE_CHARS) -> bool:
    """Return True when `bash -n` reads the script without a syntax error.

    The check runs in the sandbox. A timeout, or a script longer than `max_chars`, counts as
    invalid.
    """
    if len(script) > max_chars:
        return False
    result = sandbox.run(["bash", "-n", sandbox.BASH_MAIN], files={sandbox.BASH_MAIN: script},
                         timeout=timeout, memory_mb=BASH_MEMORY_MB,
                         max_processes=BASH_MAX_PROCESSES)
    return result.ok


def syntax_ok(language: str, source: str) -> bool:
    """Check one source in a language from LANGUAGES."""
    if language == "python":
        return python_syntax_ok(source)
    if language == "bash":
        return bash_syntax_ok(source)
    raise CodelingError(f"unknown language {language!r}; use one of {', '.join(LANGUAGES)}")


def syntax_validity(generator: Generator, prompts: Sequence[tuple[str, str]],
                    n_samples: int = 4, temperature: float = 0.8, top_p: float = 0.95,
                    max_new_tokens: int = 128, stop: Sequence[str] = (), seed: int | None = 0,
                    workers: int = 2) -> dict[str, Any]:
    """Sample completions for (language, prompt) pairs and report the valid share per language.

    Each sample is checked as prompt + completion. A completion cut off by `max_new_tokens`
    usually ends mid-statement and counts as invalid, so pass `stop` strings that end a
    completion at a statement boundary to measure syntax rather than length. Sample j of
    prompt i uses seed `seed + i * n_samples + j`. Bash checks run in up to `workers` sandboxes
    while the model samples.
    """
    for language, _ in prompts:
        if language not in LANGUAGES:
            raise CodelingError(f"unknown language {language!r}; use one of "
                                f"{', '.join(LANGUAGES)}")
    if n_samples < 1:
        raise CodelingError(f"n_samples must be at least 1, got {n_samples}")
    if workers < 1:
        raise CodelingError(f"workers must be at least 1, got {workers}")
    _check_prompt_lengths(generator, prompts)
    base = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=tuple(stop))
    base.validate()
    started = time.perf_counter()

    entries = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for index, (language, prompt) in enumerate(prompts):
            checks: list[tuple[str, bool | Future]] = []
            for sample in range(n_samples):
                sample_seed = None if seed is None else seed + index * n_samples + sample
                completion = generator.complete(prompt, replace(base, seed=sample_seed))
                source = prompt + completion
                if language == "python":
                    checks.append((completion, python_syntax_ok(source)))
                else:
                    checks.append((completion, pool.submit(bash_syntax_ok, source)))
            entries.append((language, prompt, checks))
        results = [{
            "language": language,
            "prompt": prompt,
            "completions": [{"completion": completion,
                             "valid": check.result() if isinstance(check, Future) else check}
                            for completion, check in checks],
        } for language, prompt, checks in entries]

    for entry in results:
        entry["valid"] = sum(item["valid"] for item in entry["completions"])
        entry["samples"] = n_samples
    return {
        "rates": _rates(results),
        "n_samples": n_samples,
        "settings": {"temperature": temperature, "top_p": top_p,
                     "max_new_tokens": max_new_tokens, "stop": list(stop), "seed": seed},
        "seconds": round(time.perf_counter() - started, 3),
        "results": results,
    }


def _check_prompt_lengths(generator: Generator, prompts: Sequence[tuple[str, str]]) -> None:
    limit = generator.model.config.max_seq_len
    for index, (language, prompt) in enumerate(prompts):
        length = len(generator.tokenizer.encode(prompt))
        if length >= limit:
            raise CodelingError(f"{language} prompt {index} is {length} tokens but the model's "
                                f"context is {limit}; shorten the prompt")


def _rates(results: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Return samples, valid count and valid share for each language and for all together."""
    totals: dict[str, list[int]] = {}
    for entry in results:
        for key in (entry["language"], "all"):
            counts = totals.setdefault(key, [0, 0])
            counts[0] += entry["samples"]
            counts[1] += entry["valid"]
    return {key: {"samples": samples, "valid": valid, "rate": valid / samples}
            for key, (samples, valid) in totals.items()}
