"""Building a preference set whose labels are verified: `codeling data preferences`.

Code pairs come from the tasks of `codeling.data.code_tasks`. The model responds to each task in
the chat layout of `codeling.evaluation.execution.code_prompt`, and every response runs against
the task's tests in the sandbox. A chosen response passes and a rejected one fails (syntax error,
wrong result, timeout or another error). The pairs are taken from the model's own samples where
it produces both, and from controlled mutations of the reference solution otherwise.

Tool pairs come from the run's synthetic tool conversations: the data's correct first turn is
chosen over a turn that calls the wrong tool, leaves out a required argument, changes an
argument, gives a value that breaks the schema, calls a tool where none is needed, or replies in
text where a call is needed. Each rejected call is checked with
`codeling.inference.tool_calls.validate_call`.

Every pair records its kind (what is wrong with the rejected response) and the origin of each
side (model, reference, mutation or data), and the manifest counts both.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codeling import chat
from codeling.data.preferences import (PREFERENCES, PreferencePair, canonical_message,
                                       preference_dataset_dir, write_preferences)
from codeling.errors import CodelingError

log = logging.getLogger(__name__)


# -- code pairs: mutations of reference solutions ------------------------------------------------

_BINARY_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.FloorDiv: ast.Mult,
                 ast.Div: ast.Mult, ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult}
_COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt,
                  ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In,
                  ast.Is: ast.IsNot, ast.IsNot: ast.Is}


def _body_statements(task: Any) -> list[ast.stmt]:
    """Parse the task's reference solution; return the body of its function (no docstring)."""
    tree = ast.parse(task.prompt + task.solution)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef)
                    and node.name == task.entry_point)
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return body


def _unparse_body(statements: Sequence[ast.stmt]) -> str:
    text = "\n".join(ast.unparse(statement) for statement in statements)
    return "".join(f"    {line}\n" if line else "\n" for line in text.split("\n"))


def normalized_solution(task: Any) -> str:
    """Return the reference body as `ast.unparse` writes it, so it has the mutants' formatting."""
    return _unparse_body(_body_statements(task))


def _mutation_sites(statements: Sequence[ast.stmt]) -> list[tuple[ast.AST, str]]:
    """Return (node, operator) pairs of every place a result-changing mutation applies."""
    sites = []
    for statement in statements:
        for node in ast.walk(statement):
            if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_SWAPS:
                sites.append((node, "binary"))
            elif isinstance(node, ast.Compare) and type(node.ops[0]) in _COMPARE_SWAPS:
                sites.append((node, "compare"))
            elif isinstance(node, ast.BoolOp):
                sites.append((node, "boolean"))
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                sites.append((node, "not"))
            elif isinstance(node, ast.Constant) and type(node.value) in (int, bool, str):
                sites.append((node, "constant"))
            elif isinstance(node, ast.Return) and node.value is not None:
                sites.append((node, "return"))
    return sites


def _apply_mutation(statements: list[ast.stmt], index: int) -> list[ast.stmt]:
    """Return a deep copy of the statements with the index-th mutation site changed."""
    copied = [copy.deepcopy(statement) for statement in statements]
    node, operator = _mutation_sites(copied)[index]
    if operator == "binary":
        node.op = _BINARY_SWAPS[type(node.op)]()
    elif operator == "compare":
        node.ops[0] = _COMPARE_SWAPS[type(node.ops[0])]()
    elif operator == "boolean":
        node.op = ast.Or() if isinstance(node.op, ast.And) else ast.And()
    elif operator == "not":
        return _drop_not(copied, node)
    elif operator == "constant":
        value = node.value
        if isinstance(value, bool):
            node.value = not value
        elif isinstance(value, int):
            node.value = value + 1
        else:
            node.value = value[1:] if value else "x"
    elif operator == "return":
        node.value = ast.Constant(None)
    return copied


def _drop_not(statements: list[ast.stmt], target: ast.UnaryOp) -> list[ast.stmt]:
    """Replace `not x` at `target` by `x`."""

    class DropNot(ast.NodeTransformer):
        def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
            self.generic_visit(node)
            return node.operand if node is target else node

    return [DropNot().visit(statement) for statement in statements]


