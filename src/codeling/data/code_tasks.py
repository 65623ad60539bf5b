"""Small Python programming tasks with unit tests, for rewards from execution (stage 4).

Each task is laid out like a HumanEval problem: the prompt is a function signature and a
docstring with one example, and a model completes the body. The tasks come from parameterized
templates (constants, arithmetic, predicates, strings, lists, dictionaries and short
algorithms), 293 in all (218 train, 75 test), many of them easy enough for a model of a few million
parameters. Every template has a reference solution and a separate reference function that
computes the expected test values, so a wrong solution cannot produce its own tests.

Splits: whole template families are held out for `test`, and every fifth variant of a
parameterized family (for example `add_5`) is held out too, so `test` contains new functions
and known functions with unseen constants.

`check_solution` runs prompt + completion + a test harness in `codeling.sandbox`. The harness
runs each assert of the task's `check` function on its own and reports after each one, so a
result says how many tests passed even when a later one times out.
"""

from __future__ import annotations

import json
import logging
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from codeling import sandbox
from codeling.errors import CodelingError

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]
SPLITS = ("train", "test")
# Seconds for one test program; a reference solution runs in about 0.05 s, interpreter start
# included (measured on a 2-core x86-64 machine).
DEFAULT_TIMEOUT = 5.0
CHECK_MEMORY_MB = 1024
CHECK_MAX_PROCESSES = 16
# Literal stop strings for `GenerationConfig.stop`: a new top-level statement ends the body.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
# Every HELD_OUT_EVERY-th variant of a parameterized family goes to the test split.
HELD_OUT_EVERY = 5


@dataclass(frozen=True)
class CodeTask:
    """One programming task: the prompt to complete, its tests and a reference solution.

    `tests` is HumanEval-style source that defines `check(candidate)`, one assert per line.
    `solution` is a body that completes `prompt` and passes the tests.
    """

    task_id: str
    prompt: str
    entry_point: str
    tests: str
    solution: str
    split: str

    def as_problem(self) -> dict[str, str]:
        """Return the task as a HumanEval problem dict, for `codeling.evaluation.humaneval`."""
        return {"task_id": self.task_id, "prompt": self.prompt, "entry_point": self.entry_point,
                "test": self.tests, "canonical_solution": self.solution}


Reason = Literal["passed", "syntax_error", "wrong_result", "timeout", "error"]


@dataclass(frozen=True)
class ExecResult:
    """The outcome of running one completion against its task's tests.

    `reason` is "passed", "syntax_error" (prompt + completion does not compile),
    "wrong_result" (the first failing test's assert was false), "timeout", or "error" (an
    exception, a crash, or an exit before the tests ran). `detail` is a short description of
    the first failure. `tests_passed` counts the asserts that held, out of `tests_total`.
    """

    passed: bool
    reason: Reason
    detail: str
    tests_passed: int = 0
    tests_total: int = 0

    @property
    def fraction_passed(self) -> float:
        """Return the share of asserts that held, 0.0 for a task without tests."""
        return self.tests_passed / self.tests_total if self.tests_total else 0.0


# -- building tasks from templates ---------------------------------------------------------------


@dataclass(frozen=True)
class _Template:
    """One task before rendering: the reference function computes the expected values."""

    family: str
    name: str
    params: str
    returns: str
    doc: str
    body: str
    reference: Callable[..., Any]
    cases: tuple[tuple[Any, ...], ...]


def _template(family: str, name: str, params: str, returns: str, doc: str, body: str,
              reference: Callable[..., Any], cases: Sequence[Sequence[Any]]) -> _Template:
    return _Template(family, name, params, returns, doc, body, reference,
                     tuple(tuple(case) for case in cases))


def _call(name: str, args: tuple[Any, ...]) -> str:
    return f"{name}({', '.join(repr(arg) for arg in args)})"


def _render(template: _Template, split: str) -> CodeTask:
    """Write the prompt, the tests and the solution of one task."""
    expected = [template.reference(*args) for args in template.cases]
    example = _call(template.name, template.cases[0])
    prompt = (f"def {template.name}({template.params}) -> {template.returns}:\n"
              f'    """{template.doc}\n\n'
              f"    >>> {example}\n"
              f"    {expected[0]!r}\n"
              f'    """\n')
    tests = "def check(candidate):\n" + "".join(
        f"    assert {_call('candidate', args)} == {value!r}\n"
        for args, value in zip(template.cases, expected))
    body = "".join(f"    {line}\n" if line else "\n" for line in template.body.split("\n"))
    return CodeTask(task_id=f"{template.family}/{template.name}", prompt=prompt,
                    entry_point=template.name, tests=tests, solution=body, split=split)


INTS = [(0,), (3,), (-4,), (10,), (27,)]
PAIRS = [(2, 3), (10, 4), (-5, 7), (0, 9), (12, 12)]
POSITIVE_PAIRS = [(12, 8), (7, 3), (20, 5), (9, 9), (17, 4)]
WORDS = [("hello",), ("Python",), ("a",), ("",), ("racecar",)]
SENTENCES = [("the quick brown fox",), ("hello world",), ("one",), ("  spaced  out  ",),
             ("A man a plan",)]
LISTS = [([1, 2, 3],), ([5, -2, 8, 0],), ([7],), ([4, 4, 1, 9, 2],), ([-3, -1, -7],)]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty", "thirty", "forty", "fifty",
                "sixty", "seventy", "eighty", "ninety", "hundred"]
NUMBER_VALUES = list(range(21)) + [30, 40, 50, 60, 70, 80, 90, 100]


