"""Synthetic function-calling conversations for stage 3, written by `codeling data tools`.

Every example lists 2 to 6 tools in its system turn: the ones the request needs plus random
distractors. Five kinds of example, mixed in `KIND_SHARES` proportions:

- `single_call`: the user asks for one thing and the assistant calls one tool;
- `parallel_calls`: the user asks for two or three things at once and the assistant makes all
  the calls in one turn, sometimes followed by the results and a combined answer;
- `multi_turn`: call, tool result and a final answer that uses the result, sometimes followed by
  a second request or a thank-you;
- `no_tool`: greetings and general or coding questions, answered in text although tools are
  listed;
- `clarify`: the request leaves out a required argument, so the assistant asks for it instead of
  calling; sometimes the user answers and the assistant then calls.

The splits: `train` and `val` use the seen tools and the training phrasings; `test_seen` uses
the seen tools with evaluation-only phrasings (user templates, no-tool questions, connectors and
follow-up answers that never occur in training); `test_unseen` calls only the held-out tools,
which never occur in the other splits, not even as distractors. Records name the user templates
they used in "templates", and the manifest lists every evaluation-only template id.

The same seed gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from codeling.data.sources import iter_json_lines
from codeling.data.tool_schemas import TOOLS, TOOLS_BY_NAME, Template, ToolDef, text_of
from codeling.errors import CodelingError

FORMAT = "codeling-tool-conversations"
FORMAT_VERSION = 1

KINDS = ("single_call", "parallel_calls", "multi_turn", "no_tool", "clarify")
KIND_SHARES = {"single_call": 0.40, "parallel_calls": 0.10, "multi_turn": 0.20, "no_tool": 0.15,
               "clarify": 0.15}
# Tools kept out of train, val and test_seen entirely, even as distractors. They mix developer
# and everyday tools, and none of them is builtin.
HELD_OUT_TOOLS = ("git_log", "lint_file", "set_reminder", "define_word", "get_stock_price")
SPLITS = ("train", "val", "test_seen", "test_unseen")
# Training conversations of the `tool-conversations` source and `codeling data tools`.
DEFAULT_TOOL_EXAMPLES = 100000
# Specs built once and shared by the records, which are only serialized, never changed.
_SPECS = {tool.name: tool.spec() for tool in TOOLS}

# Listed tools per example and their weights. Few tools keep most examples under about 400
# tokens with a 4096-token vocabulary, because every listed schema is part of the prompt.
TOOL_COUNT_WEIGHTS = {2: 60, 3: 22, 4: 10, 5: 5, 6: 3}

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are codeling, a small coding assistant. Call a tool when it helps.",
    "You are a helpful assistant with access to the tools below.",
    "Answer the user. Use a tool only when you need one.",
    "You are an assistant that can call functions.",
    "You are a concise assistant for developers.",
)

# User phrasings shared by all tools: (id, text). The "e" ids are evaluation-only.
# Training joins requests in many ways, so that the model learns to spot a second request
# rather than a few joining words. No training connector contains an evaluation connector's words.
CONNECTORS = (("connector/t0", "{a} {b}"), ("connector/t1", "{a} Also, {b_lower}"),
              ("connector/t2", "{a}\n{b}"), ("connector/t3", "{a} And {b_lower}"),
              ("connector/t4", "{a} Then {b_lower}"), ("connector/t5", "{a} Next, {b_lower}"),
              ("connector/t6", "{a} Oh, and {b_lower}"),
              ("connector/t7", "{a} Additionally, {b_lower}"),
              ("connector/t8", "{a} On top of that, {b_lower}"),
              ("connector/t9", "{a} Besides that, {b_lower}"),
              ("connector/t10", "{a} In addition, {b_lower}"),
              ("connector/t11", "{a} One more thing: {b_lower}"),
              ("connector/t12", "{a}\n\n{b}"), ("connector/t13", "{a} Also: {b}"),
              ("connector/t14", "{a} And also {b_lower}"),
              ("connector/t15", "{a} Another thing: {b_lower}"))
EVAL_CONNECTORS = (("connector/e0", "{a} Plus, {b_lower}"),
                   ("connector/e1", "{a} After that, {b_lower}"))
FOLLOW_UPS = (("follow_up/t0", "{value}"), ("follow_up/t1", "{value}, please."),
              ("follow_up/t2", "Use {value}."))
EVAL_FOLLOW_UPS = (("follow_up/e0", "It's {value}."), ("follow_up/e1", "Let's go with {value}."))
BLOCK_FOLLOW_UPS = (("follow_up/t3", "{value}"), ("follow_up/t4", "Here:\n{value}"))
EVAL_BLOCK_FOLLOW_UPS = (("follow_up/e2", "Here it is:\n{value}"),)
# Training requests only: a share of them get an opener, a closer or a casual form (first
# letter lowercase, no final period), so that words around a request do not decide the tool.
OPENERS = ("Hey, ", "Hi! ", "Hello. ", "OK, ", "Quick one: ", "Hmm, ", "Sorry to bother you. ",
           "Hi there. ")
CLOSERS = (" Thanks!", " Thank you.", " Thanks in advance.", " Cheers.", " Thanks a lot.")
# Sentences of context put before a training request, so that a second sentence does not read as
# a second request. None of them names or hints at a tool.
CONTEXTS = ("I'm working on a side project. ", "This is for work. ", "Busy day today. ",
            "I have a few minutes before a meeting. ", "No rush on this. ",
            "I'm still new to all this. ", "Something came up. ",
            "I'm trying to get organized. ", "My manager asked me about this. ",
            "Let's keep going. ", "Different topic now. ", "Here's what I need. ")
DRESS_SHARES = {"opener": 0.12, "closer": 0.12, "casual": 0.1, "context": 0.1}
THANKS = (("thanks/t0", "Thanks!"), ("thanks/t1", "Great, thank you."),
          ("thanks/t2", "Perfect, thanks."))
EVAL_THANKS = (("thanks/e0", "Thank you, that helps."),)
WELCOMES = ("You're welcome!", "Glad I could help.", "Anytime!", "Happy to help.")

# Questions that need no tool, by category. Every fourth item of a category is evaluation-only.
NO_TOOL_ITEMS: dict[str, tuple[tuple[str, str], ...]] = {
    "chat": (
        ("Hi!", "Hello! How can I help you today?"),
        ("Hello there.", "Hi! What can I do for you?"),
        ("Good morning!", "Good morning! What are you working on today?"),
        ("Hey, how are you?", "I'm doing well, thanks for asking. How can I help?"),
        ("Thanks for the help earlier.",
         "You're welcome! Let me know if you need anything else."),
        ("Who are you?", "I'm codeling, a small assistant for code and everyday tasks. I can "
         "also call the tools listed in this chat."),
        ("What can you do?", "I can answer questions, write and explain code, and use the tools "
         "listed in this chat, for example to run code or read files."),
        ("Bye!", "Goodbye! Have a nice day."),
        ("Good night.", "Good night! Talk to you soon."),
        ("Are you a human?", "No, I'm an AI assistant called codeling."),
        ("Nice to meet you.", "Nice to meet you too! How can I help?"),
        ("Can you hear me?", "Yes, I can read your messages. What do you need?"),
    ),
    "python": (
        ("What is a list comprehension in Python?",
         "A list comprehension builds a list from an iterable in one expression: "
         "`[x * x for x in range(5)]` gives `[0, 1, 4, 9, 16]`."),
        ("What's the difference between a list and a tuple?",
         "A list is mutable, so you can change its items. A tuple is immutable, which is why "
         "tuples can be dictionary keys."),
        ("What does `__init__` do in a Python class?",
         "`__init__` is the initializer. Python calls it right after creating an instance, so it "
         "is where you set the instance's attributes."),
        ("What is a decorator?",
         "A decorator is a function that takes a function and returns a new one, usually "
         "wrapping it with extra behavior. You apply it with `@name` above a `def`."),
        ("What is the GIL?",
         "The global interpreter lock lets only one thread run Python bytecode at a time in "
         "CPython, so threads help with I/O-bound work but not with CPU-bound work."),
        ("What does `yield` do?",
         "`yield` turns a function into a generator. Each `yield` hands one value to the caller "
         "and pauses the function until the next value is requested."),
        ("When should I use a dictionary?",
         "Use a dictionary when you look values up by a key, such as a name or an id. Lookups "
         "take constant time on average."),
        ("What is a virtual environment?",
         "An isolated Python environment for one project. Create one with `python -m venv .venv` "
         "and activate it before installing packages."),
        ("What is the difference between `==` and `is`?",
         "`==` compares values, while `is` checks whether two names refer to the same object. "
         "Use `is` only for singletons such as `None`."),
        ("What are type hints?",
         "Annotations of the expected types, as in `def add(a: int, b: int) -> int`. Python does "
         "not enforce them at run time, but tools such as mypy check them."),
        ("What is recursion?",
         "Recursion is when a function calls itself on a smaller part of the problem until it "
         "reaches a base case that it can answer directly."),
        ("What does `*args` mean in a function definition?",
         "`*args` collects any extra positional arguments into a tuple, so the function accepts "
         "a variable number of them."),
        ("What is a lambda in Python?",
         "A small anonymous function written as one expression, for example `lambda x: x + 1`."),
        ("What does big O notation mean?",
         "Big O describes how the running time or memory of an algorithm grows with the input "
         "size, ignoring constant factors. A linear search is O(n)."),
        ("What is JSON?",
         "JSON is a text format for data: objects, arrays, strings, numbers, booleans and null. "
         "Python reads and writes it with the `json` module."),
        ("What is an exception?",
         "An exception signals an error at run time. You handle one with `try` and `except`; "
         "an unhandled exception stops the program with a traceback."),
    ),
    "shell": (
        ("What does the command `ls -la` do?",
         "`ls -la` lists every file in the current directory, hidden ones included, with "
         "permissions, owner, size and date."),
        ("What does `git rebase` do?",
         "`git rebase` replays your commits on top of another branch, so the history stays "
         "linear instead of getting a merge commit."),
        ("What does `chmod +x script.sh` do?",
         "It makes `script.sh` executable, so you can run it as `./script.sh`."),
        ("What does `grep -r` do?",
         "`grep -r PATTERN DIR` searches every file under DIR and prints the lines that match "
         "PATTERN."),
        ("What is the difference between `git pull` and `git fetch`?",
         "`git fetch` downloads new commits without changing your branch. `git pull` fetches "
         "and then merges them into your current branch."),
        ("What does `pwd` stand for?",
         "Print working directory: it shows the full path of the directory you are in."),
        ("What does `2>&1` mean in a shell command?",
         "It sends standard error (file descriptor 2) to wherever standard output "
         "(descriptor 1) goes, so both streams end up in the same place."),
        ("What does `set -e` do in a bash script?",
         "`set -e` makes the script exit as soon as a command fails, instead of carrying on."),
    ),
    "howto": (
        ("How do I reverse a string in Python?",
         "Use slicing with a step of -1:\n```python\ntext[::-1]\n```"),
        ("How do I read a file line by line in Python?",
         "Loop over the file object inside a `with` block:\n```python\nwith open(path) as f:\n"
         "    for line in f:\n        print(line.rstrip())\n```"),
        ("How can I sort a list of dictionaries by a key?",
         "Pass a key function to `sorted`:\n```python\nsorted(rows, key=lambda row: "
         "row[\"age\"])\n```"),
        ("How do I check if a key exists in a dictionary?",
         "Use the `in` operator: `if key in data:`. To get a default instead, use "
         "`data.get(key, default)`."),
        ("How do I remove duplicates from a list but keep the order?",
         "A dict keeps insertion order, so `list(dict.fromkeys(items))` does it."),
        ("How do I get today's date in Python?",
         "Use the datetime module:\n```python\nfrom datetime import date\nprint(date.today())\n"
         "```"),
        ("How do I loop over files in a bash script?",
         "Use a for loop over a glob:\n```bash\nfor file in *.txt; do\n    echo \"$file\"\n"
         "done\n```"),
        ("How do I undo the last git commit but keep the changes?",
         "Run `git reset --soft HEAD~1`. The commit is gone and its changes stay staged."),
        ("How do I create a new git branch?",
         "Run `git switch -c NAME`, or `git checkout -b NAME` with older versions of git."),
        ("How do I merge two dictionaries in Python?",
         "Since Python 3.9, `a | b` does it, and the values of `b` win for keys in both. Before "
         "that, write `{**a, **b}`."),
        ("How do I format a float with two decimals?",
         "Use an f-string: `f\"{value:.2f}\"`."),
        ("How do I count the words in a string?",
         "Split it on whitespace and take the length: `len(text.split())`."),
    ),
    "write": (
        ("Write a Python function that checks if a number is even.",
         "```python\ndef is_even(n):\n    return n % 2 == 0\n```"),
        ("Write a function that returns the largest of three numbers.",
         "```python\ndef largest(a, b, c):\n    return max(a, b, c)\n```"),
        ("Write a Python function to compute a factorial.",
         "```python\ndef factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n"
         "        result *= i\n    return result\n```"),
        ("Write a function that checks whether a string is a palindrome.",
         "```python\ndef is_palindrome(text):\n    return text == text[::-1]\n```"),
        ("Write a Python function that counts the vowels in a string.",
         "```python\ndef count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in "
         "\"aeiou\")\n```"),
        ("Write a function that flattens a list of lists.",
         "```python\ndef flatten(lists):\n    return [item for inner in lists for item in "
         "inner]\n```"),
        ("Write a Python function that converts Celsius to Fahrenheit.",
         "```python\ndef to_fahrenheit(celsius):\n    return celsius * 9 / 5 + 32\n```"),
        ("Write a function that returns the n-th Fibonacci number.",
         "```python\ndef fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"
         "        a, b = b, a + b\n    return a\n```"),
        ("Write a bash command that counts the lines of all Python files.",
         "```bash\nfind . -name '*.py' -exec cat {} + | wc -l\n```"),
    ),
    "general": (
        ("What does HTTP stand for?",
         "Hypertext Transfer Protocol, the protocol that browsers and web servers use to "
         "exchange pages and data."),
        ("What is the capital of France?", "The capital of France is Paris."),
        ("How many days are in a leap year?", "A leap year has 366 days."),
        ("What is an API?",
         "An application programming interface: a defined way for programs to talk to each "
         "other, such as the functions of a library or the endpoints of a web service."),
        ("Can you suggest a name for my cat?", "How about Pixel, Miso or Biscuit?"),
        ("Tell me a joke.", "Why do programmers prefer dark mode? Because light attracts bugs."),
        ("What is the boiling point of water?",
         "At sea level, water boils at 100 °C (212 °F)."),
        ("What is machine learning?",
         "A way to build programs that learn patterns from data instead of following "
         "hand-written rules."),
        ("Give me a tip for writing readable code.",
         "Choose names that say what a value is or what a function does, and keep functions "
         "short enough to read on one screen."),
        ("What is the difference between RAM and disk storage?",
         "RAM is fast memory that loses its contents when the power goes off. Disk storage is "
         "slower but keeps data permanently."),
    ),
}


def _no_tool_pool(evaluation: bool | None) -> list[tuple[str, str, str]]:
    """(template id, question, answer) items; evaluation=None returns all of them."""
    pool = []
    for category, items in NO_TOOL_ITEMS.items():
        for index, (question, answer) in enumerate(items):
            held_out = index % 4 == 3
            if evaluation is None or held_out == evaluation:
                pool.append((f"no_tool/{category}/{index}", question, answer))
    return pool


def held_out_template_ids() -> list[str]:
    """Return the ids of every user phrasing that occurs only in the evaluation splits."""
    ids = [template.id for tool in TOOLS for template in tool.eval_requests + tool.eval_vague]
    ids += [item[0] for item in _no_tool_pool(evaluation=True)]
    for pool in (EVAL_CONNECTORS, EVAL_FOLLOW_UPS, EVAL_BLOCK_FOLLOW_UPS, EVAL_THANKS):
        ids += [template_id for template_id, _ in pool]
    return sorted(ids)


# -- one example -----------------------------------------------------------------------------


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:] if text[:1].isupper() and text[1:2].islower() else text


def _call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _calls_message(calls: list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": calls}


class _ExampleWriter:
    """Builds the examples of one split from its tool pools, phrasing pool and random stream.

    `phrasing` is "train" (training templates), "eval" (evaluation-only templates) or "all".
    """

    def __init__(self, rng: random.Random, targets: Sequence[ToolDef],
                 distractors: Sequence[ToolDef], phrasing: str):
        self.rng = rng
        self.targets = list(targets)
        self.distractors = list(distractors)
        self.phrasing = phrasing
        self.clarifiable = [tool for tool in self.targets if self._vague(tool)]
        self.repeatable = [tool for tool in self.targets
                           if any(param.required for param in tool.params)]

    # Pools by phrasing.

    def _pick(self, train: Sequence[Any], evaluation: Sequence[Any]) -> Any:
        pool = {"train": train, "eval": evaluation, "all": tuple(train) + tuple(evaluation)}
        return self.rng.choice(pool[self.phrasing])

    def _requests(self, tool: ToolDef) -> tuple[Template, ...]:
        return {"train": tool.requests, "eval": tool.eval_requests,
                "all": tool.requests + tool.eval_requests}[self.phrasing]

    def _vague(self, tool: ToolDef) -> tuple[Template, ...]:
        return {"train": tool.vague, "eval": tool.eval_vague,
                "all": tool.vague + tool.eval_vague}[self.phrasing]

    # Building blocks.

    def _request(self, tool: ToolDef, template: Template | None = None
                 ) -> tuple[Template, str, dict[str, Any]]:
        """Return (template, user text, call) for one request to `tool`."""
        template = (template or self.rng.choice(self._requests(tool))).expand(self.rng)
        values = tool.sample_values(self.rng)
        text = template.text.format(**{name: text_of(values[name]) for name in template.fields})
        if self.phrasing == "train":
            text = self._dress(template, text)
        return template, text, _call(tool.name, tool.arguments(template, values))

    def _dress(self, template: Template, text: str) -> str:
        """Vary a training request: a greeting, a thank-you, no capital or a context sentence."""
        draw = self.rng.random()
        bounds = itertools.accumulate(DRESS_SHARES.values())
        dress = next((name for name, bound in zip(DRESS_SHARES, bounds) if draw < bound), None)
        if dress == "opener":
            opener = self.rng.choice(OPENERS)
            lower = opener.endswith((", ", ": ")) and template.starts_with_text
            text = opener + (_lower_first(text) if lower else text)
        elif dress == "closer":
            text += self.rng.choice(CLOSERS)
        elif dress == "casual" and template.starts_with_text and "\n" not in text:
            text = _lower_first(text)
            if template.text.endswith("."):  # the template's period, not a value's
                text = text.removesuffix(".")
        elif dress == "context":
            text = self.rng.choice(CONTEXTS) + text
        return text

    def _results(self, calls: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
        """Simulated tool messages, one per call, and the answer sentence of each result."""
        messages, answers = [], []
        for call in calls:
            function = call["function"]
            result, answer = TOOLS_BY_NAME[function["name"]].respond(function["arguments"],
                                                                     self.rng)
            messages.append({"role": "tool", "content": result})
            answers.append(answer)
        return messages, answers

    def _exchange(self, tool: ToolDef) -> tuple[list[dict[str, Any]], list[str]]:
        """Request, call, result and final answer; returns (messages, template ids)."""
        template, text, call = self._request(tool)
        results, answers = self._results([call])
        messages = [{"role": "user", "content": text}, _calls_message([call]), *results,
                    {"role": "assistant", "content": answers[0]}]
        return messages, [template.id]

    # The five kinds: each returns (messages after the system turn, tools used, template ids).

    def single_call(self) -> tuple[list[dict[str, Any]], list[ToolDef], list[str]]:
        tool = self.rng.choice(self.targets)
        template, text, call = self._request(tool)
        return [{"role": "user", "content": text}, _calls_message([call])], [tool], [template.id]

    def parallel_calls(self) -> tuple[list[dict[str, Any]], list[ToolDef], list[str]]:
        count = 3 if self.rng.random() < 0.2 else 2
        if self.rng.random() < 0.3:
            # The same tool twice or three times: one with a required argument to vary.
            tools = [self.rng.choice(self.repeatable)] * count
        else:
            tools = self.rng.sample(self.targets, count)
        texts, calls, ids = [], [], []
        for tool in tools:
            for _ in range(20):  # repeated tools need different arguments
                template, text, call = self._request(tool)
                if call not in calls:
                    break
            texts.append((template, text))
            calls.append(call)
            ids.append(template.id)
        connector_id, connector = self._pick(CONNECTORS, EVAL_CONNECTORS)
        user = texts[0][1]
        for template, text in texts[1:]:
            lowered = _lower_first(text) if template.starts_with_text else text
            user = connector.format(a=user, b=text, b_lower=lowered)
        messages = [{"role": "user", "content": user}, _calls_message(calls)]
        if self.rng.random() < 0.4:
            results, answers = self._results(calls)
            messages += [*results, {"role": "assistant", "content": "\n".join(answers)}]
        return messages, list(dict.fromkeys(tools)), ids + [connector_id]

    def multi_turn(self) -> tuple[list[dict[str, Any]], list[ToolDef], list[str]]:
        tool = self.rng.choice(self.targets)
        messages, ids = self._exchange(tool)
        tools = [tool]
        tail = self.rng.random()
        if tail < 0.25:
            second = self.rng.choice(self.targets)
            more, more_ids = self._exchange(second)
            messages += more
            ids += more_ids
            tools.append(second)
        elif tail < 0.45:
            thanks_id, thanks = self._pick(THANKS, EVAL_THANKS)
            messages += [{"role": "user", "content": thanks},
                         {"role": "assistant", "content": self.rng.choice(WELCOMES)}]
            ids.append(thanks_id)
        return messages, list(dict.fromkeys(tools)), ids

    def no_tool(self) -> tuple[list[dict[str, Any]], list[ToolDef], list[str]]:
        evaluation = {"train": False, "eval": True, "all": None}[self.phrasing]
        template_id, question, answer = self.rng.choice(_no_tool_pool(evaluation))
        # One target keeps held-out tools in the test_unseen listings of this kind too.
        tools = [self.rng.choice(self.targets)]
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": answer}]
        return messages, tools, [template_id]

    def clarify(self) -> tuple[list[dict[str, Any]], list[ToolDef], list[str]]:
        tool = self.rng.choice(self.clarifiable)
        template = self.rng.choice(self._vague(tool)).expand(self.rng)
        missing = tool.param(tool.missing(template)[0])
        values = tool.sample_values(self.rng)
        text = template.text.format(**{name: text_of(values[name]) for name in template.fields})
        messages = [{"role": "user", "content": text},
                    {"role": "assistant", "content": self.rng.choice(missing.ask)}]
        ids = [template.id]
        if self.rng.random() < 0.5:
            value = text_of(values[missing.name])
            if "\n" in value:
                follow_id, follow = self._pick(BLOCK_FOLLOW_UPS, EVAL_BLOCK_FOLLOW_UPS)
            else:
                follow_id, follow = self._pick(FOLLOW_UPS, EVAL_FOLLOW_UPS)
            arguments = tool.arguments(template, values, extra=(missing.name,))
            messages += [{"role": "user", "content": follow.format(value=value)},
                         _calls_message([_call(tool.name, arguments)])]
            ids.append(follow_id)
        return messages, [tool], ids

    # The whole record.

    def _listing(self, needed: list[ToolDef]) -> list[dict[str, Any]]:
        counts, weights = zip(*TOOL_COUNT_WEIGHTS.items())
        count = max(self.rng.choices(counts, weights)[0], len(needed))
        others = [tool for tool in self.distractors if tool not in needed]
        listed = needed + self.rng.sample(others, min(count - len(needed), len(others)))
        self.rng.shuffle(listed)
        return [_SPECS[tool.name] for tool in listed]

    def example(self, kind: str) -> dict[str, Any]:
        """Build one record of `kind`, without its id."""
        messages, needed, template_ids = getattr(self, kind)()
        system = {"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)}
        return {"kind": kind, "tools": self._listing(needed), "messages": [system, *messages],
                "templates": template_ids}


# -- splits, files and the manifest ----------------------------------------------------------


def _kind_sequence(count: int, rng: random.Random) -> list[str]:
    """`count` kinds in KIND_SHARES proportions (largest remainder rounding), shuffled."""
    exact = {kind: count * share for kind, share in KIND_SHARES.items()}
    counts = {kind: int(value) for kind, value in exact.items()}
    by_remainder = sorted(KINDS, key=lambda kind: (counts[kind] - exact[kind], KINDS.index(kind)))
    for kind in by_remainder[:count - sum(counts.values())]:
        counts[kind] += 1
    kinds = [kind for kind in KINDS for _ in range(counts[kind])]
    rng.shuffle(kinds)
    return kinds


def _split_rng(seed: int, split: str) -> random.Random:
    digest = hashlib.sha256(f"{FORMAT}:{seed}:{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _record_key(record: dict[str, Any]) -> str:
    names = [tool["function"]["name"] for tool in record["tools"]]
    return json.dumps([names, record["messages"]], ensure_ascii=False, sort_keys=True)


def iter_records(split: str, count: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Yield the `count` conversations of a split one at a time, as the files would contain them.

    For "train" these equal the train.jsonl of `generate_tool_dataset` with the same seed and
    count; the other splits leave out the check against training examples.
    """
    if split not in SPLITS:
        raise CodelingError(f"unknown split {split!r}; use train, val, test_seen or test_unseen")
    return _iter_split(split, count, seed)


