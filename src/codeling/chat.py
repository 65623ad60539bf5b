"""The chat format: conversations with tools rendered over the tokenizer's special tokens.

A conversation renders as (special tokens inserted by id, shown here as their strings):

    <|bos|><|system|>SYSTEM<|end_turn|>
    <|user|>Which files are here?<|end_turn|>
    <|assistant|><|tool_call|>{"name": "list_files", "arguments": {"path": "."}}<|end_turn|>
    <|tool_result|>["main.py", "README.md"]<|end_turn|>
    <|assistant|>There are two files: main.py and README.md.<|end_turn|>

SYSTEM is the system message, followed, when tools are given, by a blank line, the header
`# Tools` and one JSON object per tool (its name, description and JSON Schema `parameters`), one
per line. An assistant turn contains optional text, then one `<|tool_call|>` and a JSON object
`{"name": ..., "arguments": {...}}` per call. Each tool result is a turn of its own, in the
order of the calls. A generation prompt ends with `<|assistant|>`, and the model ends its turn
with `<|end_turn|>`.

Messages follow the OpenAI chat layout. The canonical form, which `parse` returns, is:

    {"role": "system" | "user", "content": str}
    {"role": "assistant", "content": str}
    {"role": "assistant", "content": str, "tool_calls": [
        {"type": "function", "function": {"name": str, "arguments": dict}}]}
    {"role": "tool", "content": str}

`render` also accepts what clients send: content as a list of text parts, `developer` as the
system role, tool calls with `id` fields and arguments as a JSON string, and tool messages with
`tool_call_id` and `name` (the ids and names are not rendered).

Special-token strings inside message text encode as ordinary text. `CHAT_TEMPLATE` is the same
format as a Jinja template, saved in tokenizer_config.json, so `apply_chat_template` in
transformers renders the same ids for canonical messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from codeling.errors import CodelingError
from codeling.tokenizer import Tokenizer

TOOLS_HEADER = "# Tools\n"

ROLE_TOKENS = {
    "system": "<|system|>",
    "developer": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "tool": "<|tool_result|>",
}
_TOKEN_ROLES = {"<|system|>": "system", "<|user|>": "user", "<|assistant|>": "assistant",
                "<|tool_result|>": "tool"}


class ChatFormatError(CodelingError):
    """A message that the chat format cannot render; `param` names the field, as in OpenAI."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# -- messages and tools -------------------------------------------------------------------------


def message_text(content: Any, param: str) -> str:
    """Return the text of a message's content: a string, None or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for index, part in enumerate(content):
            part_type = part.get("type") if isinstance(part, Mapping) else None
            if part_type != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(
                    f"content part {index} has type {part_type!r}; only text parts "
                    "({\"type\": \"text\", \"text\": ...}) are supported", f"{param}[{index}]")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatFormatError(f"content must be a string or a list of text parts, got "
                          f"{type(content).__name__}", param)


def tool_function(tool: Any, param: str) -> dict[str, Any]:
    """Return the function object of a tool spec: {"type": "function", "function": {...}} or bare."""
    if not isinstance(tool, Mapping):
        raise ChatFormatError(f"a tool must be an object, got {type(tool).__name__}", param)
    if "function" in tool and tool.get("type", "function") != "function":
        raise ChatFormatError(f"tool type {tool.get('type')!r} is not supported; use "
                              "\"function\"", f"{param}.type")
    function = tool.get("function", tool)
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) \
            or not function["name"]:
        raise ChatFormatError(
            'a tool needs a function name: {"type": "function", "function": {"name": ..., '
            '"parameters": {...}}}', param)
    if not isinstance(function.get("parameters", {}), Mapping):
        raise ChatFormatError("a tool's parameters must be a JSON Schema object such as "
                              '{"type": "object", "properties": {...}}', f"{param}.parameters")
    return dict(function)


def call_function(call: Any, param: str) -> tuple[str, Any]:
    """Return (name, arguments) of a tool call in the OpenAI layout or the flat {name, arguments}.

    Arguments given as a JSON string (as OpenAI clients send them back) are decoded.
    """
    function = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ChatFormatError('a tool call needs {"function": {"name": ..., "arguments": ...}}',
                              param)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ChatFormatError(f"tool call arguments are not valid JSON ({error.msg} at "
                                  f"character {error.pos}): {arguments[:80]!r}",
                                  f"{param}.function.arguments") from error
    return function["name"], arguments


def dump_json(value: Any) -> str:
    """JSON the way the template writes it: ", " and ": " separators, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False)


def tools_block(tools: Sequence[Any]) -> str:
    """The tools part of the system turn: the header and one JSON object per line."""
    functions = [tool_function(tool, f"tools[{index}]") for index, tool in enumerate(tools)]
    names = [function["name"] for function in functions]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ChatFormatError(f"two tools are named {name!r}; give each tool its own name",
                                  f"tools[{index}].function.name")
    return TOOLS_HEADER + "\n".join(dump_json(function) for function in functions)


# -- rendering ----------------------------------------------------------------------------------


