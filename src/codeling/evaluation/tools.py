"""The `tools` suite: function calling on held-out conversations.

Each test conversation is cut before its first assistant turn. The model generates that turn
greedily (with and without constrained decoding) and the result is compared with the expected
turn:

- json_valid: share of emitted calls whose JSON parses into {"name": ..., "arguments": {...}};
- schema_valid: share of emitted calls that name a listed tool with arguments valid against its
  schema;
- name_accuracy: among turns that should call tools, share whose called tool names equal the
  expected ones (as a multiset);
- exact_arguments: among the same turns, share whose calls equal the expected calls exactly,
  names and argument values, in any order;
- no_tool_precision and no_tool_recall: "needs no tool" as the positive class, over all turns.

Splits: `test_seen` contains tools seen in training with phrasings that were not; `test_unseen`
contains tools that never appeared in training.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from codeling import chat
from codeling.data.chat_data import read_conversations
from codeling.errors import CodelingError
from codeling.inference.generate import GenerationConfig, Generator

log = logging.getLogger(__name__)

SPLITS = {"test_seen": "held-out phrasings, seen tools", "test_unseen": "held-out tools"}
METRICS = ("json_valid", "schema_valid", "name_accuracy", "exact_arguments", "no_tool_precision",
           "no_tool_recall")


def first_turn_cases(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return {tools, prompt messages, expected assistant message, kind} per conversation."""
    cases = []
    for record in records:
        messages = record["messages"]
        index = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        if index is None:
            continue
        cases.append({"tools": record.get("tools") or [], "messages": messages[:index],
                      "expected": messages[index], "kind": record.get("kind", "")})
    return cases


def _call_key(call: dict[str, Any]) -> str:
    function = call.get("function", call)
    return json.dumps({"name": function.get("name"), "arguments": function.get("arguments")},
                      sort_keys=True)


