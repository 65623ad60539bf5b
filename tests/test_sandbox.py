"""The sandbox: output, limits, isolation and cleanup, each checked by running real programs."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from codeling import sandbox
from codeling.errors import CodelingError

# Slack for starting two interpreters and cleaning up on a busy 2-core machine.
STARTUP_SLACK = 5.0


@pytest.fixture(scope="module")
def support() -> dict[str, bool]:
    return sandbox.isolation_support()


def _processes_with(marker: str) -> list[int]:
    """Return the ids of host processes whose command line contains marker."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            command_line = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in command_line:
            found.append(int(entry.name))
    return found


def _wait_for_no_processes_with(marker: str, seconds: float = 2.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        left = _processes_with(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_python_output_and_exit_status():
    result = sandbox.run_python(
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)")
    assert result.returncode == 3
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert not result.ok
    assert not result.timed_out
    assert result.killed_by is None
    assert not result.output_truncated


def test_successful_run_is_ok():
    result = sandbox.run_python("print(6 * 7)")
    assert result.ok
    assert result.returncode == 0
    assert result.stdout == "42\n"
    assert result.duration < STARTUP_SLACK


def test_stdin_and_files_reach_program():
    code = ("import sys\n"
            "print(sys.stdin.read().upper())\n"
            "print(open('data/input.txt').read())\n"
            "print(open('blob.bin', 'rb').read())")
    result = sandbox.run_python(code, stdin="abc",
                                files={"data/input.txt": "payload", "blob.bin": b"\x00\x01"})
    assert result.ok, result.stderr
    assert result.stdout == "ABC\npayload\nb'\\x00\\x01'\n"


def test_bash_script_runs():
    result = sandbox.run_bash("echo $((2 + 3))\nexit 4\n")
    assert result.returncode == 4
    assert result.stdout == "5\n"


def test_python_runs_in_isolated_mode():
    result = sandbox.run_python("import sys\nprint(sys.flags.isolated)")
    assert result.stdout == "1\n"


def test_working_directory_is_fresh_and_removed():
    code = "import os\nprint(os.getcwd())\nprint(os.environ['HOME'])\nprint(sorted(os.listdir()))"
    result = sandbox.run_python(code)
    workdir, home, listing = result.stdout.splitlines()
    assert home == workdir
    assert listing == "['main.py']"
    assert Path(workdir).name.startswith("codeling-sandbox-")
    assert not Path(workdir).exists()


def test_environment_has_no_parent_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    result = sandbox.run_python("import json, os\nprint(json.dumps(dict(os.environ)))",
                                env={"EXTRA": "1"})
    environment = json.loads(result.stdout)
    assert "OPENAI_API_KEY" not in environment
    assert "sk-test-not-a-real-key" not in result.stdout
    assert set(environment) == {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "EXTRA"}
    assert environment["PATH"] == sandbox.SAFE_PATH


def test_infinite_loop_times_out():
    result = sandbox.run_python("while True:\n    pass\n", timeout=1)
    assert result.timed_out
    assert result.killed_by == "timeout"
    assert result.returncode is None
    assert not result.ok
    assert 1.0 <= result.duration < 1.0 + STARTUP_SLACK


def test_sleeping_program_times_out():
    result = sandbox.run_python("import time\ntime.sleep(60)\n", timeout=1)
    assert result.timed_out
    assert result.duration < 1.0 + STARTUP_SLACK


def test_unbounded_allocation_fails():
    code = "chunks = []\nwhile True:\n    chunks.append(bytearray(10_000_000))\n"
    result = sandbox.run_python(code, memory_mb=256, timeout=20)
    assert not result.ok
    assert not result.timed_out
    assert result.returncode == 1
    assert "MemoryError" in result.stderr
    assert result.duration < 10


def test_file_size_limit():
    result = sandbox.run_python("open('big', 'wb').write(b'x' * (3 << 20))", max_file_mb=1)
    assert result.returncode == 1
    assert "File too large" in result.stderr


def test_signal_is_reported():
    result = sandbox.run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)")
    assert result.returncode == -11
    assert result.killed_by == "SIGSEGV"
    assert not result.ok


def test_output_is_truncated():
    code = "import sys\nsys.stdout.write('x' * 3_000_000)\nsys.stderr.write('y' * 10)"
    result = sandbox.run_python(code, max_output_bytes=1000)
    assert result.ok
    assert result.stdout == "x" * 1000
    assert result.stderr == "y" * 10
    assert result.output_truncated


def test_missing_program_exits_127():
    result = sandbox.run(["codeling-no-such-program"])
    assert result.returncode == 127
    assert "cannot run codeling-no-such-program" in result.stderr


@pytest.mark.parametrize("kwargs", [
    {"timeout": 0},
    {"memory_mb": 1},
    {"max_processes": 0},
    {"files": {"../escape.txt": "x"}},
    {"files": {"/etc/escape.txt": "x"}},
    {"files": {"main.py": "x"}},
])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(CodelingError):
        sandbox.run_python("print(1)", **kwargs)


def test_process_count_is_bounded(support):
    if not support["processes_limited"]:
        pytest.skip("no process limit on this system (no pids cgroup, running as root)")
    # The parent forks sleeping children until fork fails, then prints how many it made.
    code = ("import os, time\n"
            "children = 0\n"
            "while True:\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        break\n"
            "    if pid == 0:\n"
            "        time.sleep(60)\n"
            "        os._exit(0)\n"
            "    children += 1\n"
            "print(children)\n")
    result = sandbox.run_python(code, max_processes=8, timeout=20)
    assert result.ok, result.stderr
    assert int(result.stdout) == 7  # eight processes in all, the parent included
    assert result.duration < STARTUP_SLACK


def test_python_fork_bomb_is_contained(support):
    if not support["processes_limited"]:
        pytest.skip("no process limit on this system (no pids cgroup, running as root)")
    marker = f"codeling-bomb-{uuid.uuid4().hex}"
    code = (f"# {marker}\n"
            "import os\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        pass\n")
    result = sandbox.run([sys.executable, "-I", "-c", code], max_processes=16, timeout=3)
    assert result.timed_out
    assert not result.ok
    assert result.duration < 3 + STARTUP_SLACK
    assert _wait_for_no_processes_with(marker) == []


def test_bash_fork_bomb_is_contained(support):
    if not support["processes_limited"]:
        pytest.skip("no process limit on this system (no pids cgroup, running as root)")
    marker = f"codeling-bomb-{uuid.uuid4().hex}"
    # The classic bomb returns at once and leaves its copies running, so the first shell then
    # spins on builtins alone (no fork) for 2 s to let them reach the process limit.
    script = (f"# {marker}\nbomb() {{ bomb | bomb & }}\nbomb\n"
              "SECONDS=0\nwhile (( SECONDS < 2 )); do :; done\nwait\n")
    result = sandbox.run(["bash", "-c", script], max_processes=16, timeout=3)
    # Bash retries a failed fork a few times and then gives up, so the run may end on its own.
    assert "fork: retry: Resource temporarily unavailable" in result.stderr
    assert result.duration < 3 + STARTUP_SLACK
    assert _wait_for_no_processes_with(marker) == []


def test_escaped_session_is_killed(support):
    if not (support["pid_namespace"] or support["processes_limited"]):
        pytest.skip("neither a PID namespace nor a pids cgroup on this system")
    seconds = f"1000.{uuid.uuid4().int % 10**9:09d}"
    code = ("import subprocess\n"
            f"subprocess.Popen(['sleep', '{seconds}'], start_new_session=True)\n"
            "print('started')\n")
    result = sandbox.run_python(code)
    assert result.ok, result.stderr
    assert result.stdout == "started\n"
    assert _wait_for_no_processes_with(seconds) == []


def test_network_connection_fails():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    port = listener.getsockname()[1]
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_all() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            accepted.append(connection)

    thread = threading.Thread(target=accept_all, daemon=True)
    thread.start()
    try:
        # The listener works for the test process itself.
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        deadline = time.monotonic() + 3
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(accepted) == 1

        code = ("import socket\n"
                f"socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                "print('connected')\n")
        result = sandbox.run_python(code)
        if not result.network_isolated:
            pytest.skip("no network namespace on this system")
        assert not result.ok
        assert "connected" not in result.stdout
        assert "OSError" in result.stderr or "Error" in result.stderr
        assert len(accepted) == 1
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
        for connection in accepted:
            connection.close()


def test_writes_outside_working_directory_fail(tmp_path):
    target = tmp_path / "escape.txt"
    result = sandbox.run_python(f"open({str(target)!r}, 'w').write('x')")
    if not result.filesystem_readonly:
        pytest.skip("no read-only mount namespace on this system")
    assert result.returncode == 1
    assert "Read-only file system" in result.stderr
    assert not target.exists()
    inside = sandbox.run_python("open('out.txt', 'w').write('x')\nprint(open('out.txt').read())")
    assert inside.ok, inside.stderr
    assert inside.stdout == "x\n"


def test_capabilities_are_dropped(support):
    if not support["capabilities_dropped"]:
        pytest.skip("capabilities could not be dropped on this system")
    result = sandbox.run_python("print(open('/proc/self/status').read())")
    status = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line)
    assert status["CapEff"].strip() == "0000000000000000"
    assert status["CapBnd"].strip() == "0000000000000000"
    assert status["NoNewPrivs"].strip() == "1"


def test_pid_namespace_hides_host_processes(support):
    if not (support["pid_namespace"] and support["filesystem_readonly"]):
        pytest.skip("no PID and mount namespaces on this system")
    code = ("import os\n"
            "print(os.getpid())\n"
            "print(sorted(int(name) for name in os.listdir('/proc') if name.isdigit()))\n")
    result = sandbox.run_python(code)
    pid, listing = result.stdout.splitlines()
    assert int(pid) == 2  # PID 1 is the namespace's init, which reaps children
    assert json.loads(listing) == [1, 2]