def _syntax_mutant(body: str, rng: random.Random) -> str:
    """Break a body's syntax in one of a few ways a model does: a missing colon or bracket,
    a doubled keyword, a stray closing bracket."""
    lines = body.rstrip("\n").split("\n")
    index = rng.randrange(len(lines))
    line = lines[index]
    choices = []
    if line.rstrip().endswith(":"):
        choices.append(line.rstrip()[:-1])
    if line.rstrip().endswith((")", "]", "}")):
        choices.append(line.rstrip()[:-1])
    if "return " in line:
        choices.append(line.replace("return ", "return return ", 1))
    choices.append(line.rstrip() + ")")
    lines[index] = rng.choice(choices)
    return "\n".join(lines) + "\n"


def _timeout_mutant(body: str) -> str:
    """Put an endless loop in front of the body."""
    return "    while True:\n        pass\n" + body


def code_mutants(task: Any, rng: random.Random, kind: str) -> list[str]:
    """Return candidate mutants of the reference body meant to fail with `kind`, best first.

    Each candidate still has to be run: a changed operator can leave the result the same.
    """
    body = normalized_solution(task)
    if kind == "syntax_error":
        return [_syntax_mutant(body, rng) for _ in range(3)]
    if kind == "timeout":
        return [_timeout_mutant(body)]
    statements = _body_statements(task)
    order = list(range(len(_mutation_sites(statements))))
    rng.shuffle(order)
    return [_unparse_body(_apply_mutation(statements, index)) for index in order[:6]]


# -- tool pairs: the correct call against a wrong one --------------------------------------------

TOOL_CALL_KINDS = ("wrong_tool", "missing_argument", "wrong_argument", "invalid_value")