def _constants() -> Iterator[_Template]:
    for word, value in zip(NUMBER_WORDS, NUMBER_VALUES):
        yield _template("constant", f"get_{word}", "", "int", f"Return the number {value}.",
                        f"return {value}", lambda value=value: value, [()])
    for word in ["hello", "world", "yes", "no", "python", "code", "cat", "dog", "red", "blue",
                 "green", "apple", "tree", "sun", "moon", "ok", "done", "start", "stop", "go"]:
        yield _template("constant_string", f"say_{word}", "", "str",
                        f"Return the string '{word}'.", f"return {word!r}",
                        lambda word=word: word, [()])
    yield _template("constant_bool", "always_true", "", "bool", "Return True.", "return True",
                    lambda: True, [()])
    yield _template("constant_bool", "always_false", "", "bool", "Return False.",
                    "return False", lambda: False, [()])
    yield _template("identity", "identity", "x: int", "int", "Return x unchanged.", "return x",
                    lambda x: x, INTS)


def _unary_arithmetic() -> Iterator[_Template]:
    for k in range(1, 16):
        yield _template("add_k", f"add_{k}", "x: int", "int", f"Return x plus {k}.",
                        f"return x + {k}", lambda x, k=k: x + k, INTS)
    for k in range(1, 11):
        yield _template("subtract_k", f"subtract_{k}", "x: int", "int", f"Return x minus {k}.",
                        f"return x - {k}", lambda x, k=k: x - k, INTS)
    for k in range(2, 13):
        yield _template("times_k", f"times_{k}", "x: int", "int", f"Return x multiplied by {k}.",
                        f"return x * {k}", lambda x, k=k: x * k, INTS)
    for k in range(2, 11):
        yield _template("floor_divide_k", f"divide_by_{k}", "x: int", "int",
                        f"Return x divided by {k}, rounded down to a whole number.",
                        f"return x // {k}", lambda x, k=k: x // k, INTS)
    for k in range(2, 11):
        yield _template("modulo_k", f"mod_{k}", "x: int", "int",
                        f"Return the remainder of x divided by {k}.", f"return x % {k}",
                        lambda x, k=k: x % k, INTS)
    for k in range(2, 5):
        yield _template("power_k", f"power_{k}", "x: int", "int", f"Return x to the power {k}.",
                        f"return x ** {k}", lambda x, k=k: x ** k, INTS)
    yield _template("negate", "negate", "x: int", "int", "Return x with its sign flipped.",
                    "return -x", lambda x: -x, INTS)
    yield _template("square", "square", "x: int", "int", "Return x squared.", "return x * x",
                    lambda x: x * x, INTS)
    yield _template("double", "double", "x: int", "int", "Return twice x.", "return 2 * x",
                    lambda x: 2 * x, INTS)


def _binary_arithmetic() -> Iterator[_Template]:
    operations = [
        ("add", "Return the sum of a and b.", "return a + b", lambda a, b: a + b),
        ("plus", "Return a plus b.", "return a + b", lambda a, b: a + b),
        ("subtract", "Return a minus b.", "return a - b", lambda a, b: a - b),
        ("multiply", "Return the product of a and b.", "return a * b", lambda a, b: a * b),
        ("times", "Return a times b.", "return a * b", lambda a, b: a * b),
        ("maximum", "Return the larger of a and b.", "return max(a, b)", lambda a, b: max(a, b)),
        ("minimum", "Return the smaller of a and b.", "return min(a, b)",
         lambda a, b: min(a, b)),
        ("distance", "Return the absolute difference between a and b.", "return abs(a - b)",
         lambda a, b: abs(a - b)),
        ("sum_of_squares", "Return a squared plus b squared.", "return a * a + b * b",
         lambda a, b: a * a + b * b),
        ("average", "Return the mean of a and b as a float.", "return (a + b) / 2",
         lambda a, b: (a + b) / 2),
        ("is_equal", "Return True if a equals b.", "return a == b", lambda a, b: a == b),
        ("is_greater", "Return True if a is greater than b.", "return a > b",
         lambda a, b: a > b),
    ]
    for name, doc, body, reference in operations:
        returns = "int"
        if name.startswith("is_"):
            returns = "bool"
        elif name == "average":
            returns = "float"
        yield _template("binary", name, "a: int, b: int", returns, doc, body, reference, PAIRS)
    divisions = [
        ("floor_divide", "Return a divided by b, rounded down.", "return a // b",
         lambda a, b: a // b),
        ("remainder", "Return the remainder of a divided by b.", "return a % b",
         lambda a, b: a % b),
        ("power", "Return a to the power b.", "return a ** b", lambda a, b: a ** b),
    ]
    for name, doc, body, reference in divisions:
        yield _template("binary", name, "a: int, b: int", "int", doc, body, reference,
                        POSITIVE_PAIRS)


def _predicates() -> Iterator[_Template]:
    simple = [
        ("is_even", "Return True if x is even.", "return x % 2 == 0", lambda x: x % 2 == 0),
        ("is_odd", "Return True if x is odd.", "return x % 2 == 1", lambda x: x % 2 == 1),
        ("is_positive", "Return True if x is greater than zero.", "return x > 0",
         lambda x: x > 0),
        ("is_negative", "Return True if x is less than zero.", "return x < 0", lambda x: x < 0),
        ("is_zero", "Return True if x is zero.", "return x == 0", lambda x: x == 0),
    ]
    for name, doc, body, reference in simple:
        yield _template("predicate", name, "x: int", "bool", doc, body, reference, INTS)
    for k in range(2, 12):
        yield _template("divisible_by_k", f"is_divisible_by_{k}", "x: int", "bool",
                        f"Return True if x is divisible by {k}.", f"return x % {k} == 0",
                        lambda x, k=k: x % k == 0, [(0,), (k,), (k + 1,), (3 * k,), (7,)])
    for k in [0, 1, 5, 10, 20, 50, 100]:
        yield _template("greater_than_k", f"is_greater_than_{k}", "x: int", "bool",
                        f"Return True if x is greater than {k}.", f"return x > {k}",
                        lambda x, k=k: x > k, [(k + 1,), (k,), (k - 1,), (2 * k + 3,), (-7,)])


def _strings() -> Iterator[_Template]:
    unary = [
        ("reverse_string", "Return s reversed.", "return s[::-1]", lambda s: s[::-1], "str"),
        ("to_upper", "Return s in upper case.", "return s.upper()", lambda s: s.upper(), "str"),
        ("to_lower", "Return s in lower case.", "return s.lower()", lambda s: s.lower(), "str"),
        ("string_length", "Return the number of characters in s.", "return len(s)",
         lambda s: len(s), "int"),
        ("double_string", "Return s repeated twice.", "return s + s", lambda s: s * 2, "str"),
        ("swap_case", "Return s with upper and lower case letters swapped.",
         "return s.swapcase()", lambda s: s.swapcase(), "str"),
        ("is_palindrome", "Return True if s reads the same forwards and backwards.",
         "return s == s[::-1]", lambda s: s == "".join(reversed(s)), "bool"),
        ("count_vowels", "Return how many characters of s are vowels (a, e, i, o, u, any case).",
         "return sum(1 for c in s.lower() if c in 'aeiou')",
         lambda s: len([c for c in s if c in "aeiouAEIOU"]), "int"),
        ("is_empty", "Return True if s is the empty string.", "return len(s) == 0",
         lambda s: s == "", "bool"),
        ("first_char", "Return the first character of s, or '' when s is empty.",
         "return s[:1]", lambda s: s[0] if s else "", "str"),
        ("last_char", "Return the last character of s, or '' when s is empty.",
         "return s[-1:]", lambda s: s[len(s) - 1] if s else "", "str"),
        ("capitalize_word", "Return s with its first character in upper case and the rest "
         "in lower case.", "return s.capitalize()",
         lambda s: s[:1].upper() + s[1:].lower(), "str"),
    ]
    for name, doc, body, reference, returns in unary:
        yield _template("string", name, "s: str", returns, doc, body, reference, WORDS)
    sentence = [
        ("remove_spaces", "Return s without any space characters.", "return s.replace(' ', '')",
         lambda s: "".join(c for c in s if c != " "), "str"),
        ("word_count", "Return the number of words in s, split on whitespace.",
         "return len(s.split())", lambda s: len(s.split()), "int"),
        ("first_word", "Return the first word of s, split on whitespace.",
         "return s.split()[0]", lambda s: s.split()[0], "str"),
        ("last_word", "Return the last word of s, split on whitespace.", "return s.split()[-1]",
         lambda s: s.split()[-1], "str"),
        ("strip_spaces", "Return s without leading and trailing spaces.", "return s.strip()",
         lambda s: s.strip(" "), "str"),
        ("longest_word", "Return the longest word of s; the first one on a tie.",
         "return max(s.split(), key=len)",
         lambda s: sorted(s.split(), key=lambda w: -len(w))[0], "str"),
    ]
    for name, doc, body, reference, returns in sentence:
        yield _template("sentence", name, "s: str", returns, doc, body, reference, SENTENCES)
    for k in range(2, 7):
        yield _template("repeat_k", f"repeat_{k}", "s: str", "str",
                        f"Return s repeated {k} times.", f"return s * {k}",
                        lambda s, k=k: "".join([s] * k), WORDS)
    for prefix in ["re", "un", "pre", "Mr. ", "x", "__", ">> "]:
        name = "add_prefix_" + "".join(c for c in prefix if c.isalpha()).lower()
        if prefix == "__":
            name = "add_prefix_underscores"
        elif prefix == ">> ":
            name = "add_prefix_arrows"
        yield _template("add_prefix", name, "s: str", "str",
                        f"Return s with {prefix!r} added at the front.",
                        f"return {prefix!r} + s", lambda s, p=prefix: p + s, WORDS)
    for suffix in ["s", "ing", "ed", "!", ".py"]:
        name = "add_suffix_" + ("".join(c for c in suffix if c.isalpha()) or "bang")
        yield _template("add_suffix", name, "s: str", "str",
                        f"Return s with {suffix!r} added at the end.",
                        f"return s + {suffix!r}", lambda s, x=suffix: s + x, WORDS)
    for letter in "aeost":
        yield _template("count_char", f"count_{letter}", "s: str", "int",
                        f"Return how many times the letter {letter!r} occurs in s.",
                        f"return s.count({letter!r})",
                        lambda s, c=letter: sum(1 for x in s if x == c),
                        [("banana",), ("test case",), ("",), ("seasons",), ("total",)])
    for k in range(1, 6):
        yield _template("first_k_chars", f"first_{k}_chars", "s: str", "str",
                        f"Return the first {k} characters of s (all of s if it is shorter).",
                        f"return s[:{k}]", lambda s, k=k: s[:k], WORDS)
    for k in range(1, 5):
        yield _template("drop_k_chars", f"drop_first_{k}_chars", "s: str", "str",
                        f"Return s without its first {k} characters.", f"return s[{k}:]",
                        lambda s, k=k: s[k:], WORDS)
    for prefix in ["a", "he", "py", "re", "the"]:
        yield _template("starts_with", f"starts_with_{prefix}", "s: str", "bool",
                        f"Return True if s starts with {prefix!r}.",
                        f"return s.startswith({prefix!r})",
                        lambda s, p=prefix: s[:len(p)] == p,
                        [(prefix + "llo",), ("hello",), ("",), ("python",), ("apple",)])
    pair = [
        ("concat", "Return a followed by b.", "return a + b", lambda a, b: a + b, "str"),
        ("join_with_space", "Return a and b joined by one space.", "return a + ' ' + b",
         lambda a, b: f"{a} {b}", "str"),
        ("same_length", "Return True if a and b have the same length.",
         "return len(a) == len(b)", lambda a, b: len(a) == len(b), "bool"),
        ("contains", "Return True if b occurs inside a.", "return b in a",
         lambda a, b: a.find(b) >= 0, "bool"),
        ("count_occurrences", "Return how many non-overlapping times b occurs in a.",
         "return a.count(b)", lambda a, b: a.count(b), "int"),
    ]
    for name, doc, body, reference, returns in pair:
        yield _template("string_pair", name, "a: str, b: str", returns, doc, body, reference,
                        [("hello", "lo"), ("abcabc", "bc"), ("cat", "dog"), ("aaaa", "aa"),
                         ("x", "xyz")])


def _lists() -> Iterator[_Template]:
    unary = [
        ("list_sum", "Return the sum of the numbers in xs.", "return sum(xs)", "int",
         lambda xs: sum(xs)),
        ("list_max", "Return the largest number in xs.", "return max(xs)", "int",
         lambda xs: sorted(xs)[-1]),
        ("list_min", "Return the smallest number in xs.", "return min(xs)", "int",
         lambda xs: sorted(xs)[0]),
        ("list_length", "Return the number of items in xs.", "return len(xs)", "int",
         lambda xs: len(xs)),
        ("first_item", "Return the first item of xs.", "return xs[0]", "int", lambda xs: xs[0]),
        ("last_item", "Return the last item of xs.", "return xs[-1]", "int",
         lambda xs: xs[len(xs) - 1]),
        ("reverse_list", "Return the items of xs in reverse order.", "return xs[::-1]",
         "list[int]", lambda xs: list(reversed(xs))),
        ("sort_list", "Return the items of xs sorted from smallest to largest.",
         "return sorted(xs)", "list[int]", lambda xs: sorted(xs)),
        ("sort_descending", "Return the items of xs sorted from largest to smallest.",
         "return sorted(xs, reverse=True)", "list[int]", lambda xs: sorted(xs)[::-1]),
        ("count_evens", "Return how many numbers in xs are even.",
         "return sum(1 for x in xs if x % 2 == 0)", "int",
         lambda xs: len([x for x in xs if x % 2 == 0])),
        ("keep_evens", "Return the even numbers of xs, in order.",
         "return [x for x in xs if x % 2 == 0]", "list[int]",
         lambda xs: list(filter(lambda x: x % 2 == 0, xs))),
        ("keep_odds", "Return the odd numbers of xs, in order.",
         "return [x for x in xs if x % 2 == 1]", "list[int]",
         lambda xs: list(filter(lambda x: x % 2 != 0, xs))),
        ("keep_positive", "Return the numbers of xs that are greater than zero, in order.",
         "return [x for x in xs if x > 0]", "list[int]",
         lambda xs: list(filter(lambda x: x > 0, xs))),
        ("count_positive", "Return how many numbers in xs are greater than zero.",
         "return sum(1 for x in xs if x > 0)", "int", lambda xs: len([x for x in xs if x > 0])),
        ("square_all", "Return a list of the squares of the numbers in xs.",
         "return [x * x for x in xs]", "list[int]", lambda xs: list(map(lambda x: x ** 2, xs))),
        ("double_all", "Return a list with every number of xs doubled.",
         "return [2 * x for x in xs]", "list[int]", lambda xs: list(map(lambda x: x + x, xs))),
        ("list_product", "Return the product of the numbers in xs.",
         "result = 1\nfor x in xs:\n    result *= x\nreturn result", "int",
         lambda xs: eval("*".join(f"({x})" for x in xs))),
        ("list_mean", "Return the mean of the numbers in xs as a float.",
         "return sum(xs) / len(xs)", "float", lambda xs: sum(xs) / len(xs)),
        ("index_of_max", "Return the index of the largest number in xs; the first on a tie.",
         "return xs.index(max(xs))", "int",
         lambda xs: min(i for i, x in enumerate(xs) if x == sorted(xs)[-1])),
        ("unique_in_order", "Return the items of xs without repeats, in first-seen order.",
         "seen = []\nfor x in xs:\n    if x not in seen:\n        seen.append(x)\nreturn seen",
         "list[int]", lambda xs: list(dict.fromkeys(xs))),
        ("sum_of_squares_list", "Return the sum of the squares of the numbers in xs.",
         "return sum(x * x for x in xs)", "int", lambda xs: sum(map(lambda x: x ** 2, xs))),
        ("running_total", "Return the running totals of xs: item i is the sum of xs[:i + 1].",
         "total = 0\nresult = []\nfor x in xs:\n    total += x\n    result.append(total)\n"
         "return result", "list[int]", lambda xs: [sum(xs[:i + 1]) for i in range(len(xs))]),
        ("all_positive", "Return True if every number in xs is greater than zero.",
         "return all(x > 0 for x in xs)", "bool", lambda xs: min(xs) > 0),
        ("any_negative", "Return True if some number in xs is less than zero.",
         "return any(x < 0 for x in xs)", "bool", lambda xs: min(xs) < 0),
        ("is_sorted", "Return True if xs is sorted from smallest to largest.",
         "return xs == sorted(xs)", "bool",
         lambda xs: all(a <= b for a, b in zip(xs, xs[1:]))),
    ]
    for name, doc, body, returns, reference in unary:
        yield _template("list", name, "xs: list[int]", returns, doc, body, reference, LISTS)
    for k in range(1, 9):
        yield _template("add_k_to_all", f"add_{k}_to_all", "xs: list[int]", "list[int]",
                        f"Return a list with {k} added to every number of xs.",
                        f"return [x + {k} for x in xs]",
                        lambda xs, k=k: list(map(lambda x: x + k, xs)), LISTS)
    for k in range(2, 7):
        yield _template("multiply_all_by_k", f"multiply_all_by_{k}", "xs: list[int]",
                        "list[int]", f"Return a list with every number of xs multiplied by {k}.",
                        f"return [x * {k} for x in xs]",
                        lambda xs, k=k: list(map(lambda x: x * k, xs)), LISTS)
    for k in range(1, 5):
        yield _template("take_k", f"take_first_{k}", "xs: list[int]", "list[int]",
                        f"Return the first {k} items of xs (all of them if there are fewer).",
                        f"return xs[:{k}]", lambda xs, k=k: list(xs)[:k], LISTS)
    for k in range(1, 5):
        yield _template("range_k", f"range_from_{k}", "n: int", "list[int]",
                        f"Return the numbers from {k} up to and including n, in order.",
                        f"return list(range({k}, n + 1))",
                        lambda n, k=k: [i for i in range(k, n + 1)],
                        [(k + 3,), (k,), (k - 1,), (10,), (k + 1,)])
    pair = [
        ("contains_value", "xs: list[int], x: int", "bool", "Return True if x is in xs.",
         "return x in xs", lambda xs, x: any(y == x for y in xs)),
        ("count_value", "xs: list[int], x: int", "int", "Return how many times x occurs in xs.",
         "return xs.count(x)", lambda xs, x: len([y for y in xs if y == x])),
        ("add_to_all", "xs: list[int], x: int", "list[int]",
         "Return a list with x added to every number of xs.", "return [y + x for y in xs]",
         lambda xs, x: list(map(lambda y: y + x, xs))),
    ]
    for name, params, returns, doc, body, reference in pair:
        yield _template("list_value", name, params, returns, doc, body, reference,
                        [([1, 2, 3], 2), ([4, 4, 1], 4), ([], 5), ([7, -1], 0), ([3], 3)])
    yield _template("list_pair", "pairwise_sum", "xs: list[int], ys: list[int]", "list[int]",
                    "Return the sums of the items of xs and ys at the same positions.",
                    "return [x + y for x, y in zip(xs, ys)]",
                    lambda xs, ys: [xs[i] + ys[i] for i in range(min(len(xs), len(ys)))],
                    [([1, 2], [3, 4]), ([0], [5]), ([], []), ([-1, 2, 3], [1, 1, 1]),
                     ([10, 20], [1, 2])])
    yield _template("list_pair", "flatten", "xss: list[list[int]]", "list[int]",
                    "Return the items of the inner lists of xss in one flat list.",
                    "return [x for xs in xss for x in xs]",
                    lambda xss: sum(xss, []),
                    [([[1, 2], [3]],), ([],), ([[], [4]],), ([[5], [6], [7, 8]],),
                     ([[0, 0]],)])


def _dicts() -> Iterator[_Template]:
    yield _template("dict", "get_or_zero", "d: dict[str, int], key: str", "int",
                    "Return d[key], or 0 when key is not in d.", "return d.get(key, 0)",
                    lambda d, key: d[key] if key in d else 0,
                    [({"a": 1}, "a"), ({"a": 1}, "b"), ({}, "x"), ({"x": 5, "y": 6}, "y"),
                     ({"k": -2}, "k")])
    yield _template("dict", "has_key", "d: dict[str, int], key: str", "bool",
                    "Return True if key is in d.", "return key in d",
                    lambda d, key: key in d.keys(),
                    [({"a": 1}, "a"), ({"a": 1}, "b"), ({}, "x"), ({"x": 5, "y": 6}, "y"),
                     ({"k": -2}, "z")])
    dict_cases = [({"a": 1, "b": 2},), ({},), ({"x": 5},), ({"c": 3, "a": 9, "b": 0},),
                  ({"z": -1, "y": -2},)]
    yield _template("dict", "sum_values", "d: dict[str, int]", "int",
                    "Return the sum of the values of d.", "return sum(d.values())",
                    lambda d: sum(d[key] for key in d), dict_cases)
    yield _template("dict", "sorted_keys", "d: dict[str, int]", "list[str]",
                    "Return the keys of d in sorted order.", "return sorted(d)",
                    lambda d: sorted(d.keys()), dict_cases)
    yield _template("dict", "invert_dict", "d: dict[str, int]", "dict[int, str]",
                    "Return a dict that maps each value of d to its key.",
                    "return {value: key for key, value in d.items()}",
                    lambda d: dict(zip(d.values(), d.keys())), dict_cases)
    yield _template("dict", "count_letters", "s: str", "dict[str, int]",
                    "Return a dict that maps each character of s to how often it occurs.",
                    "counts = {}\nfor c in s:\n    counts[c] = counts.get(c, 0) + 1\n"
                    "return counts", lambda s: {c: s.count(c) for c in s}, WORDS)
    yield _template("dict", "word_lengths", "s: str", "dict[str, int]",
                    "Return a dict that maps each word of s to its length.",
                    "return {word: len(word) for word in s.split()}",
                    lambda s: dict((w, len(w)) for w in s.split()), SENTENCES)
    yield _template("dict", "squares_dict", "n: int", "dict[int, int]",
                    "Return a dict that maps each i from 1 to n to i squared.",
                    "return {i: i * i for i in range(1, n + 1)}",
                    lambda n: dict((i, i ** 2) for i in range(1, n + 1)),
                    [(3,), (0,), (1,), (5,), (2,)])
    yield _template("dict", "dict_from_lists", "keys: list[str], values: list[int]",
                    "dict[str, int]", "Return a dict that maps keys[i] to values[i].",
                    "return dict(zip(keys, values))",
                    lambda keys, values: {keys[i]: values[i] for i in range(len(keys))},
                    [(["a", "b"], [1, 2]), ([], []), (["x"], [9]), (["p", "q", "r"], [0, 1, 2]),
                     (["k"], [-5])])
    yield _template("dict", "merge_dicts", "a: dict[str, int], b: dict[str, int]",
                    "dict[str, int]",
                    "Return one dict with the items of a and b; b wins on shared keys.",
                    "return {**a, **b}", lambda a, b: dict(list(a.items()) + list(b.items())),
                    [({"a": 1}, {"b": 2}), ({}, {}), ({"x": 1}, {"x": 2}),
                     ({"p": 0, "q": 1}, {"r": 2}), ({"k": 3}, {})])
    yield _template("dict", "key_of_max_value", "d: dict[str, int]", "str",
                    "Return the key of d with the largest value; the first on a tie.",
                    "return max(d, key=d.get)",
                    lambda d: [k for k in d if d[k] == max(d.values())][0],
                    [({"a": 1, "b": 2},), ({"x": 5},), ({"c": 3, "a": 9, "b": 0},),
                     ({"z": -1, "y": -2},), ({"p": 4, "q": 4},)])


def _algorithms() -> Iterator[_Template]:
    def fibonacci(n: int) -> int:
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a

    def gcd(a: int, b: int) -> int:
        return max(d for d in range(1, max(a, b) + 1) if a % d == 0 and b % d == 0)

    def collatz_steps(n: int) -> int:
        steps = 0
        while n != 1:
            n = 3 * n + 1 if n % 2 else n // 2
            steps += 1
        return steps

    small = [(0,), (1,), (5,), (7,), (10,)]
    positive = [(1,), (6,), (12,), (27,), (97,)]
    single = [
        ("factorial", "n: int", "int", "Return n factorial (n! = 1 * 2 * ... * n, and 0! = 1).",
         "result = 1\nfor i in range(2, n + 1):\n    result *= i\nreturn result",
         lambda n: eval("*".join(str(i) for i in range(1, n + 1)) or "1"), small),
        ("fibonacci", "n: int", "int",
         "Return the n-th Fibonacci number, where fibonacci(0) = 0 and fibonacci(1) = 1.",
         "a, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nreturn a", fibonacci, small),
        ("sum_to_n", "n: int", "int", "Return the sum 1 + 2 + ... + n.",
         "return n * (n + 1) // 2", lambda n: sum(range(n + 1)), small),
        ("triangle_number", "n: int", "int",
         "Return the number of dots in a triangle with n rows (1 + 2 + ... + n).",
         "return sum(range(n + 1))", lambda n: n * (n + 1) // 2, small),
        ("count_digits", "n: int", "int", "Return how many decimal digits the whole number n "
         "has, ignoring its sign.", "return len(str(abs(n)))", lambda n: len(repr(abs(n))),
         [(0,), (7,), (42,), (-123,), (100000,)]),
        ("sum_digits", "n: int", "int", "Return the sum of the decimal digits of n >= 0.",
         "return sum(int(d) for d in str(n))",
         lambda n: 0 if n == 0 else n % 10 + sum(int(d) for d in str(n // 10)),
         [(0,), (7,), (42,), (123,), (9999,)]),
        ("is_prime", "n: int", "bool", "Return True if n is a prime number.",
         "if n < 2:\n    return False\nfor d in range(2, int(n ** 0.5) + 1):\n"
         "    if n % d == 0:\n        return False\nreturn True",
         lambda n: n > 1 and all(n % d for d in range(2, n)), positive),
        ("to_binary", "n: int", "str", "Return n >= 0 written in base 2, without a prefix.",
         "return bin(n)[2:]", lambda n: format(n, "b"), [(0,), (1,), (5,), (8,), (255,)]),
        ("absolute_value", "x: int", "int", "Return the absolute value of x.",
         "return abs(x)", lambda x: x if x >= 0 else -x, INTS),
        ("sign", "x: int", "int", "Return 1 if x is positive, -1 if it is negative and 0 if "
         "it is zero.", "if x > 0:\n    return 1\nif x < 0:\n    return -1\nreturn 0",
         lambda x: (x > 0) - (x < 0), INTS),
        ("fizzbuzz", "n: int", "str", "Return 'FizzBuzz' if n is divisible by 15, 'Fizz' if "
         "by 3, 'Buzz' if by 5, and str(n) otherwise.",
         "if n % 15 == 0:\n    return 'FizzBuzz'\nif n % 3 == 0:\n    return 'Fizz'\n"
         "if n % 5 == 0:\n    return 'Buzz'\nreturn str(n)",
         lambda n: ("Fizz" * (n % 3 == 0) + "Buzz" * (n % 5 == 0)) or str(n),
         [(3,), (5,), (15,), (7,), (30,)]),
        ("is_leap_year", "year: int", "bool", "Return True if year is a leap year in the "
         "Gregorian calendar.", "return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)",
         lambda year: (year % 400 == 0) or (year % 4 == 0 and year % 100 != 0),
         [(2024,), (1900,), (2000,), (2023,), (1996,)]),
        ("collatz_steps", "n: int", "int", "Return how many Collatz steps (n -> n / 2 if even, "
         "else 3n + 1) it takes n >= 1 to reach 1.",
         "steps = 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
         "    steps += 1\nreturn steps", collatz_steps, positive),
        ("digital_root", "n: int", "int", "Repeatedly sum the decimal digits of n >= 0 until "
         "one digit is left, and return it.",
         "while n >= 10:\n    n = sum(int(d) for d in str(n))\nreturn n",
         lambda n: 0 if n == 0 else 1 + (n - 1) % 9, [(0,), (7,), (38,), (9999,), (123456,)]),
    ]
    for name, params, returns, doc, body, reference, cases in single:
        yield _template("algorithm", name, params, returns, doc, body, reference, cases)
    pair = [
        ("gcd", "Return the greatest common divisor of a > 0 and b > 0.",
         "while b:\n    a, b = b, a % b\nreturn a", gcd),
        ("lcm", "Return the least common multiple of a > 0 and b > 0.",
         "x, y = a, b\nwhile y:\n    x, y = y, x % y\nreturn a * b // x",
         lambda a, b: a * b // gcd(a, b)),
    ]
    for name, doc, body, reference in pair:
        yield _template("algorithm", name, "a: int, b: int", "int", doc, body, reference,
                        POSITIVE_PAIRS)
    yield _template("algorithm", "clamp", "x: int, low: int, high: int", "int",
                    "Return x limited to the range from low to high.",
                    "return max(low, min(x, high))",
                    lambda x, low, high: low if x < low else high if x > high else x,
                    [(5, 0, 10), (-3, 0, 10), (15, 0, 10), (0, 0, 0), (7, 7, 9)])
    yield _template("algorithm", "is_anagram", "a: str, b: str", "bool",
                    "Return True if a and b contain the same letters the same number of times.",
                    "return sorted(a) == sorted(b)",
                    lambda a, b: {c: a.count(c) for c in a} == {c: b.count(c) for c in b},
                    [("listen", "silent"), ("abc", "abd"), ("", ""), ("aab", "aba"),
                     ("a", "aa")])
    for k in range(1, 6):
        yield _template("caesar_k", f"caesar_shift_{k}", "s: str", "str",
                        f"Shift each lower-case letter of s {k} places forward in the alphabet, "
                        "wrapping from z to a, and keep other characters.",
                        f"return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' "
                        "else c for c in s)",
                        lambda s, k=k: "".join(
                            "abcdefghijklmnopqrstuvwxyz"["abcdefghijklmnopqrstuvwxyz".index(c)
                                                         + k - 26]
                            if c.islower() and c.isascii() else c for c in s),
                        [("abc",), ("xyz",), ("hello world",), ("",), ("Zz!",)])


# Families whose tasks are all in the test split: new functions the training tasks never ask for.
HELD_OUT_FAMILIES = frozenset({"caesar_k", "range_k", "starts_with", "list_pair"})
# Single tasks from mixed families that are held out as well.
HELD_OUT_TASKS = frozenset({
    "algorithm/is_anagram", "algorithm/digital_root", "algorithm/collatz_steps",
    "algorithm/lcm", "algorithm/is_leap_year", "list/sort_descending", "list/running_total",
    "list/index_of_max", "string/capitalize_word", "string/count_vowels",
    "sentence/longest_word", "string_pair/count_occurrences", "dict/key_of_max_value",
    "dict/merge_dicts", "binary/distance", "predicate/is_zero",
})
_FAMILY_BUILDERS = (_constants, _unary_arithmetic, _binary_arithmetic, _predicates, _strings,
                    _lists, _dicts, _algorithms)


def _split_of(template: _Template, variant: int) -> str:
    """Assign a task to a split: held-out families and tasks, then every fifth variant."""
    task_id = f"{template.family}/{template.name}"
    if template.family in HELD_OUT_FAMILIES or task_id in HELD_OUT_TASKS:
        return "test"
    return "test" if variant % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "train"


def _all_tasks() -> list[CodeTask]:
    tasks: list[CodeTask] = []
    variants: dict[str, int] = {}
    for builder in _FAMILY_BUILDERS:
        for template in builder():
            variant = variants.get(template.family, 0)
            variants[template.family] = variant + 1
            tasks.append(_render(template, _split_of(template, variant)))
    ids = [task.task_id for task in tasks]
    duplicates = sorted({task_id for task_id in ids if ids.count(task_id) > 1})
    if duplicates:
        raise RuntimeError(f"duplicate code task ids from the templates: {duplicates}")
    return tasks


def load_code_tasks(split: str) -> list[CodeTask]:
    """Return the tasks of one split ("train" or "test"), in the same order on every call."""
    if split not in SPLITS:
        raise CodelingError(f"code task split must be one of {', '.join(SPLITS)}, got {split!r}")
    return [task for task in _all_tasks() if task.split == split]


# -- running completions against the tests ---------------------------------------------------------

# Appended after prompt + completion. It runs each statement of check() on its own, so one
# failure does not hide the others, and prints one line per statement that starts with a
# random marker. A completion that exits early (sys.exit(0), os._exit(0)) prints no marker
# line and so cannot pass.
# NOTE: the marker is in the program text, so code that reads its own source could forge it.
_HARNESS = '''

def _codeling_run_tests(candidate, source, marker):
    import ast as ast_module
    import json as json_module
    import sys as sys_module
    tree = ast_module.parse(source)
    check = [node for node in tree.body if isinstance(node, ast_module.FunctionDef)][0]
    passed = 0
    for number, statement in enumerate(check.body, 1):
        line = ast_module.get_source_segment(source, statement)
        code = compile(ast_module.Module(body=[statement], type_ignores=[]), "<tests>", "exec")
        outcome, detail = "passed", ""
        try:
            exec(code, {"candidate": candidate})
            passed += 1
        except AssertionError:
            outcome, detail = "wrong_result", line
            if isinstance(statement.test, ast_module.Compare):
                expression = ast_module.Expression(statement.test.left)
                try:
                    got = eval(compile(expression, "<tests>", "eval"), {"candidate": candidate})
                    detail = line + " (got " + repr(got)[:200] + ")"
                except Exception:
                    pass
        except Exception as error:
            outcome = "error"
            detail = line + ": " + type(error).__name__ + ": " + str(error)[:200]
        report = {"number": number, "outcome": outcome, "detail": detail, "passed": passed,
                  "total": len(check.body)}
        sys_module.stdout.write("\\n" + marker + json_module.dumps(report) + "\\n")
        sys_module.stdout.flush()


_codeling_run_tests({entry_point}, {tests!r}, {marker!r})
'''


def build_program(task: CodeTask, completion: str, marker: str) -> str:
    """Join the prompt, the completion and the test harness into one Python program."""
    harness = (_HARNESS.replace("{entry_point}", task.entry_point)
               .replace("{tests!r}", repr(task.tests)).replace("{marker!r}", repr(marker)))
    return f"{task.prompt}{completion}\n{harness}"


def _syntax_error(task: CodeTask, completion: str) -> str | None:
    """Compile prompt + completion without running it; return the error text or None."""
    try:
        with warnings.catch_warnings():
            # Suspicious but valid code, such as `1(2)`, fails when it runs, not here.
            warnings.simplefilter("ignore", SyntaxWarning)
            compile(task.prompt + completion, "<completion>", "exec")
    except (SyntaxError, ValueError) as error:  # ValueError: the source contains a NUL byte
        line = getattr(error, "lineno", None)
        return f"{type(error).__name__}: {getattr(error, 'msg', error)}" + (
            f" (line {line})" if line else "")
    return None


def check_solution(task: CodeTask, completion: str, timeout: float = DEFAULT_TIMEOUT
                   ) -> ExecResult:
    """Run a completion of `task.prompt` against the task's tests in the sandbox.

    A completion that does not compile is rejected without starting a sandbox.
    """
    total = task.tests.count("\n    assert ")
    syntax = _syntax_error(task, completion)
    if syntax is not None:
        return ExecResult(False, "syntax_error", syntax, 0, total)
    marker = f"@codeling-test-{secrets.token_hex(8)}@"
    result = sandbox.run_python(build_program(task, completion, marker), timeout=timeout,
                                memory_mb=CHECK_MEMORY_MB, max_processes=CHECK_MAX_PROCESSES)
    reports = [json.loads(line[len(marker):]) for line in result.stdout.splitlines()
               if line.startswith(marker)]
    return _classify(result, reports, total)


def _classify(result: sandbox.SandboxResult, reports: list[dict[str, Any]], total: int
              ) -> ExecResult:
    passed = reports[-1]["passed"] if reports else 0
    if result.timed_out or result.killed_by == "SIGXCPU":
        number = len(reports) + 1
        return ExecResult(False, "timeout", f"test {number} of {total} did not finish in time",
                          passed, total)
    failures = [report for report in reports if report["outcome"] != "passed"]
    if failures:
        first = failures[0]
        return ExecResult(False, first["outcome"], first["detail"], passed, total)
    if len(reports) == total and result.returncode == 0:
        return ExecResult(True, "passed", "", passed, total)
    lines = result.stderr.strip().splitlines()
    detail = lines[-1][:300] if lines else (
        f"the program exited with status {result.returncode} before the tests finished")
    if result.killed_by:
        detail = f"killed by {result.killed_by}: {detail}"
    return ExecResult(False, "error", detail, passed, total)


def check_many(pairs: Sequence[tuple[CodeTask, str]], timeout: float = DEFAULT_TIMEOUT,
               workers: int = 2) -> list[ExecResult]:
    """Check (task, completion) pairs in up to `workers` sandboxes at once; keep the order."""
    if workers < 1:
        raise CodelingError(f"workers must be at least 1, got {workers}")
    if workers == 1 or len(pairs) < 2:
        return [check_solution(task, completion, timeout) for task, completion in pairs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(check_solution, task, completion, timeout)
                   for task, completion in pairs]
        return [future.result() for future in futures]


def truncate_body(completion: str) -> str:
    """Cut a completion where the function body ends: at the first unindented, non-empty line."""
    for index, character in enumerate(completion):
        if character == "\n" and index + 1 < len(completion):
            following = completion[index + 1]
            if not following.isspace():
                return completion[:index + 1]
    return completion
