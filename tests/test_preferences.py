"""Preference data: public layouts, completion masks, the loader, verified code and tool pairs,
`codeling data preferences`, and the preferences and execution eval suites."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import pytest
import torch
from runs import tiny_run_config, write_config

from codeling import chat
from codeling.cli import main
from codeling.data import preference_builder as builder
from codeling.data import preferences
from codeling.data.chat_data import IGNORE_INDEX, tool_dataset_dir
from codeling.data.code_tasks import check_solution, load_code_tasks
from codeling.data.preferences import PreferenceLoader
from codeling.data.tool_data import generate_tool_dataset
from codeling.errors import CodelingError
from codeling.evaluation.execution import code_prompt
from codeling.inference.tool_calls import validate_call
from codeling.training import checkpoint as ckpt

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]

# -- layouts ----------------------------------------------------------------------------------------

USER = {"role": "user", "content": "What is 2 + 2?"}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}

LAYOUTS = {
    "prompt strings": {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
    "conversations": {"chosen": [USER, GOOD], "rejected": [USER, BAD]},
    "ultrafeedback": {"prompt": "What is 2 + 2?", "chosen": [USER, GOOD],
                      "rejected": [USER, BAD], "messages": [USER, GOOD], "score_chosen": 8.0},
    "messages": {"messages": [USER], "chosen": GOOD, "rejected": "5"},
    "messages, one-item lists": {"messages": [USER], "chosen": [GOOD], "rejected": [BAD]},
    "hh transcript": {"chosen": "\n\nHuman: What is 2 + 2?\n\nAssistant: 4",
                      "rejected": "\n\nHuman: What is 2 + 2?\n\nAssistant: 5"},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_normalize_to_one_pair(layout):
    pair = preferences.normalize_record(LAYOUTS[layout])
    assert pair.prompt == [USER]
    assert pair.chosen == GOOD
    assert pair.rejected == BAD
    assert pair.tools is None


def test_multi_turn_conversations_split_at_the_last_response():
    history = [{"role": "system", "content": "Be brief."}, USER, GOOD,
               {"role": "user", "content": "And 3 + 3?"}]
    pair = preferences.normalize_record({
        "chosen": history + [{"role": "assistant", "content": "6"}],
        "rejected": history + [{"role": "assistant", "content": "7"}]})
    assert pair.prompt == history
    assert pair.chosen["content"] == "6"


def test_tool_call_responses_are_canonical():
    openai_call = {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    pair = preferences.normalize_record({
        "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS,
        "chosen": {"role": "assistant", "content": None, "tool_calls": [openai_call]},
        "rejected": {"role": "assistant", "content": "It is sunny."}})
    assert pair.chosen == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert pair.tools == TOOLS
    again = preferences.normalize_record(json.loads(json.dumps(pair.to_record())))
    assert again == pair


BAD_RECORDS = [
    ('{"prompt": "x", "chosen": "a"}', "missing rejected"),
    ('{"prompt": "x", "chosen": "a", "rejected": "a"}', "the same response"),
    ('{"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}',
     "differ at message 0"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}], '
     '"chosen": "b", "rejected": "c"}', "ends with assistant"),
    ('{"messages": [{"role": "robot", "content": "x"}], "chosen": "b", "rejected": "c"}',
     "role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}], "chosen": {"role": "user", "content": '
     '"b"}, "rejected": "c"}', "must be an assistant message"),
    ('{"chosen": "plain", "rejected": "text"}', "HH transcript"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "x", "chosen": "a", "rejected": ', "invalid JSON"),
]


@pytest.mark.parametrize("line, message", BAD_RECORDS)
def test_bad_records_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(LAYOUTS["prompt strings"]) + "\n\n" + line + "\n")
    with pytest.raises(CodelingError) as error:
        preferences.read_preferences(path)
    assert f"{path}:3:" in str(error.value)
    assert message in str(error.value)


def test_preferences_spec_sets_build_options():
    settings = builder.build_settings_of("preferences:code_tasks=100,samples=2", seed=5)
    assert settings.code_limit == 100
    assert settings.samples == 2
    assert settings.seed == 5
    assert builder.build_settings_of("preferences").code_limit == 0
    with pytest.raises(CodelingError, match="invalid option 'tasks=3'"):
        builder.build_settings_of("preferences:tasks=3")
    with pytest.raises(CodelingError, match="at least 1"):
        builder.build_settings_of("preferences:samples=0")


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CodelingError, match="preference file not found"):
        preferences.read_preferences(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(CodelingError, match="no preference records"):
        preferences.read_preferences(tmp_path / "empty.jsonl")


# -- rendering and batching -----------------------------------------------------------------------


def test_mask_covers_exactly_the_response_turn(small_tokenizer):
    prompt = [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": "Weather in Oslo?"}]
    response = {"role": "assistant", "content": "", "tool_calls": [CALL]}
    ids, mask = preferences.render_completion(prompt, response, small_tokenizer, TOOLS)
    assert ids == chat.render([*prompt, response], small_tokenizer, TOOLS,
                              add_generation_prompt=False)
    scored = [token for token, flag in zip(ids, mask) if flag]
    assert small_tokenizer.decode(scored) == (
        '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Oslo"}}<|end_turn|>')
    prompt_ids = chat.render(prompt, small_tokenizer, TOOLS)
    assert mask == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert ids[len(prompt_ids) - 1] == small_tokenizer.token_id("<|assistant|>")


def test_batch_rows_pair_up(small_tokenizer):
    pairs = [preferences.normalize_record({"prompt": f"q{i}", "chosen": f"yes {i}",
                                           "rejected": f"no, never {i}"}) for i in range(3)]
    examples = preferences.tokenize_pairs(pairs, small_tokenizer, 64, "test")
    inputs, targets = preferences.pairs_to_batch(examples, 64, small_tokenizer.pad_id)
    assert inputs.shape[0] == 6
    for row, example in enumerate(examples):
        for ids, batch_row in ((example.chosen_ids, row), (example.rejected_ids, row + 3)):
            size = len(ids) - 1
            assert inputs[batch_row, :size].tolist() == ids[:-1].tolist()
            scored = targets[batch_row][targets[batch_row] != IGNORE_INDEX].tolist()
            assert small_tokenizer.decode(scored).endswith("<|end_turn|>")
    assert small_tokenizer.decode(targets[0][targets[0] != IGNORE_INDEX].tolist()) == \
        "yes 0<|end_turn|>"


def test_long_pairs_are_dropped(small_tokenizer, caplog):
    pairs = [preferences.normalize_record({"prompt": "q", "chosen": "a", "rejected": "b"}),
             preferences.normalize_record({"prompt": "q", "chosen": "a", "rejected": "b " * 200})]
    assert len(preferences.tokenize_pairs(pairs, small_tokenizer, 64, "test")) == 1
    assert "dropped 1 of 2 pairs longer than 64 tokens" in caplog.text


def test_loader_resumes_and_shards_by_rank(small_tokenizer):
    pairs = [preferences.normalize_record({"prompt": f"q{i}", "chosen": f"a{i}",
                                           "rejected": f"b{i}"}) for i in range(10)]
    examples = preferences.tokenize_pairs(pairs, small_tokenizer, 64, "test")
    pad = small_tokenizer.pad_id
    first = PreferenceLoader(examples, 3, 64, pad, seed=1)
    for _ in range(4):
        next(first)
    second = PreferenceLoader(examples, 3, 64, pad, seed=1)
    second.load_state_dict(first.state_dict())
    assert second.batches_per_epoch == pytest.approx(10 / 3)
    for _ in range(5):  # past the end of an epoch
        a, b = next(first), next(second)
        assert torch.equal(a[0], b[0])
        assert torch.equal(a[1], b[1])
    whole = PreferenceLoader(examples, 4, 64, pad, seed=2)
    ranks = [PreferenceLoader(examples, 2, 64, pad, seed=2, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(3):
        inputs, _ = next(whole)
        parts = [next(loader)[0] for loader in ranks]
        for row in range(4):  # chosen rows of the global batch
            part = parts[row // 2]
            for whole_row, part_row in ((row, row % 2), (row + 4, row % 2 + 2)):
                assert inputs[whole_row][inputs[whole_row] != pad].tolist() == \
                    part[part_row][part[part_row] != pad].tolist()
    with pytest.raises(CodelingError, match="global batch size"):
        PreferenceLoader(examples, 3, 64, pad, seed=1).load_state_dict(
            PreferenceLoader(examples, 4, 64, pad, seed=1).state_dict())


# -- verified code pairs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def add_task():
    return next(task for task in load_code_tasks("train") if task.entry_point == "add")


def test_normalized_references_pass(add_task):
    tasks = [add_task] + load_code_tasks("train")[::60]
    for task in tasks:
        result = check_solution(task, builder.normalized_solution(task))
        assert result.passed, (task.task_id, result.detail)


def test_mutants_fail_as_their_kind_says(add_task):
    rng = random.Random(0)
    wrong = builder.code_mutants(add_task, rng, "wrong_result")
    assert wrong and all(mutant != add_task.solution for mutant in wrong)
    assert check_solution(add_task, wrong[0]).reason in ("wrong_result", "error")
    for mutant in builder.code_mutants(add_task, rng, "syntax_error"):
        assert check_solution(add_task, mutant).reason == "syntax_error"
    (loop,) = builder.code_mutants(add_task, rng, "timeout")
    assert check_solution(add_task, loop, timeout=1.0).reason == "timeout"


def test_code_prompt_is_a_user_turn(add_task):
    (message,) = code_prompt(add_task)
    assert message["role"] == "user"
    assert message["content"].endswith(add_task.prompt)


# -- verified tool pairs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tools") / "tool-conversations"
    generate_tool_dataset(folder, seed=3, train_examples=120, val_examples=10, test_examples=30)
    return folder


def test_tool_pairs_are_wrong_as_labelled(tool_dir):
    from codeling.data.chat_data import read_conversations

    records = read_conversations(tool_dir / "train.jsonl")
    pairs = builder.tool_pairs(records, 100, random.Random(0))
    kinds = Counter(pair.kind for pair in pairs)
    assert set(kinds) == {f"tool/{kind}" for kind in (*builder.TOOL_CALL_KINDS, "unneeded_call",
                                                      "missing_call")}
    # The two kinds that decide whether a turn starts with a call are balanced.
    assert abs(kinds["tool/missing_call"] - kinds["tool/unneeded_call"]) <= 1
    for pair in pairs:
        assert pair.origin == {"chosen": "data", "rejected": "mutation"}
        chosen_calls = pair.chosen.get("tool_calls") or []
        rejected_calls = pair.rejected.get("tool_calls") or []
        kind = pair.kind.split("/")[1]
        if kind == "missing_call":
            assert chosen_calls
            assert not rejected_calls
            assert pair.rejected["content"]
            continue
        assert all(not validate_call(call, pair.tools) for call in chosen_calls)
        problems = [validate_call(call, pair.tools) for call in rejected_calls]
        if kind in ("missing_argument", "invalid_value"):
            assert any(problems)
        else:
            assert not any(problems)
        if kind == "unneeded_call":
            assert not chosen_calls
        if kind == "wrong_tool":
            assert {c["function"]["name"] for c in rejected_calls} != \
                {c["function"]["name"] for c in chosen_calls}
        if kind == "wrong_argument":
            assert [c["function"]["name"] for c in rejected_calls] == \
                [c["function"]["name"] for c in chosen_calls]
            assert rejected_calls != chosen_calls


# -- building the set and the eval suites on a tiny run -------------------------------------------


@pytest.fixture(scope="module")
def built_run(tool_dir, tmp_path_factory):
    """A tiny run whose context fits the code prompts, with a preference set built from it."""
    base = tmp_path_factory.mktemp("prefs")
    run_dir = base / "run"
    raw = tiny_run_config(run_dir, max_steps=2, eval_every=0, checkpoint_every=0)
    raw["model"]["max_seq_len"] = 256
    assert main(["train", "--config", str(write_config(base / "run.yaml", raw))]) == 0
    shutil.copytree(tool_dir, tool_dataset_dir(run_dir))
    out = run_dir / "data" / "preferences"
    assert main(["data", "preferences", "--run", str(run_dir), "--out", str(out),
                 "--samples", "2", "--code-limit", "3", "--tool-train", "12",
                 "--tool-test", "6"]) == 0
    return run_dir


def test_data_preferences_writes_verified_splits(built_run, capsys):
    out = built_run / "data" / "preferences"
    manifest = json.loads((out / "manifest.json").read_text())
    test_ids = {task.task_id for task in load_code_tasks("test")}
    for split, tools in (("train", 12), ("test", 6)):
        pairs = preferences.read_preferences(out / f"{split}.jsonl")
        summary = manifest["splits"][split]
        assert summary["pairs"] == len(pairs)
        assert sum(summary["kinds"].values()) == len(pairs)
        assert sum(summary["origins"].values()) == len(pairs)
        code = [pair for pair in pairs if pair.kind.startswith("code/")]
        assert len(pairs) - len(code) == tools
        assert len(code) >= 3  # one per task at least
        for pair in code:
            task_id = pair.id[len("code/"):]
            assert (task_id in test_ids) == (split == "test")
            task = next(t for t in load_code_tasks(split) if t.task_id == task_id)
            assert check_solution(task, pair.chosen["content"]).passed
            rejected = check_solution(task, pair.rejected["content"], timeout=3.0)
            assert not rejected.passed
            assert pair.kind == f"code/{rejected.reason}"
    with pytest.raises(CodelingError, match="not empty"):
        builder.build_preference_dataset(built_run, out, built_run)


def test_preferences_suite_scores_the_held_out_pairs(built_run):
    from codeling.evaluation.preferences import evaluate_preferences, report_section
    from codeling.inference.generate import Generator

    data_file = preferences.preference_dataset_dir(built_run) / "test.jsonl"
    generator = Generator.from_checkpoint(built_run)
    result = evaluate_preferences(generator, data_file, ckpt.resolve_checkpoint(built_run))
    pairs = preferences.read_preferences(data_file)
    assert result["all"]["pairs"] + result["skipped_too_long"] == len(pairs)
    assert result["all"]["pairs"] > 0
    assert 0.0 <= result["all"]["logp_accuracy"] <= 1.0
    assert result["reference"] is None  # the code stage was not tuned with DPO
    assert sum(kind["pairs"] for kind in result["kinds"].values()) == result["all"]["pairs"]
    lines = report_section("code", result)
    assert lines[0] == "## Held-out preference pairs (code)"


def test_execution_suite_runs_both_modes(built_run):
    from codeling.evaluation.execution import evaluate_execution, report_section
    from codeling.inference.generate import Generator

    generator = Generator.from_checkpoint(built_run)
    result = evaluate_execution(generator, samples=2, max_new_tokens=8, limit=2)
    again = evaluate_execution(generator, samples=2, max_new_tokens=8, limit=2)
    for mode in ("chat", "completion"):
        summary = result["modes"][mode]
        assert summary["tasks"] == 2
        assert sum(summary["reasons"].values()) == pytest.approx(1.0)
        assert summary["examples"] == again["modes"][mode]["examples"]  # seeded sampling
    assert report_section("code", result)[0] == "## Execution of sampled code (code)"


def test_rlhf_stage_trains_on_the_built_set(built_run, tmp_path):
    from codeling.config import config_from_dict
    from codeling.stages.pretrain import run_training

    raw = tiny_run_config(built_run, objective="dpo", max_steps=2, seq_len=256, eval_every=0,
                          checkpoint_every=0, seed=0)
    spec = "preferences:code_tasks=3,samples=2,tool_train=12,tool_test=6"  # as built above
    raw.update(stage="rlhf", init_from="code", data={"sources": [spec], "val_fraction": 0.2})
    raw["model"]["max_seq_len"] = 256
    other = {**raw, "data": {"sources": ["preferences:samples=3"]}}
    with pytest.raises(CodelingError, match="built with samples=2, code_limit=3"):
        run_training(config_from_dict(other))
    result = run_training(config_from_dict(raw))
    assert result.step == 2
    assert (built_run / "rlhf" / "done.json").is_file()
    records = [json.loads(line) for line in
               (built_run / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_accuracy" in record for record in records if "loss" in record)


def test_eval_stage_scores_tools_before_rlhf(built_run, monkeypatch):
    from codeling.evaluation import suite

    for stage in ("tools", "rlhf"):
        if not (built_run / stage).exists():
            shutil.copytree(built_run / "code", built_run / stage)
    scored = {}

    def record(checkpoint, config, run_dir=None):
        scored[checkpoint.parents[1].name] = list(config.suites)
        return {"checkpoint": str(checkpoint)}

    monkeypatch.setattr(suite, "run_suites", record)
    config = suite.build_eval_config({"suites": list(suite.SUITES)})
    suite.run_eval_stage(built_run, config)
    assert scored["code"] == ["bpb", "copying"]
    assert scored["tools"] == ["bpb", "copying", "humaneval", "tools", "preferences",
                               "execution"]
    assert scored["rlhf"] == list(suite.SUITES)
