"""`codeling chat`: the tool loop with a scripted model, and the command end to end."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from codeling import chat
from codeling.chat_session import ChatSession
from codeling.cli import main
from codeling.errors import CodelingError
from codeling.inference.generate import GenerationConfig
from codeling.tokenizer import Tokenizer
from codeling.tools import ToolBox, ToolLimits


def call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


class ScriptedGenerator:
    """A stand-in model that returns fixed assistant turns, rendered by `codeling.chat`.

    Each turn is a canonical assistant message, or raw text for a tool call that is not JSON.
    `prompts` keeps every prompt it was given, so tests can check what the model saw.
    """

    def __init__(self, tokenizer: Tokenizer, turns: list[dict[str, Any] | str]):
        self.tokenizer = tokenizer
        self.turns = list(turns)
        self.prompts: list[list[int]] = []
        self.settings: list[tuple[GenerationConfig, Any, bool]] = []

    def generate_turn(self, prompt_ids: list[int], config: GenerationConfig,
                      tools: list[dict[str, Any]] | None, constrained: bool) -> list[int]:
        self.prompts.append(list(prompt_ids))
        self.settings.append((config, tools, constrained))
        if not self.turns:
            raise AssertionError("the chat asked for more turns than the script has")
        turn = self.turns.pop(0)
        if isinstance(turn, str):
            return [self.tokenizer.token_id("<|tool_call|>"), *self.tokenizer.encode(turn),
                    self.tokenizer.token_id("<|end_turn|>")]
        ids, mask = chat.render_with_mask([{"role": "user", "content": "x"}, turn],
                                          self.tokenizer)
        return [token for token, produced in zip(ids, mask) if produced]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    directory = tmp_path / "work"
    directory.mkdir()
    return directory


def new_session(tokenizer: Tokenizer, turns: list, workdir: Path | None,
                **options: Any) -> tuple[ChatSession, ScriptedGenerator, io.StringIO]:
    generator = ScriptedGenerator(tokenizer, turns)
    output = io.StringIO()
    toolbox = ToolBox(workdir, ToolLimits(timeout=2)) if workdir is not None else None
    session = ChatSession(generator, GenerationConfig(temperature=0), toolbox=toolbox,
                          output=output, **options)
    return session, generator, output


def test_tool_call_executes_and_result_fed_back(small_tokenizer, workdir: Path):
    (workdir / "data.txt").write_text("hello tools\n")
    turns = [
        {"role": "assistant", "content": "Let me look.",
         "tool_calls": [call("run_python", code="print(open('data.txt').read().upper())"),
                        call("list_files")]},
        {"role": "assistant", "content": "It says HELLO TOOLS."},
    ]
    session, generator, output = new_session(small_tokenizer, turns, workdir,
                                             system="Be brief.", constrained=True)
    added = session.send("What is in data.txt?")

    assert [message["role"] for message in added] == ["user", "assistant", "tool", "tool",
                                                      "assistant"]
    python_result = json.loads(added[2]["content"])
    assert python_result == {"exit_code": 0, "stdout": "HELLO TOOLS\n\n", "stderr": ""}
    assert json.loads(added[3]["content"]) == ["data.txt"]
    assert added[4] == turns[1]

    # The second prompt is the whole conversation, tool results included, with the tools.
    assert len(generator.prompts) == 2
    messages, tools = chat.parse(generator.prompts[1], small_tokenizer)
    assert tools == session.tools
    assert [tool["function"]["name"] for tool in tools][0] == "run_python"
    assert messages == [{"role": "system", "content": "Be brief."}, *added[:4]]
    config, tools_given, constrained = generator.settings[0]
    assert tools_given == session.tools
    assert constrained is True

    printed = output.getvalue().splitlines()
    assert printed[0] == "assistant> Let me look."
    assert printed[1] == ('[tool call] run_python {"code": '
                          '"print(open(\'data.txt\').read().upper())"}')
    assert printed[2] == ('[tool result] {"exit_code": 0, "stdout": "HELLO TOOLS\\n\\n", '
                          '"stderr": ""}')
    assert printed[3] == "[tool call] list_files {}"
    assert printed[4] == '[tool result] ["data.txt"]'
    assert printed[5] == "assistant> It says HELLO TOOLS."
    assert len(printed) == 6


def test_write_then_run_in_workdir(small_tokenizer, workdir: Path):
    turns = [
        {"role": "assistant", "content": "",
         "tool_calls": [call("write_file", path="calc.py", content="print(6 * 7)\n")]},
        {"role": "assistant", "content": "", "tool_calls": [call("run_shell",
                                                                 command="python3 calc.py")]},
        {"role": "assistant", "content": "The result is 42."},
    ]
    session, _, output = new_session(small_tokenizer, turns, workdir)
    added = session.send("Compute 6 * 7 with a script.")
    assert (workdir / "calc.py").read_text() == "print(6 * 7)\n"
    assert json.loads(added[4]["content"])["stdout"] == "42\n"
    assert added[-1]["content"] == "The result is 42."
    assert "assistant> \n" not in output.getvalue()


def test_hostile_calls_do_not_end_chat(small_tokenizer, workdir: Path, monkeypatch):
    secret = workdir.parent / "secret.txt"
    secret.write_text("password\n")
    monkeypatch.setenv("SECRET_TOKEN", "fake-secret-value")
    turns = [
        {"role": "assistant", "content": "", "tool_calls": [
            call("read_file", path="../secret.txt"),
            call("run_shell", command="echo $SECRET_TOKEN; while :; do :; done"),
            call("erase_disk"),
        ]},
        {"role": "assistant", "content": "I could not do that."},
        {"role": "assistant", "content": "Still here."},
    ]
    session, _, _ = new_session(small_tokenizer, turns, workdir)
    added = session.send("Read the secret.")
    results = [json.loads(message["content"]) for message in added if message["role"] == "tool"]
    assert "outside the working directory" in results[0]["error"]
    assert results[1]["error"] == "timed out after 2 s and was killed"
    assert "fake-secret-value" not in results[1]["stdout"]
    assert results[2]["error"].startswith("unknown tool 'erase_disk'")
    assert "password" not in json.dumps(added)
    assert session.send("Are you there?")[-1]["content"] == "Still here."


def test_unparsed_call_gets_error(small_tokenizer, workdir: Path):
    turns = ['{"name": "run_shell", "arguments": {"command": ',
             {"role": "assistant", "content": "Sorry."}]
    session, generator, output = new_session(small_tokenizer, turns, workdir)
    added = session.send("List files.")
    assert added[1]["tool_calls"][0]["error"].startswith("invalid JSON")
    assert "could not be parsed" in json.loads(added[2]["content"])["error"]
    assert "[invalid tool call]" in output.getvalue()
    # The next prompt still renders, with an empty call in place of the broken text.
    messages, _ = chat.parse(generator.prompts[1], small_tokenizer)
    assert messages[1]["tool_calls"] == [call("")]


def test_tool_rounds_are_limited(small_tokenizer, workdir: Path):
    turns = [{"role": "assistant", "content": "", "tool_calls": [call("list_files")]}] * 3
    session, generator, output = new_session(small_tokenizer, turns, workdir,
                                             max_tool_rounds=2)
    added = session.send("Loop forever.")
    assert len(generator.prompts) == 3
    results = [message["content"] for message in added if message["role"] == "tool"]
    assert results[:2] == ["[]", "[]"]
    assert "not executed: the limit of 2 rounds" in json.loads(results[2])["error"]
    assert "[stopped after 2 rounds of tool calls" in output.getvalue()


def test_tools_disabled(small_tokenizer, workdir: Path):
    turns = [{"role": "assistant", "content": "", "tool_calls": [call("list_files")]},
             {"role": "assistant", "content": "OK."}]
    session, generator, _ = new_session(small_tokenizer, turns, None)
    added = session.send("hi")
    assert "tools are disabled" in json.loads(added[2]["content"])["error"]
    assert generator.settings[0][1] is None
    _, tools = chat.parse(generator.prompts[0], small_tokenizer)
    assert tools is None


def test_failed_turn_drops_exchange(small_tokenizer, workdir: Path):
    class FailingGenerator(ScriptedGenerator):
        """Fails once, on the turn after the first tool call."""

        failed = False

        def generate_turn(self, prompt_ids, config, tools, constrained):
            if len(self.prompts) == 1 and not self.failed:
                self.failed = True
                raise CodelingError("prompt is too long")
            return super().generate_turn(prompt_ids, config, tools, constrained)

    generator = FailingGenerator(small_tokenizer, [
        {"role": "assistant", "content": "", "tool_calls": [call("list_files")]},
        {"role": "assistant", "content": "Fine."}])
    session = ChatSession(generator, GenerationConfig(), toolbox=ToolBox(workdir),
                          output=io.StringIO())
    with pytest.raises(CodelingError, match="too long"):
        session.send("first")
    assert session.messages == []
    added = session.send("second")
    assert [message["role"] for message in added] == ["user", "assistant"]
    assert added[-1]["content"] == "Fine."


def test_seed_changes_per_turn(small_tokenizer):
    generator = ScriptedGenerator(small_tokenizer, [{"role": "assistant", "content": "a"}] * 2)
    session = ChatSession(generator, GenerationConfig(seed=5), output=io.StringIO())
    session.send("one")
    session.send("two")
    assert [config.seed for config, _, _ in generator.settings] == [5, 6]


def test_run_reads_lines_and_writes_transcript(small_tokenizer, workdir: Path, tmp_path: Path):
    turns = [{"role": "assistant", "content": "first"},
             {"role": "assistant", "content": "after reset"}]
    transcript = tmp_path / "out" / "chat.json"
    session, _, output = new_session(small_tokenizer, turns, workdir, transcript=transcript)
    session.run(iter(["hello", "", "/reset", "again", "/exit", "never read"]))
    saved = json.loads(transcript.read_text())
    assert saved["messages"] == [{"role": "user", "content": "again"},
                                 {"role": "assistant", "content": "after reset"}]
    assert saved["workdir"] == str(workdir)
    assert [tool["function"]["name"] for tool in saved["tools"]] == [
        "run_python", "run_shell", "read_file", "list_files", "search_code", "write_file",
        "git_status"]
    assert "[conversation cleared]" in output.getvalue()


def test_interrupt_ends_run_cleanly(small_tokenizer, tmp_path: Path):
    def lines():
        yield "hello"
        raise KeyboardInterrupt

    transcript = tmp_path / "chat.json"
    session, _, _ = new_session(small_tokenizer, [{"role": "assistant", "content": "hi"}], None,
                                transcript=transcript)
    session.run(lines())
    assert json.loads(transcript.read_text())["messages"][-1] == {"role": "assistant",
                                                                  "content": "hi"}


# -- the command, end to end ----------------------------------------------------------------------


def run_chat(arguments: list[str], stdin: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codeling", "chat", *arguments], input=stdin,
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def test_chat_command_end_to_end(trained_run: Path, tmp_path: Path):
    transcript = tmp_path / "chat.json"
    result = run_chat([str(trained_run), "--temperature", "0", "--max-new-tokens", "4",
                       "--seed", "1", "--transcript", str(transcript)],
                      "hello\nwhat is 2 + 2?\n", tmp_path)
    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(answers) == 2
    saved = json.loads(transcript.read_text())
    assert [message["role"] for message in saved["messages"]] == ["user", "assistant"] * 2
    assert saved["messages"][2] == {"role": "user", "content": "what is 2 + 2?"}
    assert saved["tools"] is None


@pytest.fixture
def long_context_checkpoint(trained_run: Path, tmp_path: Path) -> Path:
    """The trained tiny checkpoint with a 4096-token context, room for the tool descriptions.

    The dense model has rotary position embeddings and no weights that depend on the
    context length, so the same weights load with a longer `max_seq_len`.
    """
    checkpoints = trained_run / "code" / "checkpoints"
    source = checkpoints / (checkpoints / "latest").read_text().strip()
    target = tmp_path / "long-context"
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["model"]["max_seq_len"] = 4096
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_chat_command_with_tools(long_context_checkpoint: Path, tmp_path: Path):
    workdir = tmp_path / "tools-work"
    transcript = tmp_path / "chat.json"
    result = run_chat([str(long_context_checkpoint), "--tools", "builtin", "--workdir",
                       str(workdir), "--constrained", "--temperature", "0",
                       "--max-new-tokens", "8",
                       "--max-tool-rounds", "1", "--system", "You are a coding assistant.",
                       "--transcript", str(transcript)], "list the files\n/exit\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"working directory: {workdir.resolve()}" in result.stdout
    assert workdir.is_dir()
    saved = json.loads(transcript.read_text())
    assert saved["workdir"] == str(workdir.resolve())
    assert saved["messages"][0] == {"role": "system", "content": "You are a coding assistant."}
    assert saved["messages"][1] == {"role": "user", "content": "list the files"}
    assert saved["messages"][2]["role"] == "assistant"
    # Constrained decoding makes every call the model writes valid.
    for message in saved["messages"]:
        for call in message.get("tool_calls", []):
            assert "error" not in call, call
    assert [tool["function"]["name"] for tool in saved["tools"]][-1] == "git_status"


def test_chat_command_rejects_bad_options(tmp_path: Path, capsys):
    assert main(["chat", str(tmp_path), "--max-tool-rounds", "-1"]) == 2
    assert "--max-tool-rounds must be >= 0, got -1" in capsys.readouterr().err
    assert main(["chat", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_chat_command_ctrl_c_exits_cleanly(trained_run: Path, tmp_path: Path):
    transcript = tmp_path / "chat.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "codeling", "chat", str(trained_run), "--max-new-tokens", "4",
         "--transcript", str(transcript)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path,
        # A shell starts background jobs with SIGINT ignored, and Python then leaves Ctrl-C
        # ignored too. Give the chat the disposition it has at a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        process.stdin.write("hello\n")
        process.stdin.flush()
        # Wait for the reply; stdin stays open, so the chat then waits for the next line.
        first_line = process.stdout.readline()
        assert first_line.startswith("assistant> ")
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "[interrupted]" in stderr
    assert "Traceback" not in stderr
    roles = [message["role"] for message in json.loads(transcript.read_text())["messages"]]
    assert roles == ["user", "assistant"]
