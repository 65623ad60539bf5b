"""Code tasks: the task library, its splits, and execution of completions in the sandbox."""

from __future__ import annotations

import pytest

from codeling.data import code_tasks
from codeling.data.code_tasks import CodeTask, check_many, check_solution, load_code_tasks
from codeling.errors import CodelingError
from codeling.evaluation import humaneval


@pytest.fixture(scope="module")
def all_tasks() -> list[CodeTask]:
    return load_code_tasks("train") + load_code_tasks("test")


@pytest.fixture(scope="module")
def add_task() -> CodeTask:
    return next(task for task in load_code_tasks("train") if task.entry_point == "add")


def test_tasks_count_and_splits(all_tasks: list[CodeTask]) -> None:
    train, test = load_code_tasks("train"), load_code_tasks("test")
    assert len(train) >= 200
    assert len(test) >= 50
    assert all(task.split == "train" for task in train)
    assert all(task.split == "test" for task in test)
    ids = [task.task_id for task in all_tasks]
    assert len(set(ids)) == len(ids)
    assert not {task.prompt for task in train} & {task.prompt for task in test}


def test_tasks_deterministic() -> None:
    assert load_code_tasks("train") == load_code_tasks("train")
    assert load_code_tasks("test") == load_code_tasks("test")


def test_test_split_holds_out_constants_and_families() -> None:
    train_ids = {task.task_id for task in load_code_tasks("train")}
    test_ids = {task.task_id for task in load_code_tasks("test")}
    assert "add_k/add_5" in test_ids  # the fifth variant of a parameterized family
    assert "add_k/add_4" in train_ids
    assert "caesar_k/caesar_shift_1" in test_ids  # a family held out as a whole
    assert not any(task_id.startswith("caesar_k/") for task_id in train_ids)


def test_unknown_split_rejected() -> None:
    with pytest.raises(CodelingError, match="validation"):
        load_code_tasks("validation")


def test_prompt_layout(add_task: CodeTask) -> None:
    assert add_task.prompt.startswith("def add(a: int, b: int) -> int:\n")
    assert ">>> add(2, 3)\n    5\n" in add_task.prompt
    assert add_task.prompt.endswith('    """\n')
    assert add_task.solution == "    return a + b\n"
    assert add_task.tests.startswith("def check(candidate):\n")
    assert add_task.tests.count("\n    assert ") == 5


def test_every_reference_solution_passes_in_process(all_tasks: list[CodeTask]) -> None:
    # The references are this module's own code, so running them here is safe and fast; the
    # sandbox path is checked on a sample below.
    failures = []
    for task in all_tasks:
        namespace: dict = {}
        try:
            exec(task.prompt + task.solution + "\n" + task.tests, namespace)
            namespace["check"](namespace[task.entry_point])
        except Exception as error:
            failures.append(f"{task.task_id}: {type(error).__name__} {error}")
    assert failures == []


def test_reference_solutions_pass_in_sandbox(all_tasks: list[CodeTask]) -> None:
    # One task per family keeps the test to a few seconds.
    sample = list({task.task_id.split("/")[0]: task for task in all_tasks}.values())
    assert len(sample) >= 30
    results = check_many([(task, task.solution) for task in sample])
    failed = [(task.task_id, result) for task, result in zip(sample, results)
              if not result.passed]
    assert failed == []
    assert all(result.reason == "passed" for result in results)
    assert all(result.tests_passed == result.tests_total > 0 for result in results)


def test_syntax_error_reason(add_task: CodeTask) -> None:
    result = check_solution(add_task, "    return a +\n")
    assert not result.passed
    assert result.reason == "syntax_error"
    assert "SyntaxError" in result.detail


def test_indentation_error_is_syntax_error(add_task: CodeTask) -> None:
    assert check_solution(add_task, "return a + b\n").reason == "syntax_error"


def test_wrong_result_reason(add_task: CodeTask) -> None:
    result = check_solution(add_task, "    return a - b\n")
    assert not result.passed
    assert result.reason == "wrong_result"
    assert "candidate(2, 3) == 5" in result.detail
    assert "got -1" in result.detail


def test_partial_credit_counts_passing_asserts(add_task: CodeTask) -> None:
    # Right only for the cases (10, 4) -> 14 and (12, 12) -> 24.
    result = check_solution(add_task, "    return 14 if a == 10 else 24\n")
    assert result.reason == "wrong_result"
    assert result.tests_passed == 2
    assert result.tests_total == 5
    assert result.fraction_passed == pytest.approx(0.4)


def test_infinite_loop_times_out(add_task: CodeTask) -> None:
    result = check_solution(add_task, "    while True:\n        pass\n", timeout=1.0)
    assert not result.passed
    assert result.reason == "timeout"


def test_exception_is_error(add_task: CodeTask) -> None:
    result = check_solution(add_task, "    return a // 0\n")
    assert result.reason == "error"
    assert "ZeroDivisionError" in result.detail


def test_early_exit_does_not_pass(add_task: CodeTask) -> None:
    for completion in ["    return a + b\nimport sys\nsys.exit(0)\n",
                       "    return a + b\nimport os\nos._exit(0)\n"]:
        result = check_solution(add_task, completion)
        assert not result.passed
        assert result.reason == "error"


def test_error_at_import_is_error(add_task: CodeTask) -> None:
    result = check_solution(add_task, "    return a + b\nundefined_name\n")
    assert result.reason == "error"
    assert "NameError" in result.detail


def test_check_many_keeps_order(add_task: CodeTask) -> None:
    completions = ["    return a + b\n", "    return a * b\n", "    return a +\n",
                   "    return b + a\n"]
    results = check_many([(add_task, completion) for completion in completions], workers=2)
    assert [result.reason for result in results] == ["passed", "wrong_result", "syntax_error",
                                                    "passed"]


def test_as_problem_runs_in_humaneval(add_task: CodeTask) -> None:
    problem = add_task.as_problem()
    assert humaneval.check_completion(problem, add_task.solution)
    assert not humaneval.check_completion(problem, "    return a - b\n")


def test_truncate_body() -> None:
    assert code_tasks.truncate_body("    return 1\n\ndef other():\n    pass\n") == (
        "    return 1\n\n")
    assert code_tasks.truncate_body("    x = 1\n    return x\n") == "    x = 1\n    return x\n"
    assert code_tasks.truncate_body("    return 1\nprint(2)") == "    return 1\n"
    assert code_tasks.truncate_body("    return 1") == "    return 1"
