"""Tool specs and tool calls: uniform specs, parsing a call's JSON text, validating its arguments.

A tool spec may come in the OpenAI layout {"type": "function", "function": {"name", "description",
"parameters"}} or as the bare function object {"name", "description", "parameters"}. `tool_spec`
turns either into the bare form, with `parameters` filled in when it is missing.

A tool call is the JSON object the model writes after `<|tool_call|>`:
{"name": NAME, "arguments": {...}}. `validate_call` also accepts the OpenAI layout
{"type": "function", "function": {"name", "arguments"}}, with the arguments as an object or as a
JSON string, and the bad-call records of `codeling.chat.parse_assistant`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema

from codeling.errors import CodelingError

# The parameters of a tool spec without "parameters": a function that takes no arguments.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class ToolCallError(CodelingError):
    """A tool call or tool spec that cannot be parsed."""


def json_type_name(value: Any) -> str:
    """Return the JSON Schema type name of a decoded JSON value ("object", "array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "array"
    return type(value).__name__


def tool_spec(tool: Any) -> dict[str, Any]:
    """Return the bare function object {"name", "description", "parameters"} of a tool spec.

    Accepts {"type": "function", "function": {...}} and the bare function object. A missing
    `parameters` becomes an object schema without properties. Raises ToolCallError for a spec
    without a name or with parameters that are not an object schema.
    """
    if not isinstance(tool, Mapping):
        raise ToolCallError(f"a tool spec must be a JSON object, got {json_type_name(tool)}")
    function = tool.get("function", tool)
    if not isinstance(function, Mapping):
        raise ToolCallError(f"the \"function\" of a tool spec must be an object, got "
                            f"{json_type_name(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallError('a tool spec needs a non-empty string "name": {"type": "function", '
                            '"function": {"name": ..., "parameters": {...}}}')
    parameters = function.get("parameters")
    if parameters is None:
        parameters = dict(NO_PARAMETERS)
    if not isinstance(parameters, Mapping):
        raise ToolCallError(f"tool {name!r}: parameters must be a JSON Schema object, got "
                            f"{json_type_name(parameters)}")
    declared = parameters.get("type", "object")
    if declared != "object":
        raise ToolCallError(f"tool {name!r}: parameters must describe an object (\"type\": "
                            f"\"object\"), got type {declared!r}")
    spec = dict(function)
    spec["parameters"] = dict(parameters)
    spec.setdefault("description", "")
    return spec


def tool_specs(tools: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Return the bare function objects of tool specs by name; raise ToolCallError on duplicates."""
    specs: dict[str, dict[str, Any]] = {}
    for index, tool in enumerate(tools):
        try:
            spec = tool_spec(tool)
        except ToolCallError as error:
            raise ToolCallError(f"tools[{index}]: {error}") from error
        if spec["name"] in specs:
            raise ToolCallError(f"tools[{index}]: duplicate tool name {spec['name']!r}; "
                                "give each tool a different name")
        specs[spec["name"]] = spec
    return specs


def parse_tool_call_text(text: str) -> tuple[str, dict[str, Any]]:
    """Parse the JSON text of one call, {"name": ..., "arguments": {...}}, into (name, arguments).

    Raises ToolCallError for invalid JSON, a value that is not an object, a missing or non-string
    name, missing or non-object arguments, and keys other than name and arguments.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ToolCallError(f"tool call is not valid JSON ({error.msg} at character "
                            f"{error.pos}): {text[:80]!r}") from error
    if not isinstance(value, dict):
        raise ToolCallError(f'a tool call must be a JSON object {{"name": ..., "arguments": '
                            f'{{...}}}}, got {json_type_name(value)}: {text[:80]!r}')
    if "name" not in value:
        raise ToolCallError(f'tool call has no "name" key: {text[:80]!r}')
    if not isinstance(value["name"], str):
        raise ToolCallError(f"tool call name must be a string, got "
                            f"{json_type_name(value['name'])}: {text[:80]!r}")
    if "arguments" not in value:
        raise ToolCallError(f'tool call {value["name"]!r} has no "arguments" key; write '
                            '"arguments": {} for a tool without parameters')
    if not isinstance(value["arguments"], dict):
        raise ToolCallError(f"arguments of tool call {value['name']!r} must be a JSON object, "
                            f"got {json_type_name(value['arguments'])}")
    extra = sorted(set(value) - {"name", "arguments"})
    if extra:
        raise ToolCallError(f"tool call {value['name']!r} has unexpected keys {extra}; only "
                            '"name" and "arguments" are allowed')
    return value["name"], value["arguments"]


def _call_parts(call: Any) -> tuple[Any, Any, list[str]]:
    """Return (name, arguments, problems) of a call in any accepted layout."""
    if not isinstance(call, Mapping):
        return None, None, [f"a tool call must be a JSON object, got {json_type_name(call)}"]
    if call.get("error"):
        return None, None, [f"invalid tool call: {call['error']}"]
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        return None, None, [f"the \"function\" of a tool call must be an object, got "
                            f"{json_type_name(function)}"]
    name = function.get("name")
    if not isinstance(name, str):
        return None, None, [f"a tool call needs a string name, got {json_type_name(name)}"]
    if "arguments" not in function:
        return name, None, [f'tool call {name!r} has no "arguments"']
    arguments = function["arguments"]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            return name, None, [f"arguments of {name!r} are not valid JSON ({error.msg} at "
                                f"character {error.pos})"]
    return name, arguments, []


def _error_path(error: jsonschema.ValidationError) -> str:
    path = "arguments"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate_call(call: Any, tools: Sequence[Any]) -> list[str]:
    """Check a tool call against the tool specs and return its problems; [] means valid.

    Problems are: a call that is not an object or has no name, a call marked bad by
    `parse_assistant`, an unknown tool name, arguments that are not a JSON object, and each
    violation of the tool's `parameters` schema. `jsonschema` checks the schema, and every
    error is listed with its path, such as "arguments.unit".
    """
    name, arguments, problems = _call_parts(call)
    if problems:
        return problems
    specs = tool_specs(tools)
    if name not in specs:
        available = ", ".join(sorted(specs)) or "none"
        return [f"unknown tool {name!r}; available tools: {available}"]
    if not isinstance(arguments, dict):
        return [f"arguments of {name!r} must be a JSON object, got {json_type_name(arguments)}"]
    schema = specs[name]["parameters"]
    validator_class = jsonschema.validators.validator_for(schema,
                                                         default=jsonschema.Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as error:
        return [f"tool {name!r} has an invalid parameters schema: {error.message}"]
    errors = sorted(validator_class(schema).iter_errors(arguments),
                    key=lambda error: [str(part) for part in error.absolute_path])
    return [f"{name}: {_error_path(error)}: {error.message}" for error in errors]