def first_assistant_turn(record: Mapping[str, Any]
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """Return (messages before the first assistant turn, that turn) of a conversation."""
    messages = record["messages"]
    for index, message in enumerate(messages):
        if message.get("role") == "assistant":
            return list(messages[:index]), message
    return None


def _functions(tools: Sequence[Any]) -> dict[str, dict[str, Any]]:
    return {function["name"]: function
            for function in (chat.tool_function(tool, "tools") for tool in tools)}


def _schema_value(schema: Mapping[str, Any], rng: random.Random) -> Any:
    """Draw a value that satisfies a simple JSON Schema (type, enum, minimum, maximum)."""
    if schema.get("enum"):
        return rng.choice(list(schema["enum"]))
    kind = schema.get("type")
    low, high = schema.get("minimum", 0), schema.get("maximum", 100)
    if kind == "integer":
        return rng.randint(int(low), int(high))
    if kind == "number":
        return round(rng.uniform(float(low), float(high)), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return [_schema_value(schema.get("items", {"type": "string"}), rng)
                for _ in range(rng.randint(1, 3))]
    return rng.choice(("main", "notes.txt", "hello", "report", "data"))


def _draw_value(tool: str, name: str, schema: Mapping[str, Any], rng: random.Random) -> Any:
    """Draw a realistic value for a tool parameter: from the synthetic data's generator when
    the tool comes from it, else from the schema."""
    from codeling.data.tool_schemas import TOOLS_BY_NAME

    definition = TOOLS_BY_NAME.get(tool)
    if definition is not None:
        try:
            return definition.param(name).generate(rng)
        except KeyError:
            pass
    return _schema_value(schema, rng)


def _valid_arguments(function: Mapping[str, Any], rng: random.Random) -> dict[str, Any]:
    """Draw arguments for every required parameter of a tool."""
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties", {})
    return {name: _draw_value(function["name"], name, properties.get(name, {}), rng)
            for name in parameters.get("required", [])}


def _other_value(tool: str, name: str, schema: Mapping[str, Any], value: Any,
                 rng: random.Random) -> Any:
    """Return a value of the same type as `value` that differs from it, or None."""
    if schema.get("enum"):
        others = [option for option in schema["enum"] if option != value]
        return rng.choice(others) if others else None
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        high = schema.get("maximum")
        step = rng.randint(1, 5)
        changed = value + step if high is None or value + step <= high else value - step
        low = schema.get("minimum")
        return None if low is not None and changed < low else changed
    for _ in range(10):
        candidate = _draw_value(tool, name, schema, rng)
        if candidate != value and type(candidate) is type(value):
            return candidate
    if isinstance(value, str) and len(value) > 1:
        return value[: len(value) // 2]
    return None


def _invalid_value(schema: Mapping[str, Any], value: Any) -> Any:
    """Return a value that breaks the schema: the wrong JSON type, or a string outside an enum."""
    if schema.get("enum"):
        return f"{value}_other" if isinstance(value, str) else "other"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return ", ".join(str(item) for item in value)
    return 42


def _mutate_call(call: Mapping[str, Any], functions: Mapping[str, Mapping[str, Any]], kind: str,
                 rng: random.Random) -> dict[str, Any] | None:
    """Return a wrong version of a correct call, or None when `kind` does not apply to it."""
    name = call["function"]["name"]
    arguments = dict(call["function"]["arguments"])
    parameters = functions[name].get("parameters") or {}
    properties = parameters.get("properties", {})
    if kind == "wrong_tool":
        others = [other for other in functions if other != name]
        if not others:
            return None
        other = rng.choice(others)
        return _make_call(other, _valid_arguments(functions[other], rng))
    if kind == "missing_argument":
        required = [key for key in parameters.get("required", []) if key in arguments]
        if not required:
            return None
        del arguments[rng.choice(required)]
        return _make_call(name, arguments)
    if not arguments:
        return None
    key = rng.choice(sorted(arguments))
    schema = properties.get(key, {})
    if kind == "wrong_argument":
        changed = _other_value(name, key, schema, arguments[key], rng)
    else:
        changed = _invalid_value(schema, arguments[key])
    if changed is None or changed == arguments[key]:
        return None
    arguments[key] = changed
    return _make_call(name, arguments)


def _make_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _rejection_holds(kind: str, wrong: Mapping[str, Any], right: Mapping[str, Any],
                     tools: Sequence[Any]) -> bool:
    """Return True when a rejected call is wrong in the way its kind states."""
    from codeling.inference.tool_calls import validate_call

    problems = validate_call(wrong, tools)
    if kind in ("missing_argument", "invalid_value"):
        return bool(problems)
    if problems:
        return False
    if kind == "wrong_tool":
        return wrong["function"]["name"] != right["function"]["name"]
    return wrong != right


def tool_pair(record: Mapping[str, Any], rng: random.Random, kind: str | None = None,
              text_replies: Sequence[str] = ()) -> PreferencePair | None:
    """Build one verified pair from a tool conversation's first assistant turn.

    A turn with calls gets a rejected turn with one call changed, by `kind` or by a random
    kind that applies. With kind `missing_call`, the rejected turn is instead a text reply from
    `text_replies` that calls nothing. A turn without calls (a plain response or a clarifying
    question) gets a rejected turn that calls a listed tool anyway. Returns None when no kind
    applies.
    """
    from codeling.inference.tool_calls import validate_call

    found = first_assistant_turn(record)
    tools = record.get("tools") or []
    if found is None or not tools:
        return None
    prompt, expected = found
    chosen = canonical_message(expected, "expected")
    functions = _functions(tools)
    calls = chosen.get("tool_calls") or []
    if any(validate_call(call, tools) for call in calls):
        return None  # the data's own call must be valid to be chosen
    if not calls:
        function = functions[rng.choice(sorted(functions))]
        rejected = {"role": "assistant", "content": "",
                    "tool_calls": [_make_call(function["name"], _valid_arguments(function, rng))]}
        if validate_call(rejected["tool_calls"][0], tools):
            return None
        return _tool_record(record, prompt, chosen, rejected, tools, "unneeded_call")
    if kind == "missing_call":
        if not text_replies:
            return None
        rejected = {"role": "assistant", "content": rng.choice(list(text_replies))}
        return _tool_record(record, prompt, chosen, rejected, tools, "missing_call")
    kinds = [kind] if kind else rng.sample(TOOL_CALL_KINDS, len(TOOL_CALL_KINDS))
    for candidate in kinds:
        position = rng.randrange(len(calls))
        wrong = _mutate_call(calls[position], functions, candidate, rng)
        if wrong is None or not _rejection_holds(candidate, wrong, calls[position], tools):
            continue
        rejected = {**chosen, "tool_calls": [wrong if index == position else call
                                             for index, call in enumerate(calls)]}
        return _tool_record(record, prompt, chosen, rejected, tools, candidate)
    return None


def _tool_record(record: Mapping[str, Any], prompt: list[dict[str, Any]], chosen: dict[str, Any],
                 rejected: dict[str, Any], tools: list[dict[str, Any]], kind: str
                 ) -> PreferencePair:
    prompt = [canonical_message(message, f"messages[{index}]")
              for index, message in enumerate(prompt)]
    return PreferencePair(prompt, chosen, rejected, list(tools), kind=f"tool/{kind}",
                          origin={"chosen": "data", "rejected": "mutation"},
                          id=f"tool/{record.get('id', '')}")


def tool_pairs(records: Sequence[Mapping[str, Any]], limit: int, rng: random.Random
               ) -> list[PreferencePair]:
    """Build up to `limit` verified tool pairs from conversations, in a seeded random order.

    A pair whose responses share their first tokens trains nothing there, so only two kinds
    decide whether a turn starts with a call: `unneeded_call` (a call is rejected) and
    `missing_call` (a text reply is rejected). Turns that need a call get `missing_call`
    whenever it has fewer pairs than `unneeded_call`, so the two pull equally and the tuned
    model keeps calling tools. The text replies are the data's own first turns without calls.
    """
    text_replies = []
    for record in records:
        found = first_assistant_turn(record)
        if found is not None and not found[1].get("tool_calls") and found[1].get("content"):
            text_replies.append(found[1]["content"])
    order = list(range(len(records)))
    rng.shuffle(order)
    pairs: list[PreferencePair] = []
    counts: Counter = Counter()
    for index in order:
        if len(pairs) >= limit:
            break
        kind = None
        if counts["tool/missing_call"] < counts["tool/unneeded_call"]:
            kind = "missing_call"
        pair = tool_pair(records[index], rng, kind, text_replies)
        if pair is None and kind is not None:
            pair = tool_pair(records[index], rng, None, text_replies)
        if pair is not None:
            pairs.append(pair)
            counts[pair.kind] += 1
    return pairs


# -- building the verified set -------------------------------------------------------------------

FORMAT = "codeling-preferences"
FORMAT_VERSION = 1
# Every TIMEOUT_EVERY-th mutation pair gets an endless-loop mutant. Verifying one costs a full
# sandbox timeout.
TIMEOUT_EVERY = 8
MUTATION_KINDS = ("wrong_result", "syntax_error", "wrong_result", "wrong_result")


@dataclass
class BuildSettings:
    """Settings of `build_preference_dataset`."""

    seed: int = 0
    samples: int = 4  # chat responses sampled per code task
    temperature: float = 0.8
    max_new_tokens: int = 64
    code_limit: int = 0  # code tasks used per split; 0 = all
    tool_train: int = 800  # tool pairs in train.jsonl
    tool_test: int = 200  # tool pairs in test.jsonl
    timeout: float = 3.0  # seconds per sandboxed test run
    workers: int = 2  # sandboxes run at once
    device: str = "auto"


def _code_pair(task: Any, chosen: str, rejected: str, kind: str, origin: tuple[str, str]
               ) -> PreferencePair:
    from codeling.evaluation.execution import code_prompt

    return PreferencePair(code_prompt(task), {"role": "assistant", "content": chosen},
                          {"role": "assistant", "content": rejected}, None, kind=f"code/{kind}",
                          origin={"chosen": origin[0], "rejected": origin[1]},
                          id=f"code/{task.task_id}")


def _mutation_pair(task: Any, index: int, rng: random.Random, settings: BuildSettings
                   ) -> PreferencePair | None:
    """Pair the (normalized) reference body with a mutant that fails when run."""
    from codeling.data.code_tasks import check_many, check_solution

    reference = normalized_solution(task)
    if not check_solution(task, reference, settings.timeout).passed:
        log.warning("code task %s: the normalized reference body fails its tests; skipped",
                    task.task_id)
        return None
    wanted = "timeout" if index % TIMEOUT_EVERY == TIMEOUT_EVERY - 1 else \
        MUTATION_KINDS[index % len(MUTATION_KINDS)]
    for kind in (wanted, "wrong_result", "syntax_error"):
        candidates = list(dict.fromkeys(code_mutants(task, rng, kind)))
        # Run `workers` candidates at a time and stop at the first batch with a failure.
        for start in range(0, len(candidates), settings.workers):
            batch = candidates[start:start + settings.workers]
            checks = check_many([(task, mutant) for mutant in batch], settings.timeout,
                                settings.workers)
            for mutant, check in zip(batch, checks):
                if not check.passed:
                    return _code_pair(task, reference, mutant, check.reason,
                                      ("reference", "mutation"))
    return None


def code_pairs(generator: Any, tasks: Sequence[Any], rng: random.Random,
               settings: BuildSettings) -> list[PreferencePair]:
    """Build verified pairs for code tasks from the model's samples and from mutations.

    The model samples `settings.samples` responses to each task, and every response runs
    against the tests. When some responses pass and some fail, the best passing response is
    chosen over the worst failing one (fewest asserts held). Otherwise the reference body is
    chosen over a mutant of it that fails. When the model only failed, the reference is also
    chosen over the model's worst response. Each pair's kind is the rejected response's actual
    failure.
    """
    from codeling.data.code_tasks import check_many
    from codeling.evaluation.execution import PromptTooLongError, sample_chat_responses
    from codeling.inference.generate import GenerationConfig

    pairs: list[PreferencePair] = []
    for index, task in enumerate(tasks):
        config = GenerationConfig(settings.max_new_tokens, settings.temperature,
                                  seed=settings.seed + index)
        try:
            responses = sample_chat_responses(generator, task, settings.samples, config)
        except PromptTooLongError:
            responses = []  # only mutation pairs for this task
        checks = check_many([(task, response) for response in responses], settings.timeout,
                            settings.workers)
        ranked = sorted(zip(responses, checks), key=lambda item: (item[1].passed,
                                                                item[1].fraction_passed))
        passing = [item for item in ranked if item[1].passed]
        failing = [item for item in ranked if not item[1].passed]
        if passing and failing:
            pairs.append(_code_pair(task, passing[-1][0], failing[0][0], failing[0][1].reason,
                                    ("model", "model")))
            continue
        mutation = _mutation_pair(task, index, rng, settings)
        if mutation is not None:
            pairs.append(mutation)
        if failing and mutation is not None:
            pairs.append(_code_pair(task, mutation.chosen["content"], failing[0][0],
                                    failing[0][1].reason, ("reference", "model")))
        if (index + 1) % 25 == 0:
            log.info("code pairs: %d of %d tasks done, %d pairs", index + 1, len(tasks),
                     len(pairs))
    return pairs


def _split_summary(pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    origins = Counter(f"{pair.origin.get('chosen')}/{pair.origin.get('rejected')}"
                      for pair in pairs)
    by_kind_origin = Counter(f"{pair.kind} {pair.origin.get('chosen')}/"
                             f"{pair.origin.get('rejected')}" for pair in pairs)
    return {"pairs": len(pairs), "kinds": dict(sorted(Counter(p.kind for p in pairs).items())),
            "origins": dict(sorted(origins.items())),
            "kinds_by_origin": dict(sorted(by_kind_origin.items()))}


def build_preference_dataset(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path,
                             settings: BuildSettings | None = None) -> dict[str, Any]:
    """Write train.jsonl, test.jsonl and manifest.json of a verified preference set.

    Code pairs come from `codeling.data.code_tasks`: the train split for train.jsonl and the
    held-out test split for test.jsonl. A chosen response passes the task's tests in the sandbox
    and a rejected one fails them (syntax error, wrong result, timeout or another error), as
    `code_pairs` describes. Tool pairs come from the run's synthetic tool conversations
    (train.jsonl for training, test_seen.jsonl held out), as `tool_pairs` describes. The model is the checkpoint's, sampled with `settings.seed`. The files go to a
    temporary directory that is renamed into place, so `out_dir` is complete or absent.
    """
    from codeling.data.chat_data import (ensure_tool_dataset, read_conversations,
                                         tool_dataset_dir)
    from codeling.data.code_tasks import load_code_tasks
    from codeling.inference.generate import Generator
    from codeling.training import checkpoint as ckpt

    settings = settings or BuildSettings()
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CodelingError(f"output directory {out_dir} already exists and is not empty; "
                            "choose a new --out directory or delete this one")
    checkpoint = ckpt.resolve_checkpoint(checkpoint)
    generator = Generator.from_checkpoint(checkpoint, device=settings.device)
    tool_dir = tool_dataset_dir(Path(run_dir))
    if not (tool_dir / "manifest.json").is_file():
        tool_dir = ensure_tool_dataset(Path(run_dir))  # the default size; any existing set is used
    splits: dict[str, list[PreferencePair]] = {}
    for split, tool_file, tool_limit in (("train", "train.jsonl", settings.tool_train),
                                         ("test", "test_seen.jsonl", settings.tool_test)):
        rng = random.Random(f"{settings.seed}-{split}")
        tasks = load_code_tasks(split)[:settings.code_limit or None]
        started = time.perf_counter()
        pairs = code_pairs(generator, tasks, rng, settings)
        log.info("%s: %d code pairs from %d tasks in %.0f s", split, len(pairs), len(tasks),
                 time.perf_counter() - started)
        pairs += tool_pairs(read_conversations(tool_dir / tool_file), tool_limit, rng)
        rng.shuffle(pairs)
        splits[split] = pairs
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "checkpoint": str(checkpoint),
                "tool_data": str(tool_dir), "settings": dataclasses.asdict(settings),
                "splits": {split: _split_summary(pairs) for split, pairs in splits.items()}}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for split, pairs in splits.items():
            write_preferences(staging / f"{split}.jsonl", pairs)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(staging, 0o755)
        os.rename(staging, out_dir)  # replaces an empty out_dir
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


# Settings that change which pairs a build writes; a rebuild with other values is a new set.
CONTENT_SETTINGS = ("seed", "samples", "temperature", "max_new_tokens", "code_limit",
                    "tool_train", "tool_test", "timeout")


def ensure_preference_dataset(run_dir: Path, checkpoint: Path,
                              settings: BuildSettings | None = None) -> Path:
    """Build the run's preference set from `checkpoint` unless it exists; return its folder.

    Raises CodelingError when the folder holds a set built with other settings.
    """
    settings = settings or BuildSettings()
    folder = preference_dataset_dir(run_dir)
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file():
        found = json.loads(manifest_path.read_text())["settings"]
        changed = [key for key in CONTENT_SETTINGS
                   if found.get(key) != getattr(settings, key)]
        if changed:
            raise CodelingError(
                f"{folder} was built with {', '.join(f'{k}={found.get(k)!r}' for k in changed)}"
                f", not {', '.join(f'{k}={getattr(settings, k)!r}' for k in changed)}; request "
                "the same settings (data.sources and train.seed) or delete the folder to build "
                "a new set")
        return folder
    log.info("building the preference set in %s from %s (model samples run in the sandbox; "
             "this takes a few minutes)", folder, checkpoint)
    manifest = build_preference_dataset(run_dir, folder, checkpoint, settings)
    for line in format_manifest(manifest):
        log.info("%s", line)
    return folder


def format_manifest(manifest: Mapping[str, Any]) -> list[str]:
    """Return one line per split: pair count, then counts per kind and per origin."""
    lines = []
    for split, summary in manifest["splits"].items():
        kinds = ", ".join(f"{kind} {count}" for kind, count in summary["kinds"].items())
        origins = ", ".join(f"{origin} {count}" for origin, count in summary["origins"].items())
        lines.append(f"{split}: {summary['pairs']} pairs; kinds: {kinds}; chosen/rejected "
                     f"origins: {origins}")
    return lines


# Settings a `preferences:KEY=VALUE,...` spec may set, with the BuildSettings field of each.
SPEC_KEYS = {"code_tasks": "code_limit", "samples": "samples", "tool_train": "tool_train",
             "tool_test": "tool_test", "max_new_tokens": "max_new_tokens"}


def build_settings_of(spec: str, seed: int = 0) -> BuildSettings:
    """Return the build settings a `preferences[:KEY=VALUE,...]` spec asks for.

    Keys: code_tasks (tasks per split, 0 = all), samples (responses per task), tool_train,
    tool_test (tool pairs per file) and max_new_tokens, each a non-negative integer.
    """
    settings = BuildSettings(seed=seed)
    _, _, options = spec.partition(":")
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key not in SPEC_KEYS or not value.isdigit():
            raise CodelingError(f"{spec!r}: invalid option {option!r}; use KEY=INTEGER with KEY "
                                f"one of {', '.join(SPEC_KEYS)}, as in "
                                f"{PREFERENCES}:code_tasks=100,samples=4")
        setattr(settings, SPEC_KEYS[key], int(value))
    if settings.samples < 1 or settings.max_new_tokens < 1:
        raise CodelingError(f"{spec!r}: samples and max_new_tokens must be at least 1")
    return settings
