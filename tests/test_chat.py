"""The chat format: render and parse are inverses, the mask marks the assistant's tokens, and the
Jinja template in tokenizer_config.json renders the same ids in transformers."""

from __future__ import annotations

import json
import random

import pytest

from codeling import chat
from codeling.chat import ChatFormatError

LIST_FILES = {"type": "function", "function": {
    "name": "list_files", "description": "List the files in a directory.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": []}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city (°C).",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"]}}}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS = [
    # (messages, tools)
    ([{"role": "user", "content": "hello"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "Hi."}], None),
    ([{"role": "user", "content": "What is here?"},
      {"role": "assistant", "content": "", "tool_calls": [call("list_files", path=".")]},
      {"role": "tool", "content": '["a.py", "b.sh"]'},
      {"role": "assistant", "content": "Two files: a.py and b.sh."}], [LIST_FILES]),
    ([{"role": "system", "content": "You can use tools.\n"},
      {"role": "user", "content": "Weather in Zürich and Oslo?"},
      {"role": "assistant", "content": "Checking both.",
       "tool_calls": [call("get_weather", city="Zürich", unit="c"),
                      call("get_weather", city="Oslo")]},
      {"role": "tool", "content": "4 °C"}, {"role": "tool", "content": "-2 °C"},
      {"role": "assistant", "content": "Zürich 4 °C, Oslo -2 °C."},
      {"role": "user", "content": "thanks <|end_turn|> <|tool_call|>"},
      {"role": "assistant", "content": "You're welcome."}], [LIST_FILES, WEATHER]),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "  spaces\n\tand tabs "}],
     None),
]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_parse_inverts_render(small_tokenizer, index):
    messages, tools = CONVERSATIONS[index]
    for prompt in (False, True):
        ids = chat.render(messages, small_tokenizer, tools, add_generation_prompt=prompt)
        assert ids[0] == small_tokenizer.bos_id
        assert (ids[-1] == small_tokenizer.token_id("<|assistant|>")) == prompt
        assert chat.parse(ids, small_tokenizer) == (messages, tools)


def test_random_conversations_round_trip(small_tokenizer):
    rng = random.Random(0)
    alphabet = "abc xyz_(){}[]\"'\n\t:,é中🙂<|>"

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))

    for _ in range(50):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for _ in range(rng.randrange(1, 4)):
            messages.append({"role": "user", "content": text()})
            if rng.random() < 0.5:
                calls = [call(rng.choice(["list_files", "get_weather"]), city=text(),
                              n=rng.randrange(-5, 5), ok=rng.random() < 0.5)
                         for _ in range(rng.randrange(1, 3))]
                messages.append({"role": "assistant", "content": text(), "tool_calls": calls})
                messages += [{"role": "tool", "content": text()} for _ in calls]
            messages.append({"role": "assistant", "content": text()})
        tools = [LIST_FILES, WEATHER] if rng.random() < 0.5 else None
        if messages[0]["role"] == "system" and not messages[0]["content"] and tools:
            messages = messages[1:]  # an empty system message with tools renders as no message
        ids = chat.render(messages, small_tokenizer, tools, add_generation_prompt=False)
        assert chat.parse(ids, small_tokenizer) == (messages, tools)


def test_mask_marks_exactly_the_assistant_tokens(small_tokenizer):
    messages, tools = CONVERSATIONS[3]
    ids, mask = chat.render_with_mask(messages, small_tokenizer, tools)
    assert len(ids) == len(mask)
    trained = small_tokenizer.decode([i for i, m in zip(ids, mask) if m])
    expected = ""
    for message in messages:
        if message["role"] != "assistant":
            continue
        expected += message["content"]
        for tool_call in message.get("tool_calls", []):
            expected += "<|tool_call|>" + json.dumps(
                {"name": tool_call["function"]["name"],
                 "arguments": tool_call["function"]["arguments"]}, ensure_ascii=False)
        expected += "<|end_turn|>"
    assert trained == expected
    assistant = small_tokenizer.token_id("<|assistant|>")
    assert all(m == 0 for i, m in zip(ids, mask) if i == assistant)


def test_client_shapes_render_like_canonical(small_tokenizer):
    canonical, tools = CONVERSATIONS[2]
    from_client = [
        {"role": "developer", "content": [{"type": "text", "text": "Be "},
                                          {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "What is here?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "list_files", "arguments": '{"path":"."}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "list_files",
         "content": '["a.py", "b.sh"]'},
        {"role": "assistant", "content": "Two files: a.py and b.sh."}]
    expected = chat.render([{"role": "system", "content": "Be brief."}, *canonical],
                           small_tokenizer, tools)
    assert chat.render(from_client, small_tokenizer, tools) == expected


def test_parse_assistant_keeps_bad_calls(small_tokenizer):
    tok = small_tokenizer
    ids = (tok.encode("Let me look.") + [tok.token_id("<|tool_call|>")]
           + tok.encode('{"name": "list_files", "arguments": {"path": "src"}}')
           + [tok.token_id("<|tool_call|>")] + tok.encode('{"name": "list_files", "argum')
           + [tok.token_id("<|end_turn|>")] + tok.encode("ignored"))
    message = chat.parse_assistant(ids, tok)
    assert message["content"] == "Let me look."
    good, bad = message["tool_calls"]
    assert good == call("list_files", path="src")
    assert bad["function"]["name"] is None and "invalid JSON" in bad["error"]
    assert bad["raw"] == '{"name": "list_files", "argum'
    array_args = tok.encode('{"name": "f", "arguments": [1]}')
    message = chat.parse_assistant([tok.token_id("<|tool_call|>"), *array_args], tok)
    assert "must be a JSON object" in message["tool_calls"][0]["error"]


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    (["hello"], "messages[0]"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f",
                                                                         "arguments": "{x"}}]}],
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_messages_name_the_field(small_tokenizer, messages, param):
    with pytest.raises(ChatFormatError) as caught:
        chat.render(messages, small_tokenizer)
    assert caught.value.param == param


def test_transformers_chat_template_renders_the_same_ids(small_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    small_tokenizer.save(tmp_path)
    hf_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    for messages, tools in CONVERSATIONS[:4]:
        for prompt in (False, True):
            expected = chat.render(messages, small_tokenizer, tools, add_generation_prompt=prompt)
            text = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                    add_generation_prompt=prompt)
            assert text == small_tokenizer.decode(expected)
            if "<|" in "".join(m["content"] for m in messages):
                continue  # special-token strings in text become special ids in transformers
            ids = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                                   add_generation_prompt=prompt)
            ids = ids if isinstance(ids, list) else ids["input_ids"]
            assert list(ids) == expected


def test_text_pieces_are_the_text_between_special_tokens(small_tokenizer):
    messages, tools = CONVERSATIONS[3]
    ids = chat.render(messages, small_tokenizer, tools, add_generation_prompt=False)
    special = set(range(16))
    pieces, current = [], []
    for token in ids:
        if token in special:
            if current:
                pieces.append(small_tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert chat.text_pieces(messages, tools) == pieces


def test_tool_conversations_text_source():
    from codeling.data import sources

    documents = sources.load_documents("tool-conversations", max_bytes=20_000)
    assert documents
    assert all("<|" not in document for document in documents[:5])
    assert any("# Tools\n{\"name\": " in document for document in documents)
    assert sources.source_name("tool-conversations") == "tool-conversations"