def _segments(messages: Sequence[Mapping[str, Any]], tools: Sequence[Any] | None,
              add_generation_prompt: bool) -> list[tuple[str | None, str, bool]]:
    """Lay a conversation out as (special token or None, text, produced by the assistant)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatFormatError("messages must be a list of message objects", "messages")
    if not messages and not tools:
        raise ChatFormatError("messages is empty; send at least one message", "messages")
    out: list[tuple[str | None, str, bool]] = [("<|bos|>", "", False)]
    start = 0
    first_is_system = bool(messages) and isinstance(messages[0], Mapping) \
        and messages[0].get("role") in ("system", "developer")
    if first_is_system or tools:
        text = message_text(messages[0].get("content"), "messages[0].content") \
            if first_is_system else ""
        if tools:
            text = (text + "\n\n" if text else "") + tools_block(tools)
        out += [("<|system|>", "", False), (None, text, False), ("<|end_turn|>", "", False)]
        start = 1 if first_is_system else 0
    for index in range(start, len(messages)):
        message = messages[index]
        param = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ChatFormatError(f"{param} must be an object with role and content", param)
        role = message.get("role")
        if role not in ROLE_TOKENS:
            raise ChatFormatError(f"{param} has role {role!r}; supported roles are "
                                  f"{', '.join(ROLE_TOKENS)}", f"{param}.role")
        text = message_text(message.get("content"), f"{param}.content")
        out.append((ROLE_TOKENS[role], "", False))
        if role != "assistant":
            out += [(None, text, False), ("<|end_turn|>", "", False)]
            continue
        out.append((None, text, True))
        calls = message.get("tool_calls") or []
        if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
            raise ChatFormatError(f"{param}.tool_calls must be a list", f"{param}.tool_calls")
        for number, call in enumerate(calls):
            name, arguments = call_function(call, f"{param}.tool_calls[{number}]")
            out += [("<|tool_call|>", "", True),
                    (None, dump_json({"name": name, "arguments": arguments}), True)]
        out.append(("<|end_turn|>", "", True))
    if add_generation_prompt:
        out.append(("<|assistant|>", "", False))
    return out


def text_pieces(messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Any] | None = None) -> list[str]:
    """Return the text between the special tokens of a rendered conversation, in order.

    This is the text a tokenizer sees of a conversation, for example to train one on chats.
    """
    pieces, current = [], ""
    for token, text, _ in _segments(messages, tools, add_generation_prompt=False):
        if token is None:
            current += text
        elif current:
            pieces.append(current)
            current = ""
    return pieces + ([current] if current else [])


def render_with_mask(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer,
                     tools: Sequence[Any] | None = None,
                     add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Render a conversation to ids and a mask that is 1 on tokens the assistant produces.

    The assistant's tokens are its text, its `<|tool_call|>` tokens and call JSON, and the
    `<|end_turn|>` that closes its turn; role tokens and other turns are 0. Text between two
    special tokens is encoded as one piece, as a tokenizer that splits on special tokens does.
    """
    ids: list[int] = []
    mask: list[int] = []
    pending_text = ""
    pending_flag = False

    def flush() -> None:
        nonlocal pending_text
        if pending_text:
            piece = tokenizer.encode(pending_text)
            ids.extend(piece)
            mask.extend([int(pending_flag)] * len(piece))
        pending_text = ""

    for token, text, from_assistant in _segments(messages, tools, add_generation_prompt):
        if token is None:
            if text:
                pending_text += text
                pending_flag = from_assistant
            continue
        flush()
        ids.append(tokenizer.token_id(token))
        mask.append(int(from_assistant))
    flush()
    return ids, mask


def render(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer,
           tools: Sequence[Any] | None = None, add_generation_prompt: bool = True) -> list[int]:
    """Render messages (and the tools in the system turn) to prompt ids.

    With `add_generation_prompt` the ids end with `<|assistant|>`, opening the model's turn.
    Raises ChatFormatError for an empty list, an unknown role or content that is not text.
    """
    return render_with_mask(messages, tokenizer, tools, add_generation_prompt)[0]


# -- parsing ------------------------------------------------------------------------------------


def _split_turns(ids: Sequence[int], tokenizer: Tokenizer) -> list[tuple[str, list[int]]]:
    """Split ids into (role, ids of the turn's body) pairs; a trailing open turn has no body."""
    role_by_id = {tokenizer.token_id(token): role for token, role in _TOKEN_ROLES.items()}
    end_turn = tokenizer.token_id("<|end_turn|>")
    position = 1 if ids and ids[0] == tokenizer.bos_id else 0
    turns: list[tuple[str, list[int]]] = []
    while position < len(ids):
        token = ids[position]
        if token not in role_by_id:
            raise ChatFormatError(f"expected a role token at position {position}, found "
                                  f"{tokenizer.decode([token])!r}", "ids")
        try:
            end = ids.index(end_turn, position + 1)
        except ValueError:
            end = len(ids)
        turns.append((role_by_id[token], list(ids[position + 1:end])))
        position = end + 1
    return turns


