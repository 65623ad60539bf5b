"""Tool specs, parsing of a call's JSON text and validation of calls against their schemas."""

from __future__ import annotations

import json

import pytest

from codeling.inference.tool_calls import (ToolCallError, parse_tool_call_text, tool_spec,
                                           tool_specs, validate_call)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["city"], "additionalProperties": False}}}
NOOP = {"name": "noop", "description": "Do nothing."}
TOOLS = [WEATHER, NOOP]


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def test_tool_spec_accepts_both_layouts():
    wrapped = tool_spec(WEATHER)
    bare = tool_spec(WEATHER["function"])
    assert wrapped == bare
    assert wrapped["name"] == "get_weather"
    assert wrapped["parameters"]["required"] == ["city"]


def test_tool_spec_fills_missing_parameters():
    spec = tool_spec(NOOP)
    assert spec["parameters"] == {"type": "object", "properties": {}}
    assert spec["description"] == "Do nothing."


def test_tool_spec_rejects_bad_specs():
    with pytest.raises(ToolCallError, match="name"):
        tool_spec({"type": "function", "function": {"parameters": {}}})
    with pytest.raises(ToolCallError, match="must describe an object"):
        tool_spec({"name": "f", "parameters": {"type": "string"}})
    with pytest.raises(ToolCallError, match="JSON Schema object"):
        tool_spec({"name": "f", "parameters": ["x"]})
    with pytest.raises(ToolCallError, match="must be a JSON object"):
        tool_spec("get_weather")


def test_tool_specs_rejects_duplicate_names():
    assert list(tool_specs(TOOLS)) == ["get_weather", "noop"]
    with pytest.raises(ToolCallError, match=r"tools\[1\]: duplicate tool name 'noop'"):
        tool_specs([NOOP, NOOP])


def test_parse_tool_call_text_returns_name_and_arguments():
    text = json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})
    assert parse_tool_call_text(text) == ("get_weather", {"city": "Oslo"})


@pytest.mark.parametrize("text, message", [
    ('{"name": "f", "arguments": {', "not valid JSON"),
    ('["f", {}]', "must be a JSON object"),
    ('{"arguments": {}}', 'no "name" key'),
    ('{"name": 3, "arguments": {}}', "name must be a string"),
    ('{"name": "f"}', 'no "arguments" key'),
    ('{"name": "f", "arguments": [1]}', "must be a JSON object, got array"),
    ('{"name": "f", "arguments": {}, "id": 1}', "unexpected keys"),
])
def test_parse_tool_call_text_errors(text, message):
    with pytest.raises(ToolCallError, match=message):
        parse_tool_call_text(text)


def test_validate_call_accepts_valid_calls():
    assert validate_call(call("get_weather", {"city": "Oslo", "days": 3}), TOOLS) == []
    assert validate_call({"name": "noop", "arguments": {}}, TOOLS) == []
    assert validate_call(call("get_weather", '{"city": "Oslo"}'), TOOLS) == []


def test_validate_call_unknown_tool():
    problems = validate_call(call("get_time", {}), TOOLS)
    assert problems == ["unknown tool 'get_time'; available tools: get_weather, noop"]


def test_validate_call_arguments_not_object():
    assert validate_call(call("get_weather", ["Oslo"]), TOOLS) == [
        "arguments of 'get_weather' must be a JSON object, got array"]
    problems = validate_call(call("get_weather", '{"city": '), TOOLS)
    assert len(problems) == 1
    assert "not valid JSON" in problems[0]


def test_validate_call_lists_each_schema_violation():
    arguments = {"unit": "kelvin", "days": 30, "tags": ["a", 5], "extra": True}
    problems = validate_call(call("get_weather", arguments), TOOLS)
    assert len(problems) == 5
    text = "\n".join(problems)
    assert "arguments: 'city' is a required property" in text
    assert "arguments: Additional properties are not allowed ('extra' was unexpected)" in text
    assert "arguments.unit: 'kelvin' is not one of ['celsius', 'fahrenheit']" in text
    assert "arguments.days: 30 is greater than the maximum of 14" in text
    assert "arguments.tags[1]: 5 is not of type 'string'" in text


def test_validate_call_reports_unparsed_calls():
    bad = {"type": "function", "function": {"name": None, "arguments": None}, "raw": "{",
           "error": "invalid JSON (Expecting value at character 1)"}
    assert validate_call(bad, TOOLS) == [
        "invalid tool call: invalid JSON (Expecting value at character 1)"]
    assert validate_call({"function": {"arguments": {}}}, TOOLS) == [
        "a tool call needs a string name, got null"]
    assert validate_call("noop", TOOLS) == ["a tool call must be a JSON object, got string"]


def test_validate_call_reports_invalid_schema():
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": 5}}}}]
    problems = validate_call(call("f", {"x": 1}), tools)
    assert len(problems) == 1
    assert problems[0].startswith("tool 'f' has an invalid parameters schema")


def test_tools_suite_scores_by_kind():
    from codeling.evaluation.tools import report_section, score_turn, summarize

    paris = {"role": "assistant", "content": "", "tool_calls": [call("get_weather",
                                                                     {"city": "Paris"})]}
    rome = {"role": "assistant", "content": "", "tool_calls": [call("get_weather",
                                                                    {"city": "Rome"})]}
    text = {"role": "assistant", "content": "Hello!"}
    turns = [(paris, paris, "single_call"),  # right call
             (rome, paris, "single_call"),  # right tool, wrong argument
             (text, paris, "multi_turn"),  # no call where one was needed
             (text, text, "no_tool"),  # a text reply, no call
             (paris, text, "clarify")]  # called where a question was needed
    scores = [{**score_turn(predicted, expected, TOOLS), "kind": kind}
              for predicted, expected, kind in turns]
    summary = summarize(scores)
    assert summary["name_accuracy"] == pytest.approx(2 / 3)
    assert summary["exact_arguments"] == pytest.approx(1 / 3)
    assert summary["by_kind"] == {
        "single_call": {"cases": 2, "name_match": 2, "exact_match": 1},
        "multi_turn": {"cases": 1, "name_match": 0, "exact_match": 0},
        "no_tool": {"cases": 1, "no_call": 1},
        "clarify": {"cases": 1, "no_call": 0}}
    result = {"splits": {"test_seen": {"description": "held-out phrasings", "free": summary}}}
    lines = report_section("tools", result)
    assert "| test_seen | free | 2 / 1 of 2 | - | 0 / 0 of 1 | 1 of 1 | 0 of 1 |" in lines
