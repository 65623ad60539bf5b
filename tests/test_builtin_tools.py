"""The builtin chat tools: schemas, results, and hostile calls contained by the ToolBox."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import jsonschema
import pytest

from codeling import sandbox
from codeling.errors import CodelingError
from codeling.tools import BUILTIN_TOOLS, TOOL_NAMES, ToolBox, ToolLimits, parse_tools_option

# Slack for starting the sandbox's interpreters and cleaning up on a busy machine.
STARTUP_SLACK = 5.0
SHORT_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def support() -> dict[str, bool]:
    return sandbox.isolation_support()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    directory = tmp_path / "work"
    directory.mkdir()
    return directory


@pytest.fixture
def box(workdir: Path) -> ToolBox:
    return ToolBox(workdir, ToolLimits(timeout=SHORT_TIMEOUT, max_processes=16))


def error_of(result: str) -> str:
    """Return the message of an error result; fail when the result is not an error."""
    value = json.loads(result)
    assert isinstance(value, dict) and "error" in value, result
    return value["error"]


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in Path(entry.path, "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_for_no_processes_with(marker: str, seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


# -- schemas --------------------------------------------------------------------------------------


def test_tool_names_and_arguments():
    arguments = {tool["function"]["name"]: (sorted(tool["function"]["parameters"]["properties"]),
                                            tool["function"]["parameters"]["required"])
                 for tool in BUILTIN_TOOLS}
    assert arguments == {
        "run_python": (["code"], ["code"]),
        "run_shell": (["command"], ["command"]),
        "read_file": (["path"], ["path"]),
        "list_files": (["path"], []),
        "search_code": (["path", "pattern"], ["pattern"]),
        "write_file": (["content", "path"], ["path", "content"]),
        "git_status": ([], []),
    }


def test_tool_specs_are_valid_schemas():
    for tool in BUILTIN_TOOLS:
        assert tool["type"] == "function"
        assert tool["function"]["description"]
        jsonschema.Draft202012Validator.check_schema(tool["function"]["parameters"])


# -- results --------------------------------------------------------------------------------------


def test_write_read_and_list(box: ToolBox, workdir: Path):
    written = json.loads(box.call("write_file", {"path": "pkg/mod.py", "content": "X = 'é'\n"}))
    assert written == {"path": "pkg/mod.py", "bytes_written": 9}
    assert (workdir / "pkg" / "mod.py").read_text(encoding="utf-8") == "X = 'é'\n"
    assert box.call("read_file", {"path": "pkg/mod.py"}) == "X = 'é'\n"
    assert box.call("read_file", {"path": str(workdir / "pkg" / "mod.py")}) == "X = 'é'\n"
    assert json.loads(box.call("list_files", {})) == ["pkg/"]
    assert json.loads(box.call("list_files", {"path": "pkg"})) == ["mod.py"]


def test_read_missing_and_wrong_kind(box: ToolBox, workdir: Path):
    (workdir / "folder").mkdir()
    (workdir / "blob.bin").write_bytes(b"\x00\x01\x02")
    assert "does not exist" in error_of(box.call("read_file", {"path": "nope.txt"}))
    assert "not a regular file" in error_of(box.call("read_file", {"path": "folder"}))
    assert "binary" in error_of(box.call("read_file", {"path": "blob.bin"}))
    assert "not a directory" in error_of(box.call("list_files", {"path": "blob.bin"}))


def test_run_python_reports_exit_and_streams(box: ToolBox, workdir: Path):
    (workdir / "helper.py").write_text("VALUE = 41\n")
    code = "import sys, os\nimport helper\nprint(helper.VALUE + 1)\nprint(os.getcwd())\n" \
           "print('warn', file=sys.stderr)\nsys.exit(3)"
    result = json.loads(box.call("run_python", {"code": code}))
    assert result == {"exit_code": 3, "stdout": f"42\n{workdir}\n", "stderr": "warn\n"}


def test_run_shell_changes_workdir(box: ToolBox, workdir: Path):
    result = json.loads(box.call("run_shell", {"command": "echo hi > made.txt && pwd"}))
    assert result == {"exit_code": 0, "stdout": f"{workdir}\n", "stderr": ""}
    assert (workdir / "made.txt").read_text() == "hi\n"


def test_git_status_lists_changes(box: ToolBox, workdir: Path):
    subprocess.run(["git", "init", "-q", str(workdir)], check=True)
    (workdir / "new.py").write_text("print(1)\n")
    result = json.loads(box.call("git_status", {}))
    assert result == {"exit_code": 0, "stdout": "?? new.py\n", "stderr": ""}


def test_git_status_stops_at_workdir(tmp_path: Path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    inner = tmp_path / "inner"
    inner.mkdir()
    result = json.loads(ToolBox(inner).call("git_status", {}))
    assert result["exit_code"] == 128
    assert "not a git repository" in result["stderr"]


def test_search_code_regex_and_substring(box: ToolBox, workdir: Path):
    (workdir / "src").mkdir()
    (workdir / "src" / "a.py").write_text("def alpha():\n    return 1\n")
    (workdir / "b.txt").write_text("call alpha( here\n")
    (workdir / ".git").mkdir()
    (workdir / ".git" / "config").write_text("alpha\n")
    found = json.loads(box.call("search_code", {"pattern": r"def \w+\("}))
    assert found == {"matches": [{"path": "src/a.py", "line": 1, "text": "def alpha():"}],
                     "truncated": False}
    # "alpha(" is not a valid regular expression, so it is searched as a substring.
    found = json.loads(box.call("search_code", {"pattern": "alpha(", "path": "."}))
    assert [match["path"] for match in found["matches"]] == ["b.txt", "src/a.py"]
    found = json.loads(box.call("search_code", {"pattern": "alpha", "path": "src/a.py"}))
    assert [match["line"] for match in found["matches"]] == [1]


def test_search_code_match_limit(workdir: Path):
    (workdir / "many.txt").write_text("hit\n" * 30)
    box = ToolBox(workdir, ToolLimits(max_search_matches=5))
    found = json.loads(box.call("search_code", {"pattern": "hit"}))
    assert len(found["matches"]) == 5
    assert found["truncated"] is True


def test_output_is_truncated(workdir: Path):
    box = ToolBox(workdir, ToolLimits(max_output_chars=100))
    result = json.loads(box.call("run_python", {"code": "print('x' * 100_000)"}))
    assert result["stdout"].startswith("x" * 100 + "\n[output truncated: showed 100 of more than")
    assert len(result["stdout"]) < 200
    assert result["stderr"] == ""
    (workdir / "long.txt").write_text("y" * 1000)
    text = box.call("read_file", {"path": "long.txt"})
    assert text == "y" * 100 + "\n[output truncated: showed 100 of 1000 characters]"


def test_read_limit_notes_file_size(workdir: Path):
    (workdir / "big.txt").write_text("z" * 5000)
    box = ToolBox(workdir, ToolLimits(max_read_bytes=1000, max_output_chars=2000))
    assert box.call("read_file", {"path": "big.txt"}) == \
        "z" * 1000 + "\n[file truncated: read the first 1000 of 5000 bytes]"


def test_list_limit(workdir: Path):
    for index in range(12):
        (workdir / f"f{index:02d}").write_text("")
    box = ToolBox(workdir, ToolLimits(max_list_entries=10))
    entries = json.loads(box.call("list_files", {"path": "."}))
    assert entries[:10] == [f"f{index:02d}" for index in range(10)]
    assert entries[10] == "... and 2 more entries"


# -- invalid calls --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "arguments", "expected"), [
    ("delete_everything", {}, "unknown tool 'delete_everything'; the available tools are "
                              "run_python, run_shell"),
    ("read_file", {}, "invalid arguments for read_file: 'path' is a required property"),
    ("read_file", {"path": 7}, "invalid arguments for read_file: path: 7 is not of type "
                               "'string'"),
    ("git_status", {"verbose": True}, "invalid arguments for git_status: Additional "
                                      "properties are not allowed ('verbose' was unexpected)"),
    ("run_python", ["print(1)"], "the arguments of run_python must be a JSON object"),
    ("run_python", {"code": "print(1)\0"}, "code contains a NUL character"),
    (None, None, "unknown tool None"),
    (["run_shell"], {}, "unknown tool ['run_shell']"),
])
def test_invalid_call_is_error_result(box: ToolBox, name, arguments, expected):
    assert expected in error_of(box.call(name, arguments))


def test_unparsed_call_is_error_result(box: ToolBox):
    call = {"type": "function", "function": {"name": None, "arguments": None},
            "raw": '{"name": "run_shell", "arguments": {', "error": "invalid JSON"}
    assert "could not be parsed (invalid JSON)" in error_of(box.execute(call))
    ok = {"type": "function", "function": {"name": "list_files", "arguments": {}}}
    assert json.loads(box.execute(ok)) == []


def test_toolbox_needs_existing_directory(tmp_path: Path):
    with pytest.raises(CodelingError, match="does not exist"):
        ToolBox(tmp_path / "missing")
    with pytest.raises(CodelingError, match="root directory"):
        ToolBox("/")
    with pytest.raises(CodelingError, match="timeout must be positive"):
        ToolBox(tmp_path, ToolLimits(timeout=0))


def test_tools_option_selects_builtin_tools():
    assert parse_tools_option("none") is None
    assert parse_tools_option("builtin") == list(TOOL_NAMES)
    assert parse_tools_option(" read_file, list_files,read_file ") == ["read_file", "list_files"]
    with pytest.raises(CodelingError, match="'cat_file' is not a builtin tool.*run_python"):
        parse_tools_option("read_file,cat_file")
    with pytest.raises(CodelingError, match="names no tool; use none, builtin"):
        parse_tools_option(",")


def test_toolbox_tool_subset(workdir: Path):
    """Tools left out of `names` are neither described nor run."""
    box = ToolBox(workdir, names=["list_files", "read_file"])
    assert [tool["function"]["name"] for tool in box.specs] == ["read_file", "list_files"]
    (workdir / "a.txt").write_text("hi\n")
    assert json.loads(box.call("list_files", {})) == ["a.txt"]
    assert "unknown tool 'run_shell'" in error_of(box.call("run_shell", {"command": "ls"}))
    with pytest.raises(CodelingError, match="unknown builtin tools"):
        ToolBox(workdir, names=["list_files", "rm_rf"])


def test_sandbox_keeps_given_workdir(workdir: Path):
    (workdir / "kept.txt").write_text("before\n")
    result = sandbox.run(["bash", "-c", "cat kept.txt; echo after > new.txt; pwd"],
                         files={"input.txt": "data"}, workdir=workdir)
    assert result.ok, result.stderr
    assert result.stdout == f"before\n{workdir}\n"
    assert (workdir / "new.txt").read_text() == "after\n"
    assert (workdir / "input.txt").read_text() == "data"
    with pytest.raises(CodelingError, match="does not exist"):
        sandbox.run(["true"], workdir=workdir / "missing")


# -- hostile calls --------------------------------------------------------------------------------


# Every path points into the test's own temporary directory, so that even a broken check
# cannot change a file of the system. "ABSOLUTE" stands for that file's absolute path.
@pytest.mark.parametrize("tool", ["read_file", "list_files", "search_code", "write_file"])
@pytest.mark.parametrize("path", ["../outside.txt", "sub/../../outside.txt", "ABSOLUTE", ".."])
def test_path_outside_workdir_rejected(box: ToolBox, workdir: Path, tool: str, path: str):
    (workdir / "sub").mkdir()
    outside = workdir.parent / "outside.txt"
    outside.write_text("secret outside\n")
    if path == "ABSOLUTE":
        path = str(outside)
    arguments = {"path": path}
    if tool == "write_file":
        arguments["content"] = "overwritten"
    if tool == "search_code":
        arguments["pattern"] = "secret"
    result = box.call(tool, arguments)
    assert "outside the working directory" in error_of(result)
    assert "secret outside" not in result.replace(str(outside), "")
    assert outside.read_text() == "secret outside\n"


@pytest.mark.parametrize("tool", ["read_file", "list_files", "search_code"])
@pytest.mark.parametrize("path", ["/etc/passwd", "/", "/proc/self/environ"])
def test_system_path_rejected(box: ToolBox, tool: str, path: str):
    arguments = {"path": path, "pattern": "root"} if tool == "search_code" else {"path": path}
    result = box.call(tool, arguments)
    assert "outside the working directory" in error_of(result)
    assert "root:" not in result


def test_tilde_is_plain_character(box: ToolBox, workdir: Path):
    (workdir / "~").mkdir()
    box.call("write_file", {"path": "~/x", "content": "inside\n"})
    assert (workdir / "~" / "x").read_text() == "inside\n"
    assert box.call("read_file", {"path": "~/x"}) == "inside\n"


def test_symlink_out_of_workdir_rejected(box: ToolBox, workdir: Path):
    outside = workdir.parent / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret outside\n")
    (workdir / "link.txt").symlink_to(outside / "secret.txt")
    (workdir / "linkdir").symlink_to(outside)
    for arguments in ({"path": "link.txt"}, {"path": "linkdir/secret.txt"}):
        assert "outside the working directory" in error_of(box.call("read_file", arguments))
    assert "outside the working directory" in error_of(
        box.call("list_files", {"path": "linkdir"}))
    assert "outside the working directory" in error_of(
        box.call("write_file", {"path": "linkdir/new.txt", "content": "x"}))
    assert "outside the working directory" in error_of(
        box.call("write_file", {"path": "link.txt", "content": "x"}))
    assert not (outside / "new.txt").exists()
    assert (outside / "secret.txt").read_text() == "secret outside\n"
    # A search of the whole tree skips the links instead of reading through them.
    found = json.loads(box.call("search_code", {"pattern": "secret"}))
    assert found["matches"] == []


def test_symlink_created_by_shell_rejected(box: ToolBox, workdir: Path):
    secret = workdir.parent / "planted.txt"
    secret.write_text("secret outside\n")
    made = json.loads(box.call("run_shell", {"command": f"ln -s {secret} planted"}))
    assert made["exit_code"] == 0, made
    assert "outside the working directory" in error_of(
        box.call("read_file", {"path": "planted"}))


def test_symlink_inside_workdir_allowed(box: ToolBox, workdir: Path):
    (workdir / "real.txt").write_text("inside\n")
    (workdir / "alias.txt").symlink_to("real.txt")
    assert box.call("read_file", {"path": "alias.txt"}) == "inside\n"


def test_symlink_loop_is_error(box: ToolBox, workdir: Path):
    (workdir / "a").symlink_to("b")
    (workdir / "b").symlink_to("a")
    assert "failed to resolve path 'a'" in error_of(box.call("read_file", {"path": "a"}))


def test_fifo_read_does_not_block(box: ToolBox, workdir: Path):
    os.mkfifo(workdir / "pipe")
    started = time.monotonic()
    assert "not a regular file" in error_of(box.call("read_file", {"path": "pipe"}))
    assert "not a regular file" in error_of(
        box.call("write_file", {"path": "pipe", "content": "x"}))
    found = json.loads(box.call("search_code", {"pattern": "x"}))
    assert found["matches"] == []
    assert time.monotonic() - started < STARTUP_SLACK


def test_shell_write_outside_workdir_fails(box: ToolBox, workdir: Path, support):
    if not support["filesystem_readonly"]:
        pytest.skip("no read-only mount namespace on this system")
    target = workdir.parent / "escape.txt"
    result = json.loads(box.call("run_shell", {"command": f"echo x > {target}"}))
    assert result["exit_code"] == 1
    assert "Read-only file system" in result["stderr"]
    assert not target.exists()


@pytest.mark.parametrize("tool", ["run_shell", "run_python"])
def test_environment_secret_not_visible(box: ToolBox, monkeypatch, tool: str):
    secret = f"fake-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("SECRET_API_KEY", secret)
    if tool == "run_shell":
        arguments = {"command": "env; echo \"value=$SECRET_API_KEY\"; cat /proc/self/environ"}
    else:
        arguments = {"code": "import os\nprint(dict(os.environ))\n"
                             "print(os.environ.get('SECRET_API_KEY', 'missing'))"}
    text = box.call(tool, arguments)
    result = json.loads(text)
    assert result["exit_code"] == 0, result
    assert secret not in text
    assert "SECRET_API_KEY" not in result["stdout"].replace("os.environ.get", "")
    if tool == "run_shell":
        assert "value=\n" in result["stdout"]
    else:
        assert result["stdout"].endswith("missing\n")


@pytest.fixture
def listener():
    """A TCP server on 127.0.0.1 that counts the connections it accepts."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_all() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            accepted.append(connection)

    thread = threading.Thread(target=accept_all, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join(timeout=5)
    server.close()
    for connection in accepted:
        connection.close()


@pytest.mark.parametrize("tool", ["run_shell", "run_python"])
def test_socket_connection_fails(box: ToolBox, listener, support, tool: str):
    if not support["network_isolated"]:
        pytest.skip("no network namespace on this system")
    port, accepted = listener
    # The server accepts connections from the test process itself.
    socket.create_connection(("127.0.0.1", port), timeout=3).close()
    deadline = time.monotonic() + 3
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(accepted) == 1

    if tool == "run_shell":
        arguments = {"command": f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"}
    else:
        arguments = {"code": "import socket\n"
                             f"socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                             "print('connected')"}
    result = json.loads(box.call(tool, arguments))
    assert result["exit_code"] != 0
    assert "connected" not in result["stdout"]
    assert "unreachable" in result["stderr"] or "refused" in result["stderr"], result
    time.sleep(0.2)
    assert len(accepted) == 1


@pytest.mark.parametrize(("tool", "arguments"), [
    ("run_python", {"code": "while True:\n    pass\n"}),
    ("run_shell", {"command": "while :; do :; done"}),
    ("run_shell", {"command": "sleep 600"}),
])
def test_infinite_loop_times_out(box: ToolBox, tool: str, arguments: dict):
    started = time.monotonic()
    result = json.loads(box.call(tool, arguments))
    assert result["error"] == f"timed out after {SHORT_TIMEOUT:g} s and was killed"
    assert result["exit_code"] is None
    assert time.monotonic() - started < SHORT_TIMEOUT + STARTUP_SLACK
    # The next call works, so a chat goes on.
    assert json.loads(box.call("run_python", {"code": "print(1)"}))["stdout"] == "1\n"


def test_catastrophic_regex_times_out(box: ToolBox, workdir: Path):
    (workdir / "text.txt").write_text("a" * 40 + "!\n")
    started = time.monotonic()
    message = error_of(box.call("search_code", {"pattern": "(a+)+$"}))
    assert message == (f"search_code timed out after {SHORT_TIMEOUT:g} s; use a simpler "
                       "pattern or a narrower path")
    assert time.monotonic() - started < SHORT_TIMEOUT + STARTUP_SLACK
    found = json.loads(box.call("search_code", {"pattern": "a!"}))
    assert found["matches"][0]["path"] == "text.txt"


@pytest.mark.parametrize("tool", ["run_shell", "run_python"])
def test_fork_bomb_is_contained(box: ToolBox, support, tool: str):
    if not support["processes_limited"]:
        pytest.skip("no process limit on this system (no pids cgroup, running as root)")
    marker = f"codeling-bomb-{uuid.uuid4().hex}"
    if tool == "run_shell":
        # The classic bomb returns at once and leaves its copies running. The first shell then
        # spins on builtins alone (no fork) for 1.5 s of the 2 s limit, so the copies reach the
        # process limit before it waits.
        arguments = {"command": f"# {marker}\nbomb() {{ bomb | bomb & }}\nbomb\n"
                                "start=${EPOCHREALTIME/./}\n"
                                "while (( ${EPOCHREALTIME/./} - start < 1500000 )); do :; done\n"
                                "wait"}
    else:
        arguments = {"code": f"# {marker}\nimport os\nwhile True:\n    try:\n"
                             "        os.fork()\n    except OSError:\n        pass\n"}
    started = time.monotonic()
    text = box.call(tool, arguments)
    assert time.monotonic() - started < SHORT_TIMEOUT + STARTUP_SLACK
    result = json.loads(text)
    if tool == "run_shell":
        # Bash gives up after a few failed forks, so the run may end before the time limit.
        # It prints "fork: retry: Resource ..." while it retries, "fork: Resource ..." at the end.
        assert re.search(r"fork: (retry: )?Resource temporarily unavailable", result["stderr"])
    else:
        assert result["error"].startswith("timed out")
    assert _wait_for_no_processes_with(marker) == []
    assert json.loads(box.call("run_shell", {"command": "echo alive"}))["stdout"] == "alive\n"
