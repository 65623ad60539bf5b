"""Tool calling through the real server and the official `openai` client.

A tiny model is fitted in a few seconds to two conversations (one that calls a tool, one that
does not), so that greedy decoding reproduces them; the server then has to turn its tokens into
OpenAI `tool_calls`, streamed and not, and feed tool results back through the chat template.
"""

from __future__ import annotations

import json

import openai
import pytest
import torch
from test_serve import CPU, ServerThread, tiny_model

from codeling import chat
from codeling.data import chat_data
from codeling.inference.engine import Engine
from codeling.serve.app import create_app

MODEL = "tools-test"
LIST_FILES = {"type": "function", "function": {
    "name": "list_files", "description": "List the files in a directory.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                   "required": ["path"]}}}
CALL = {"type": "function", "function": {"name": "list_files", "arguments": {"path": "src"}}}
CONVERSATIONS = [
    {"tools": [LIST_FILES], "messages": [
        {"role": "user", "content": "Which files are in src?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": '["main.py"]'},
        {"role": "assistant", "content": "Only main.py."}]},
    {"tools": [LIST_FILES], "messages": [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"}]},
]


@pytest.fixture(scope="module")
def fitted_engine(small_tokenizer):
    """An engine whose model reproduces CONVERSATIONS under greedy decoding."""
    model = tiny_model(small_tokenizer.vocab_size, max_seq_len=256).train()
    examples = chat_data.tokenize_conversations(CONVERSATIONS, small_tokenizer, 256, "fit")
    inputs, targets = chat_data.examples_to_batch(examples, 256, small_tokenizer.pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(200):
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]),
                                                 targets.view(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05, f"the tiny model did not fit the conversations (loss {loss:.3f})"
    return Engine(model.eval(), small_tokenizer, CPU, max_batch_size=4)


@pytest.fixture(scope="module")
def client(fitted_engine):
    with ServerThread(create_app(fitted_engine, MODEL)) as server:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                           timeout=60) as opened:
            yield opened


def ask(client, messages, **fields):
    return client.chat.completions.create(model=MODEL, messages=messages, tools=[LIST_FILES],
                                          temperature=0, max_tokens=40, **fields)


def test_tool_call_is_returned_as_tool_calls(client):
    response = ask(client, [{"role": "user", "content": "Which files are in src?"}])
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "list_files"
    assert json.loads(call.function.arguments) == {"path": "src"}
    assert not choice.message.content
    assert response.usage.completion_tokens > 0


def test_streamed_tool_call_matches(client):
    stream = ask(client, [{"role": "user", "content": "Which files are in src?"}], stream=True)
    calls, reasons, content = [], [], ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"]
    assert content == ""
    (call,) = calls
    assert call.index == 0
    assert call.function.name == "list_files"
    assert json.loads(call.function.arguments) == {"path": "src"}


def test_tool_result_leads_to_an_answer(client):
    first = ask(client, [{"role": "user", "content": "Which files are in src?"}])
    call = first.choices[0].message.tool_calls[0]
    messages = [{"role": "user", "content": "Which files are in src?"},
                first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": '["main.py"]'}]
    answer = ask(client, messages)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "Only main.py."
    assert answer.choices[0].message.tool_calls is None


def test_plain_answer_and_tool_choice_none(client):
    hello = ask(client, [{"role": "user", "content": "Say hello."}])
    assert hello.choices[0].message.content == "Hello!"
    assert hello.choices[0].finish_reason == "stop"
    forced = ask(client, [{"role": "user", "content": "Which files are in src?"}],
                 tool_choice="none")
    assert forced.choices[0].message.tool_calls is None
    assert forced.choices[0].finish_reason in ("stop", "length")


def test_engine_streams_no_call_text(fitted_engine, small_tokenizer):
    from codeling.inference.engine import Finished, SamplingParams, TextDelta

    prompt = chat.render(CONVERSATIONS[0]["messages"][:1], small_tokenizer, [LIST_FILES])
    with Engine(fitted_engine.model, small_tokenizer, CPU) as engine:  # the server owns its own
        handle = engine.submit(prompt, SamplingParams(max_tokens=40, temperature=0,
                                                      tool_calls=True))
        events = list(handle.events(timeout=60))
    assert not [event for event in events if isinstance(event, TextDelta)]
    (final,) = [event for event in events if isinstance(event, Finished)]
    assert chat.parse_assistant(final.token_ids, small_tokenizer)["tool_calls"] == [CALL]