def _iter_split(split: str, count: int, seed: int,
                exclude: set[str] | None = None) -> Iterator[dict[str, Any]]:
    seen = [tool for tool in TOOLS if tool.name not in HELD_OUT_TOOLS]
    held_out = [TOOLS_BY_NAME[name] for name in HELD_OUT_TOOLS]
    if split == "test_unseen":
        writer = _ExampleWriter(_split_rng(seed, split), held_out, TOOLS, "all")
    else:
        writer = _ExampleWriter(_split_rng(seed, split), seen, seen,
                                "eval" if split == "test_seen" else "train")
    for index, kind in enumerate(_kind_sequence(count, writer.rng), 1):
        for _ in range(100):
            record = writer.example(kind)
            if exclude is None or _record_key(record) not in exclude:
                break
        else:
            raise RuntimeError(f"could not draw a {kind} example for {split} that differs from "
                               "every training example")
        yield {"id": f"{split}-{index:06d}", **record}


def _split_summary(records: list[dict[str, Any]], data: bytes, phrasing: str,
                   file_name: str) -> dict[str, Any]:
    kinds = Counter(record["kind"] for record in records)
    called = {call["function"]["name"] for record in records for message in record["messages"]
              for call in message.get("tool_calls", [])}
    listed = {tool["function"]["name"] for record in records for tool in record["tools"]}
    return {"file": file_name, "examples": len(records),
            "kinds": {kind: kinds.get(kind, 0) for kind in KINDS},
            "called_tools": sorted(called), "listed_tools": sorted(listed),
            "phrasings": phrasing, "sha256": hashlib.sha256(data).hexdigest()}