def score_turn(predicted: dict[str, Any], expected: dict[str, Any],
               tools: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare one generated assistant turn with the expected one."""
    from codeling.inference.tool_calls import validate_call

    calls = predicted.get("tool_calls") or []
    wanted = expected.get("tool_calls") or []
    parsed = [call for call in calls if "error" not in call]
    return {
        "calls": len(calls),
        "json_valid": len(parsed),
        "schema_valid": sum(1 for call in parsed if not validate_call(call, tools)),
        "expects_call": bool(wanted),
        "predicts_call": bool(calls),
        "name_match": bool(wanted) and Counter(c["function"]["name"] for c in parsed)
        == Counter(c["function"]["name"] for c in wanted) and len(parsed) == len(calls),
        "exact_match": bool(wanted) and len(parsed) == len(calls)
        and Counter(map(_call_key, parsed)) == Counter(map(_call_key, wanted)),
    }


def summarize(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Turn per-turn scores into the suite's metrics (None where a metric has no cases)."""
    def ratio(numerator: float, denominator: float) -> float | None:
        return numerator / denominator if denominator else None

    calls = sum(s["calls"] for s in scores)
    with_call = [s for s in scores if s["expects_call"]]
    predicted_none = [s for s in scores if not s["predicts_call"]]
    expected_none = [s for s in scores if not s["expects_call"]]
    return {
        "cases": len(scores),
        "json_valid": ratio(sum(s["json_valid"] for s in scores), calls),
        "schema_valid": ratio(sum(s["schema_valid"] for s in scores), calls),
        "name_accuracy": ratio(sum(s["name_match"] for s in with_call), len(with_call)),
        "exact_arguments": ratio(sum(s["exact_match"] for s in with_call), len(with_call)),
        "no_tool_precision": ratio(sum(not s["expects_call"] for s in predicted_none),
                                   len(predicted_none)),
        "no_tool_recall": ratio(sum(not s["predicts_call"] for s in expected_none),
                                len(expected_none)),
        "by_kind": _by_kind(scores),
    }


def _by_kind(scores: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Count the cases of each conversation kind and how many of them were right.

    For turns that should call tools: right names and exact calls. For the others: turns
    without a call.
    """
    kinds: dict[str, dict[str, int]] = {}
    for score in scores:
        counts = kinds.setdefault(score.get("kind") or "unknown", {"cases": 0})
        counts["cases"] += 1
        if score["expects_call"]:
            counts["name_match"] = counts.get("name_match", 0) + int(score["name_match"])
            counts["exact_match"] = counts.get("exact_match", 0) + int(score["exact_match"])
        else:
            counts["no_call"] = counts.get("no_call", 0) + int(not score["predicts_call"])
    return kinds


def evaluate_tool_calls(generator: Generator, data_dir: Path, limit: int = 100,
                        max_new_tokens: int = 160, modes: tuple[bool, ...] = (False, True),
                        examples_kept: int = 3, failures_kept: int = 100) -> dict[str, Any]:
    """Run the suite on the test splits found in data_dir; return metrics per split and mode.

    Each split and mode keeps its first `examples_kept` turns as "samples" and its first
    `failures_kept` wrong turns as "failures". A turn is wrong when its calls differ from the
    expected calls, or when it calls a tool where none was expected.
    """
    found = {split: data_dir / f"{split}.jsonl" for split in SPLITS
             if (data_dir / f"{split}.jsonl").is_file()}
    if not found:
        raise CodelingError(f"no test_seen.jsonl or test_unseen.jsonl in {data_dir}; generate "
                            "them with `codeling data tools --out DIR` and pass --tools-data "
                            "DIR (tools_data in a recipe)")
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    context = generator.model.config.max_seq_len
    results: dict[str, Any] = {"data": str(data_dir), "limit": limit, "splits": {}}
    for split, path in found.items():
        cases = first_turn_cases(read_conversations(path))[:limit or None]
        split_result: dict[str, Any] = {"description": SPLITS[split]}
        for constrained in modes:
            scores, samples, failures, skipped = [], [], [], 0
            for case in cases:
                prompt = chat.render(case["messages"], generator.tokenizer, case["tools"])
                if len(prompt) + 8 >= context:
                    skipped += 1
                    continue
                ids = generator.generate_turn(prompt, config, tools=case["tools"],
                                              constrained=constrained)
                predicted = chat.parse_assistant(ids, generator.tokenizer)
                score = {**score_turn(predicted, case["expected"], case["tools"]),
                         "kind": case["kind"]}
                scores.append(score)
                turn = {"kind": case["kind"], "request": case["messages"][-1].get("content"),
                        "expected": case["expected"], "predicted": predicted}
                if len(samples) < examples_kept:
                    samples.append(turn)
                if score["expects_call"]:
                    wrong = not score["exact_match"]
                else:
                    wrong = score["predicts_call"]
                if wrong and len(failures) < failures_kept:
                    failures.append(turn)
            mode = "constrained" if constrained else "free"
            summary = summarize(scores)
            summary["skipped_too_long"] = skipped
            summary["samples"] = samples
            summary["failures"] = failures
            split_result[mode] = summary
            log.info("tools: %s, %s decoding: %s", split, mode, ", ".join(
                f"{name} {100 * summary[name]:.1f}%" for name in METRICS
                if summary[name] is not None))
        results["splits"][split] = split_result
    return results


def report_section(stage: str, result: dict[str, Any]) -> list[str]:
    """Lines of the report card for one stage's tools results."""
    lines = [f"## Tool calling ({stage})", "",
             "First assistant turn of each held-out conversation, greedy decoding. Free: the "
             "model's own output; constrained: calls forced to valid JSON matching a listed "
             "tool's schema.", "",
             "| split | decoding | cases | JSON valid | schema valid | tool name | exact "
             "arguments | no-tool precision | no-tool recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split, modes in result["splits"].items():
        for mode in ("free", "constrained"):
            if mode not in modes:
                continue
            summary = modes[mode]
            cells = ["-" if summary[name] is None else f"{100 * summary[name]:.1f}%"
                     for name in METRICS]
            lines.append(f"| {split} ({modes['description']}) | {mode} | {summary['cases']} | "
                         + " | ".join(cells) + " |")
    rows = []
    for split, modes in result["splits"].items():
        for mode in ("free", "constrained"):
            by_kind = modes.get(mode, {}).get("by_kind")
            if by_kind:
                cells = [_kind_cell(by_kind.get(kind)) for kind in KIND_COLUMNS]
                rows.append(f"| {split} | {mode} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["", "By kind of conversation: right tool names / exact calls out of the cases "
                  "that need a call, or answers without a call out of those that need none.", "",
                  "| split | decoding | " + " | ".join(KIND_COLUMNS) + " |",
                  "|---|---|" + "---|" * len(KIND_COLUMNS), *rows]
    return lines + [""]


KIND_COLUMNS = ("single_call", "parallel_calls", "multi_turn", "no_tool", "clarify")


def _kind_cell(counts: dict[str, int] | None) -> str:
    if not counts:
        return "-"
    if "name_match" in counts:
        return f"{counts['name_match']} / {counts['exact_match']} of {counts['cases']}"
    return f"{counts.get('no_call', 0)} of {counts['cases']}"
