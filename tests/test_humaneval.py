"""HumanEval: problem loading, the pass@k estimator, sandboxed checks and an end-to-end run."""

from __future__ import annotations

import math
import time

import pytest
import torch

from codeling import sandbox
from codeling.config import ModelConfig
from codeling.errors import CodelingError
from codeling.evaluation import humaneval
from codeling.inference.generate import Generator
from codeling.models.decoder import CodeModel


@pytest.fixture(scope="module")
def problems() -> list[dict[str, str]]:
    return humaneval.load_problems()


def _tiny_generator(tokenizer, max_seq_len: int) -> Generator:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2,
                         max_seq_len=max_seq_len)
    return Generator(CodeModel(config), tokenizer, torch.device("cpu"), bf16=False)


def test_load_problems(problems):
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert problems[-1]["task_id"] == "HumanEval/163"
    assert set(problems[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    assert [p["task_id"] for p in humaneval.load_problems(limit=3)] == [
        "HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_load_problems_rejects_bad_limit():
    with pytest.raises(CodelingError):
        humaneval.load_problems(limit=0)


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (10, 3, 1, 0.3),
    (10, 3, 10, 1.0),
    (10, 0, 1, 0.0),
    (10, 0, 10, 0.0),
    (10, 10, 1, 1.0),
    (5, 2, 2, 1 - 3 / 10),  # 1 - C(3, 2) / C(5, 2)
    (10, 3, 2, 1 - 21 / 45),  # 1 - C(7, 2) / C(10, 2)
    (10, 3, 8, 1.0),  # only 7 failures, so any 8 samples contain a pass
    (200, 1, 100, 0.5),  # 1 - C(199, 100) / C(200, 100) = 1 - 100 / 200
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomials_for_large_n():
    n, c, k = 1000, 37, 50
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert humaneval.pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("n", "c", "k"), [(0, 0, 1), (10, 11, 1), (10, -1, 1), (10, 3, 0),
                                           (10, 3, 11)])
def test_pass_at_k_rejects_invalid_counts(n, c, k):
    with pytest.raises(CodelingError):
        humaneval.pass_at_k(n, c, k)


def test_all_canonical_solutions_pass(problems):
    started = time.perf_counter()
    passed = humaneval.check_completions(
        [(problem, problem["canonical_solution"]) for problem in problems], timeout=10, workers=2)
    seconds = time.perf_counter() - started
    failed = [problem["task_id"] for problem, ok in zip(problems, passed) if not ok]
    assert failed == []
    assert seconds < 60, f"164 canonical checks took {seconds:.1f} s"


def test_wrong_completions_fail(problems):
    problem = problems[0]
    assert humaneval.check_completion(problem, problem["canonical_solution"])
    assert not humaneval.check_completion(problem, "    return None\n")
    assert not humaneval.check_completion(problem, "    return (\n")
    assert not humaneval.check_completion(problem, "    while True:\n        pass\n", timeout=1)


def test_failure_status_names_the_error(problems):
    result = humaneval.run_check(problems[0], "    return None\n")
    assert humaneval._status(result) == "failed: AssertionError"
    result = humaneval.run_check(problems[0], "    while True:\n        pass\n", timeout=1)
    assert humaneval._status(result) == "timed out"


def test_evaluate_end_to_end(problems, small_tokenizer):
    generator = _tiny_generator(small_tokenizer, max_seq_len=1024)
    result = humaneval.evaluate(generator, n_samples=2, k=(1, 2), max_new_tokens=16,
                                problems=problems[:3])
    assert result["problems"] == 3
    assert result["n_samples"] == 2
    assert result["pass_at_k"] == {"pass@1": 0.0, "pass@2": 0.0}
    assert result["passed_samples"] == 0
    assert result["prompt_too_long"] == 0
    assert result["sandbox"]["runs"] == 6
    support = sandbox.isolation_support()
    for flag in ("network_isolated", "processes_limited", "filesystem_readonly"):
        assert result["sandbox"][flag] == support[flag]
    assert result["settings"]["stop"] == list(humaneval.HUMANEVAL_STOP)
    assert 0 < result["settings"]["completion_tokens"] <= 6 * 16
    assert [entry["task_id"] for entry in result["results"]] == [
        "HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for entry in result["results"]:
        assert entry["samples"] == 2
        assert entry["passed"] == 0
        assert entry["pass_at_k"] == {"pass@1": 0.0, "pass@2": 0.0}
        assert len(entry["completions"]) == 2
        for sample in entry["completions"]:
            assert isinstance(sample["completion"], str)
            assert not any(stop in sample["completion"] for stop in humaneval.HUMANEVAL_STOP)
            assert sample["status"].startswith(("failed", "timed out"))

    again = humaneval.evaluate(generator, n_samples=2, k=(1,), max_new_tokens=16,
                               problems=problems[:3])
    completions = [[s["completion"] for s in entry["completions"]] for entry in result["results"]]
    repeated = [[s["completion"] for s in entry["completions"]] for entry in again["results"]]
    assert repeated == completions


def test_evaluate_counts_long_prompts_as_failed(problems, small_tokenizer):
    generator = _tiny_generator(small_tokenizer, max_seq_len=16)
    result = humaneval.evaluate(generator, n_samples=2, k=(1,), max_new_tokens=4,
                                problems=problems[:2])
    assert result["prompt_too_long"] == 2
    assert result["pass_at_k"] == {"pass@1": 0.0}
    assert result["sandbox"]["runs"] == 0
    assert result["results"][0]["completions"][0]["status"] == humaneval.PROMPT_TOO_LONG


def test_evaluate_rejects_k_above_samples(problems, small_tokenizer):
    generator = _tiny_generator(small_tokenizer, max_seq_len=64)
    with pytest.raises(CodelingError, match="pass@10"):
        humaneval.evaluate(generator, n_samples=2, k=(1, 10), problems=problems[:1])