def _check_counts(counts: dict[str, int]) -> None:
    for split, count in counts.items():
        name = "test_examples" if split.startswith("test") else f"{split}_examples"
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise CodelingError(f"invalid {name} (--{name.replace('_', '-')}): {count!r}; give "
                                "a positive integer")


def generate_tool_dataset(out_dir: str | Path, seed: int = 0,
                          train_examples: int = DEFAULT_TOOL_EXAMPLES, val_examples: int = 500,
                          test_examples: int = 300) -> dict[str, Any]:
    """Write train.jsonl, val.jsonl, test_seen.jsonl, test_unseen.jsonl and manifest.json.

    `test_examples` is the size of each test split. Raises CodelingError when `out_dir` exists
    and is not empty. The files are written to a temporary directory next to `out_dir` and
    renamed into place, so `out_dir` is either complete or absent.
    """
    out_dir = Path(out_dir)
    counts = {"train": train_examples, "val": val_examples, "test_seen": test_examples,
              "test_unseen": test_examples}
    _check_counts(counts)
    if out_dir.exists() and not out_dir.is_dir():
        raise CodelingError(f"--out {str(out_dir)!r} is a file; choose a directory path")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CodelingError(f"output directory {out_dir} already exists and is not empty; "
                            "choose a new --out directory or delete this one")

    train = list(_iter_split("train", train_examples, seed))
    train_keys = {_record_key(record) for record in train}
    splits = {"train": train}
    for split in ("val", "test_seen", "test_unseen"):
        splits[split] = list(_iter_split(split, counts[split], seed, exclude=train_keys))

    phrasings = {"train": "train", "val": "train", "test_seen": "eval", "test_unseen": "all"}
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "seed": seed, "counts": counts,
        "kind_shares": KIND_SHARES,
        "seen_tools": sorted(tool.name for tool in TOOLS if tool.name not in HELD_OUT_TOOLS),
        "held_out_tools": sorted(HELD_OUT_TOOLS),
        "held_out_templates": held_out_template_ids(), "splits": {}}

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as error:
        raise CodelingError(f"cannot create --out {str(out_dir)!r}: "
                            f"{error.strerror or error}; choose a writable directory path"
                            ) from None
    try:
        for split, records in splits.items():
            data = "".join(json.dumps(record, ensure_ascii=False) + "\n"
                           for record in records).encode("utf-8")
            (staging / f"{split}.jsonl").write_bytes(data)
            manifest["splits"][split] = _split_summary(records, data, phrasings[split],
                                                       f"{split}.jsonl")
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n",
                                               encoding="utf-8")
        os.chmod(staging, 0o755)
        os.rename(staging, out_dir)  # replaces an empty out_dir
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def format_summary(manifest: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Describe each split in one line: file, example count and the count of each kind."""
    lines = []
    for split, summary in manifest["splits"].items():
        kinds = ", ".join(f"{kind} {count}" for kind, count in summary["kinds"].items())
        lines.append(f"{Path(out_dir) / summary['file']}: {summary['examples']} examples "
                     f"({kinds}); {len(summary['called_tools'])} tools called")
    return lines


# -- reading ---------------------------------------------------------------------------------


def _check_call(call: Any, listed: set[str]) -> str | None:
    if not isinstance(call, dict) or call.get("type") != "function":
        return 'each tool call must be {"type": "function", "function": {...}}'
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return "a tool call has no function name"
    if not isinstance(function.get("arguments"), dict):
        return f"the arguments of the call to {function['name']} are not a JSON object"
    if function["name"] not in listed:
        return f"the call to {function['name']} names a tool that the record does not list"
    return None


def _check_message(message: Any, position: int, listed: set[str]) -> str | None:
    if not isinstance(message, dict):
        return f"message {position} is not an object"
    role = message.get("role")
    allowed = {"role", "content", "tool_calls"} if role == "assistant" else {"role", "content"}
    if role not in ("system", "user", "assistant", "tool"):
        return f"message {position} has an invalid role {role!r}"
    if role == "system" and position != 0:
        return f"message {position} is a system message; only the first message may be one"
    if not isinstance(message.get("content"), str):
        return f"message {position} ({role}) has no string content"
    if set(message) - allowed:
        return f"message {position} ({role}) has unexpected fields {sorted(set(message) - allowed)}"
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list) or not calls:
            return f"message {position} has tool_calls that is not a non-empty list"
        for call in calls:
            problem = _check_call(call, listed)
            if problem:
                return f"message {position}: {problem}"
    return None


def _check_tool_results(messages: list[dict[str, Any]]) -> str | None:
    """Check that an assistant turn with n calls is followed by n tool messages or ends the list."""
    expected = 0
    for position, message in enumerate(messages):
        if message["role"] == "tool":
            if expected == 0:
                return f"message {position} is a tool result without a pending tool call"
            expected -= 1
            continue
        if expected:
            return f"message {position}: {expected} tool result(s) missing before it"
        if message.get("tool_calls"):
            expected = len(message["tool_calls"])
    return None


def check_record(record: Any) -> str | None:
    """Return what is wrong with one conversation record, or None when it is valid."""
    if not isinstance(record, dict):
        return "the record is not a JSON object"

    for key in ("id", "kind", "tools", "messages"):
        if key not in record:
            return f"missing field {key!r}"
    if not isinstance(record["id"], str):
        return "id is not a string"
    if record["kind"] not in KINDS:
        return f"invalid kind {record['kind']!r}; expected one of {', '.join(KINDS)}"

    tools = record["tools"]
    if not isinstance(tools, list) or not all(
            isinstance(tool, dict) and tool.get("type") == "function"
            and isinstance(tool.get("function"), dict)
            and isinstance(tool["function"].get("name"), str)
            and isinstance(tool["function"].get("parameters"), dict) for tool in tools):
        return 'tools must be a list of {"type": "function", "function": {"name", "parameters"}}'

    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list"
    listed = {tool["function"]["name"] for tool in tools}
    for position, message in enumerate(messages):
        problem = _check_message(message, position, listed)
        if problem:
            return problem
    if messages[-1]["role"] != "assistant":
        return "the last message must come from the assistant"

    templates = record.get("templates", [])
    if not isinstance(templates, list) or not all(isinstance(item, str) for item in templates):
        return "templates must be a list of strings"
    return _check_tool_results(messages)


def load_conversations(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a JSONL file of conversation records.

    Raises CodelingError naming the file and line of the first bad record.
    """
    path = Path(path)
    if not path.is_file():
        raise CodelingError(f"conversation file not found: {path}; generate one with "
                            "`codeling data tools --out DIR`")
    records = []
    for number, record in iter_json_lines(path):
        problem = check_record(record)
        if problem:
            raise CodelingError(f"{path}:{number}: invalid conversation record: {problem}")
        records.append(record)
    return records