def _split_tools(text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """Split a system turn's text into (system content or None, tools or None)."""
    at = 0 if text.startswith(TOOLS_HEADER) else text.rfind("\n\n" + TOOLS_HEADER)
    if at < 0:
        return text, None
    head = at + len(TOOLS_HEADER) + (0 if at == 0 else 2)
    try:
        functions = [json.loads(line) for line in text[head:].split("\n")]
    except json.JSONDecodeError:
        return text, None
    if not all(isinstance(function, dict) and "name" in function for function in functions):
        return text, None
    tools = [{"type": "function", "function": function} for function in functions]
    return (text[:at] if at > 0 else None), tools


def parse_assistant(ids: Sequence[int], tokenizer: Tokenizer) -> dict[str, Any]:
    """Turn the ids of one assistant turn into a canonical assistant message.

    `ids` are the tokens after `<|assistant|>`, with or without the closing `<|end_turn|>`.
    A call whose JSON does not parse is kept with name and arguments None, its text in "raw"
    and the reason in "error", so callers can report it.
    """
    ids = list(ids)
    end_turn = tokenizer.token_id("<|end_turn|>")
    if end_turn in ids:
        ids = ids[:ids.index(end_turn)]
    tool_call = tokenizer.token_id("<|tool_call|>")
    pieces: list[list[int]] = [[]]
    for token in ids:
        if token == tool_call:
            pieces.append([])
        else:
            pieces[-1].append(token)
    message: dict[str, Any] = {"role": "assistant", "content": tokenizer.decode(pieces[0])}
    if len(pieces) > 1:
        message["tool_calls"] = [_parse_call(tokenizer.decode(piece)) for piece in pieces[1:]]
    return message


def _parse_call(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return _bad_call(text, f"invalid JSON ({error.msg} at character {error.pos})")
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return _bad_call(text, 'a call must be an object {"name": ..., "arguments": {...}}')
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return _bad_call(text, "arguments must be a JSON object")
    if set(value) - {"name", "arguments"}:
        return _bad_call(text, f"unexpected keys {sorted(set(value) - {'name', 'arguments'})}")
    return {"type": "function", "function": {"name": value["name"], "arguments": arguments}}


def _bad_call(text: str, error: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": None, "arguments": None}, "raw": text,
            "error": error}


def parse(ids: Sequence[int], tokenizer: Tokenizer
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Turn rendered ids back into (canonical messages, tools); the inverse of `render`.

    A trailing generation prompt (`<|assistant|>` with nothing after it) is dropped.
    """
    turns = _split_turns(ids, tokenizer)
    if turns and turns[-1] == ("assistant", []) and ids[-1] == tokenizer.token_id("<|assistant|>"):
        turns = turns[:-1]
    messages: list[dict[str, Any]] = []
    tools = None
    for index, (role, body) in enumerate(turns):
        if role == "assistant":
            messages.append(parse_assistant(body, tokenizer))
            continue
        text = tokenizer.decode(body)
        if role == "system" and index == 0:
            content, tools = _split_tools(text)
            if content is not None:
                messages.append({"role": "system", "content": content})
            continue
        messages.append({"role": role, "content": text})
    return messages, tools


# -- the same format as a Jinja template, for transformers ---------------------------------------

_CONTENT = ("{%- if m.content is string %}{{ m.content }}"
            "{%- elif m.content %}{%- for part in m.content %}{{ part.text }}{%- endfor %}"
            "{%- endif %}")

CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set first_is_system = messages and messages[0].role in ['system', 'developer'] %}"
    "{%- if first_is_system or tools %}"
    "{{- '<|system|>' }}"
    "{%- if first_is_system %}{%- set m = messages[0] %}" + _CONTENT + "{%- endif %}"
    "{%- if tools %}"
    "{%- if first_is_system and messages[0].content %}{{- '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n' }}"
    "{%- for tool in tools %}"
    "{%- if tool.function is defined %}{{- tool.function | tojson }}"
    "{%- else %}{{- tool | tojson }}{%- endif %}"
    "{%- if not loop.last %}{{- '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|end_turn|>' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if not (loop.first and first_is_system) %}"
    "{%- if m.role == 'assistant' %}"
    "{{- '<|assistant|>' }}" + _CONTENT +
    "{%- for call in m.tool_calls or [] %}"
    "{%- set f = call.function if call.function is defined else call %}"
    "{{- '<|tool_call|>' }}"
    "{%- if f.arguments is string %}"
    "{{- '{\"name\": ' ~ (f.name | tojson) ~ ', \"arguments\": ' ~ f.arguments ~ '}' }}"
    "{%- else %}{{- {'name': f.name, 'arguments': f.arguments} | tojson }}{%- endif %}"
    "{%- endfor %}"
    "{{- '<|end_turn|>' }}"
    "{%- else %}"
    "{%- if m.role == 'user' %}{{- '<|user|>' }}"
    "{%- elif m.role == 'tool' %}{{- '<|tool_result|>' }}"
    "{%- else %}{{- '<|system|>' }}{%- endif %}" + _CONTENT +
    "{{- '<|end_turn|>' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)
