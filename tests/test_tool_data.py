"""Tests for the synthetic tool conversations and `codeling data tools`."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import jsonschema
import pytest

from codeling import chat
from codeling.cli import main
from codeling.data.tool_data import (
    CLOSERS,
    CONNECTORS,
    CONTEXTS,
    EVAL_CONNECTORS,
    HELD_OUT_TOOLS,
    KIND_SHARES,
    KINDS,
    OPENERS,
    SPLITS,
    generate_tool_dataset,
    iter_records,
    load_conversations,
)
from codeling.data.tool_schemas import (
    TOOLS,
    TOOLS_BY_NAME,
    Template,
    check_library,
    execute_snippet,
    phrasing_key,
    text_of,
)
from codeling.errors import CodelingError
from codeling.tools import BUILTIN_TOOLS, ToolBox

SMALL = {"train_examples": 400, "val_examples": 100, "test_examples": 100}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict, dict[str, list[dict]]]:
    """A small generated dataset: (directory, manifest, records per split)."""
    out = tmp_path_factory.mktemp("tools") / "data"
    manifest = generate_tool_dataset(out, seed=3, **SMALL)
    records = {split: load_conversations(out / f"{split}.jsonl") for split in SPLITS}
    return out, manifest, records


def all_records(records: dict[str, list[dict]]) -> list[dict]:
    return [record for split in SPLITS for record in records[split]]


def calls_of(record: dict) -> list[dict]:
    return [call["function"] for message in record["messages"]
            for call in message.get("tool_calls", [])]


def user_texts(record: dict) -> list[str]:
    return [message["content"] for message in record["messages"] if message["role"] == "user"]


# The tool library


def test_library_is_consistent():
    assert check_library() == []
    assert 25 <= len(TOOLS) <= 35
    assert {tool.group for tool in TOOLS} == {"developer", "everyday"}


def test_builtin_tools_match_chat_specs():
    for spec in BUILTIN_TOOLS:
        name = spec["function"]["name"]
        assert TOOLS_BY_NAME[name].spec() == spec, name
    assert not set(HELD_OUT_TOOLS) & {spec["function"]["name"] for spec in BUILTIN_TOOLS}


def test_tool_specs_are_valid_json_schema():
    for tool in TOOLS:
        jsonschema.Draft202012Validator.check_schema(tool.spec()["function"]["parameters"])


def test_sampled_values_match_param_types():
    rng = random.Random(0)
    for tool in TOOLS:
        validator = jsonschema.Draft202012Validator(tool.spec()["function"]["parameters"])
        for _ in range(30):
            validator.validate(tool.sample_values(rng))


def test_check_library_finds_bad_template():
    tool = TOOLS_BY_NAME["get_weather"]
    broken = type(tool)(**{**vars(tool), "requests": tool.requests + (
        type(tool.requests[0])("get_weather/t99", "Weather in {town}?"),)})
    problems = check_library((broken,))
    assert any("unknown placeholders ['town']" in problem for problem in problems)
    assert any("required ['city'] not in 'Weather in {town}?'" in problem
               for problem in problems)


def test_choice_groups_expand_to_every_combination():
    template = Template("t/t0", "[please |]show me [the file |]{path}[ now|].")
    texts = sorted(plain.text for plain in template.expansions())
    assert texts == ["Please show me the file {path} now.", "Please show me the file {path}.",
                     "Please show me {path} now.", "Please show me {path}.",
                     "Show me the file {path} now.", "Show me the file {path}.",
                     "Show me {path} now.", "Show me {path}."]
    rng = random.Random(0)
    drawn = {template.expand(rng).text for _ in range(200)}
    assert drawn == set(texts)
    assert template.expand(rng).fields == ("path",)
    plain = Template("t/t1", "Read {path}.")
    assert plain.expand(rng) is plain  # nothing to choose, nothing drawn


def test_choice_alternatives_may_hold_placeholders():
    tool = TOOLS_BY_NAME["search_code"]
    template = Template("search_code/t99", "Search [the code|{path}] for `{pattern}`.")
    calls = [tool.arguments(plain, {"pattern": "TODO", "path": "src"})
             for plain in template.expansions()]
    assert calls == [{"pattern": "TODO"}, {"pattern": "TODO", "path": "src"}]


def test_library_templates_expand_cleanly():
    for tool in TOOLS:
        for template in tool.requests + tool.eval_requests + tool.vague + tool.eval_vague:
            for plain in template.expansions():
                assert not {"[", "]", "|"} & set(plain.text), plain.text
                assert "  " not in plain.text, plain.text
                assert not plain.text[:1].islower(), plain.text
    # The grammars make many more training phrasings than fixed strings would.
    phrasings = sum(len(list(t.expansions())) for tool in TOOLS for t in tool.requests)
    assert phrasings > 10 * sum(len(tool.requests) for tool in TOOLS)


def test_check_library_finds_malformed_choices():
    tool = TOOLS_BY_NAME["get_weather"]
    broken = type(tool)(**{**vars(tool), "requests": tool.requests + (
        Template("get_weather/t99", "Weather in [{city}|there."),)})
    problems = check_library((broken,))
    assert sum("unbalanced or nested" in problem for problem in problems) == 1


def test_check_library_finds_phrasing_leak():
    tool = TOOLS_BY_NAME["get_weather"]
    leaked = Template("get_weather/t99", "[Could you tell me|Tell me] the weather in {city}.")
    evaluation = Template("get_weather/e9", "Please, tell me the weather in {city}!")
    broken = type(tool)(**{**vars(tool), "requests": tool.requests + (leaked,),
                           "eval_requests": tool.eval_requests + (evaluation,)})
    problems = check_library((broken,))
    assert problems == ["get_weather/e9: evaluation phrasing 'Please, tell me the weather in "
                        "{city}!' equals the training phrasing 'Tell me the weather in {city}.' "
                        "of get_weather/t99"]
    assert phrasing_key("Can you tell ME the weather in {city}, please?") == \
        "tell weather in {city}"


# Generated records


def test_same_seed_writes_identical_files(tmp_path):
    first = generate_tool_dataset(tmp_path / "a", seed=5, train_examples=200, val_examples=50,
                                  test_examples=50)
    second = generate_tool_dataset(tmp_path / "b", seed=5, train_examples=200, val_examples=50,
                                   test_examples=50)
    other = generate_tool_dataset(tmp_path / "c", seed=6, train_examples=200, val_examples=50,
                                  test_examples=50)
    assert first == second
    for name in ("train.jsonl", "val.jsonl", "test_seen.jsonl", "test_unseen.jsonl",
                 "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl"
                                                             ).read_bytes()
    assert other["splits"]["train"]["sha256"] != first["splits"]["train"]["sha256"]


def test_every_call_matches_its_schema(dataset):
    _, _, records = dataset
    validators = {tool.name: jsonschema.Draft202012Validator(tool.spec()["function"]["parameters"])
                  for tool in TOOLS}
    checked = 0
    for record in all_records(records):
        for tool in record["tools"]:
            assert tool == TOOLS_BY_NAME[tool["function"]["name"]].spec()
        for call in calls_of(record):
            validators[call["name"]].validate(call["arguments"])
            checked += 1
    assert checked > 500


def test_argument_values_appear_in_user_text(dataset):
    _, _, records = dataset
    for record in all_records(records):
        if record["kind"] != "single_call":
            continue
        text = user_texts(record)[0]
        call = calls_of(record)[0]
        for name, value in call["arguments"].items():
            if isinstance(value, bool):
                continue  # booleans come from the wording, as in "verbosely"
            items = value if isinstance(value, list) else [value]
            for item in items:
                assert text_of(item) in text, (record["id"], name, item, text)


def test_listed_tools_and_system_turn(dataset):
    _, _, records = dataset
    for record in all_records(records):
        names = [tool["function"]["name"] for tool in record["tools"]]
        assert 2 <= len(names) <= 6, record["id"]
        assert len(set(names)) == len(names), record["id"]
        assert {call["name"] for call in calls_of(record)} <= set(names)
        system = record["messages"][0]
        assert system["role"] == "system"
        assert 0 < len(system["content"]) < 100


def test_iter_records_matches_train_file(dataset):
    _, manifest, records = dataset
    count = manifest["counts"]["train"]
    assert list(iter_records("train", count, seed=3)) == records["train"]
    with pytest.raises(CodelingError, match="unknown split 'dev'"):
        iter_records("dev", count)


def test_kinds_follow_shares(dataset):
    _, manifest, records = dataset
    for split in SPLITS:
        count = manifest["counts"][split]
        kinds = manifest["splits"][split]["kinds"]
        assert sum(kinds.values()) == count == len(records[split])
        for kind in KINDS:
            assert abs(kinds[kind] - count * KIND_SHARES[kind]) <= 1, (split, kind)


def test_kinds_have_their_shape(dataset):
    _, _, records = dataset
    for record in all_records(records):
        messages = record["messages"]
        calls = [message for message in messages if message.get("tool_calls")]
        kind = record["kind"]
        if kind == "single_call":
            assert len(calls) == 1 and len(calls[0]["tool_calls"]) == 1
            assert messages[-1] is calls[0]
        elif kind == "parallel_calls":
            assert 2 <= len(calls[0]["tool_calls"]) <= 3
            arguments = [json.dumps(call, sort_keys=True) for call in calls[0]["tool_calls"]]
            assert len(set(arguments)) == len(arguments)
        elif kind == "multi_turn":
            assert any(message["role"] == "tool" for message in messages)
            assert "tool_calls" not in messages[-1] and messages[-1]["content"]
        elif kind == "no_tool":
            assert not calls
            assert messages[-1]["role"] == "assistant" and messages[-1]["content"]
        else:
            question = messages[2]
            assert "tool_calls" not in question and question["content"].endswith("?")
            assert len(messages) in (3, 5)


def test_results_come_from_the_arguments(dataset):
    _, _, records = dataset
    for record in all_records(records):
        messages = record["messages"]
        for position, message in enumerate(messages):
            for offset, call in enumerate(message.get("tool_calls", [])):
                if position + 1 + offset >= len(messages):
                    break
                result = messages[position + 1 + offset]["content"]
                arguments = call["function"]["arguments"]
                if call["function"]["name"] == "calculator":
                    expected = eval(arguments["expression"], {"__builtins__": {}})  # noqa: S307
                    assert json.loads(result)["result"] == pytest.approx(expected, abs=0.01)
                if call["function"]["name"] == "run_python":
                    stdout, _, exit_code = execute_snippet(arguments["code"])
                    assert json.loads(result)["stdout"] == stdout
                    assert json.loads(result)["exit_code"] == exit_code


def test_simulated_results_match_real_tools(tmp_path):
    rng = random.Random(1)
    box = ToolBox(tmp_path)
    python = TOOLS_BY_NAME["run_python"]
    snippets = {python.sample_values(rng)["code"] for _ in range(200)}
    failing = sorted(code for code in snippets if execute_snippet(code)[2])[:3]
    passing = sorted(code for code in snippets if not execute_snippet(code)[2])[:4]
    assert len(failing) == 3 and len(passing) == 4
    for code in failing + passing:
        simulated = json.loads(python.respond({"code": code}, rng)[0])
        real = json.loads(box.call("run_python", {"code": code}))
        assert simulated["stdout"] == real["stdout"], code
        assert simulated["exit_code"] == real["exit_code"], code
        assert simulated["stderr"].splitlines()[-1:] == real["stderr"].splitlines()[-1:], code
    writer = TOOLS_BY_NAME["write_file"]
    for _ in range(3):
        arguments = writer.sample_values(rng)
        simulated = writer.respond(arguments, rng)[0]
        assert simulated == box.call("write_file", arguments)


# Held-out tools and phrasings


def test_held_out_tools_never_in_train_or_val(dataset):
    _, manifest, records = dataset
    for split in ("train", "val", "test_seen"):
        for record in records[split]:
            listed = {tool["function"]["name"] for tool in record["tools"]}
            assert not listed & set(HELD_OUT_TOOLS), (split, record["id"])
        assert not set(manifest["splits"][split]["listed_tools"]) & set(HELD_OUT_TOOLS)
    assert sorted(manifest["held_out_tools"]) == sorted(HELD_OUT_TOOLS)


def test_unseen_split_calls_only_held_out_tools(dataset):
    _, manifest, records = dataset
    assert set(manifest["splits"]["test_unseen"]["called_tools"]) == set(HELD_OUT_TOOLS)
    for record in records["test_unseen"]:
        listed = {tool["function"]["name"] for tool in record["tools"]}
        assert listed & set(HELD_OUT_TOOLS), record["id"]
        assert {call["name"] for call in calls_of(record)} <= set(HELD_OUT_TOOLS)


def test_held_out_phrasings_only_in_test_seen(dataset):
    _, manifest, records = dataset
    held_out = set(manifest["held_out_templates"])
    assert len(held_out) > 60
    for split in ("train", "val"):
        for record in records[split]:
            assert record["templates"]
            assert not set(record["templates"]) & held_out, (split, record["id"])
    for record in records["test_seen"]:
        assert set(record["templates"]) <= held_out, record["id"]
    train_texts = {text for record in records["train"] + records["val"]
                   for text in user_texts(record)}
    for record in records["test_seen"]:
        assert user_texts(record)[0] not in train_texts, record["id"]


def test_openers_only_in_training(dataset):
    _, _, records = dataset

    def dressed(split: str, starts: tuple[str, ...], ends: tuple[str, ...] = ()) -> int:
        requests = [user_texts(record)[0] for record in records[split]
                    if record["kind"] in ("single_call", "parallel_calls", "multi_turn")]
        return sum(text.startswith(starts) or text.endswith(ends) for text in requests)

    assert dressed("train", OPENERS, CLOSERS) > 0.1 * 0.7 * len(records["train"])
    assert dressed("train", CONTEXTS) > 0.02 * 0.7 * len(records["train"])
    for split in ("test_seen", "test_unseen"):
        assert dressed(split, OPENERS + CONTEXTS, CLOSERS) == 0


def test_val_differs_from_train(dataset):
    _, _, records = dataset

    def key(record: dict) -> str:
        return json.dumps([record["tools"], record["messages"]], sort_keys=True)

    train = {key(record) for record in records["train"]}
    assert not any(key(record) in train for record in records["val"])


# Reading, rendering and the command line


def test_load_conversations_names_bad_line(tmp_path, dataset):
    _, _, records = dataset
    good = json.dumps(records["train"][0])
    bad_records = {
        "not json": "invalid JSON",
        json.dumps({**records["train"][0], "kind": "chitchat"}): "invalid kind 'chitchat'",
        json.dumps({k: v for k, v in records["train"][0].items() if k != "messages"}):
            "missing field 'messages'",
        json.dumps({**records["train"][0], "messages": [
            {"role": "user", "content": "hi"}, {"role": "tool", "content": "x"},
            {"role": "assistant", "content": "ok"}]}): "without a pending tool call",
        json.dumps({**records["train"][0], "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "nope", "arguments": {}}}]}]}):
            "does not list",
    }
    for bad, message in bad_records.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n" + bad + "\n", encoding="utf-8")
        with pytest.raises(CodelingError) as error:
            load_conversations(path)
        assert f"{path}:2:" in str(error.value)
        assert message in str(error.value)


def test_records_render_and_parse_back(dataset, small_tokenizer):
    _, _, records = dataset
    for record in all_records(records)[::4]:
        ids = chat.render(record["messages"], small_tokenizer, record["tools"],
                          add_generation_prompt=False)
        assert chat.parse(ids, small_tokenizer) == (record["messages"], record["tools"])


def test_generate_rejects_non_empty_directory(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    generate_tool_dataset(out, train_examples=20, val_examples=5, test_examples=5)
    with pytest.raises(CodelingError, match="not empty"):
        generate_tool_dataset(out, train_examples=20, val_examples=5, test_examples=5)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]
    with pytest.raises(CodelingError, match="train_examples"):
        generate_tool_dataset(tmp_path / "other", train_examples=0)


def test_cli_writes_splits(tmp_path, capsys):
    out = tmp_path / "tools"
    argv = ["data", "tools", "--out", str(out), "--seed", "2", "--train-examples", "60",
            "--val-examples", "20", "--test-examples", "20"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith(f"{out / 'train.jsonl'}: 60 examples (single_call 24,")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 2
    assert manifest["counts"] == {"train": 60, "val": 20, "test_seen": 20, "test_unseen": 20}
    assert len(load_conversations(out / "test_unseen.jsonl")) == 20

    assert main(argv) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_connectors_start_with_first_request():
    # Three requests are joined by two connectors, so text before {a} would appear twice.
    for template_id, text in CONNECTORS + EVAL_CONNECTORS:
        assert text.startswith("{a}"), template_id


def test_evaluation_connectors_use_unseen_words():
    def joining_words(text):
        between = text.removeprefix("{a}").split("{b")[0]
        return " ".join(re.findall(r"[a-z']+", between.lower()))

    training = [joining_words(text) for _, text in CONNECTORS]
    for template_id, text in EVAL_CONNECTORS:
        held_out = joining_words(text)
        assert held_out, template_id
        for words in training:
            assert f" {held_out} " not in f" {words} ", (template_id, words)
