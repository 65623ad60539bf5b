"""Run untrusted generated code in a throwaway, resource-limited subprocess.

Each run gets a fresh temporary working directory (deleted afterwards), or an existing one
that the caller names and keeps. It also gets a minimal environment: PATH, LANG, LC_ALL, and
HOME and TMPDIR pointing at the working directory, plus any variables the caller passes in
`env`. Nothing else from the parent's environment reaches the child, so API keys and tokens
stay out of reach.

A small launcher (a second Python interpreter started with `-I -S`, so no `preexec_fn` runs in
a possibly multi-threaded parent) applies the isolation and then executes the program:

- its own session and process group, killed as a whole when the run ends or times out;
- a cgroup `pids` controller group with `pids.max`, which bounds processes and threads even for
  root (RLIMIT_NPROC does not apply to root). Without a usable pids controller, a non-root
  user falls back to RLIMIT_NPROC;
- new network, PID, mount and IPC namespaces where the kernel allows them. For root they are
  created directly; other users try an unprivileged user namespace. In the network namespace
  only a loopback interface exists, and it is down, so every connection fails. When the PID
  namespace's first process exits, the kernel kills everything left in it, including
  processes that started their own session;
- in the mount namespace, every mount is made read-only, nosuid and nodev, except the working
  directory (read-write) and a few harmless device nodes such as /dev/null. A fresh /proc
  shows only the sandbox's processes;
- the program itself runs with all capabilities dropped and no_new_privs set, so root inside
  the sandbox cannot remount the file system or gain privileges through setuid binaries;
- resource limits: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, and no core
  dumps.

Each step that the system does not allow is skipped with a logged warning (once per process),
and `SandboxResult` records which isolation the run actually had. `isolation_support()` runs one
trivial program to find out in advance.

NOTE: Root inside the sandbox can still read any file that root can read, and it can fill the
disk with many files below the size limit. There is no network to send data to, and the
parent only keeps the first `max_output_bytes` of stdout and stderr.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from codeling.errors import CodelingError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
DEFAULT_MEMORY_MB = 1024
DEFAULT_MAX_PROCESSES = 64
DEFAULT_MAX_FILE_MB = 64
DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
MAX_OPEN_FILES = 256
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
PYTHON_MAIN = "main.py"
BASH_MAIN = "main.sh"
# The launcher and the PID namespace's init process are in the cgroup too.
LAUNCHER_TASKS = 2
# How long cleanup waits for killed processes to disappear from the cgroup.
CLEANUP_SECONDS = 5.0

# The launcher runs as `python -I -S -c _LAUNCHER_SOURCE CONFIG_JSON ARGV...`. It reports what it
# set up as JSON lines on the inherited file descriptor `report_fd`: one {"setup": {...}} line,
# then {"status": WAIT_STATUS} with the program's raw wait status when a PID namespace is used.
# Setup failures are reported as {"fatal": MESSAGE}.
_LAUNCHER_SOURCE = r'''
import ctypes, json, os, resource, signal, sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x00020000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# mount_setattr(2), Linux 5.12+, has number 442 on every architecture (the unified table).
SYS_MOUNT_SETATTR = 442
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                       ctypes.c_void_p]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                       ctypes.c_ulong]
libc.syscall.restype = ctypes.c_long


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def check(result):
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def mount(source, target, fstype, flags):
    encode = lambda text: None if text is None else text.encode()
    check(libc.mount(encode(source), encode(target), encode(fstype), flags, None))


def set_mount_attributes(path, recursive, attr_set=0, attr_clear=0):
    attr = MountAttr(attr_set, attr_clear, 0, 0)
    check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD),
                       ctypes.c_char_p(path.encode()),
                       ctypes.c_long(AT_RECURSIVE if recursive else 0),
                       ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))))


def write_file(path, text):
    with open(path, "w") as file:
        file.write(text)


def report(message):
    os.write(REPORT_FD, (json.dumps(message) + "\n").encode())


def enter_namespaces(setup):
    uid, gid = os.getuid(), os.getgid()
    attempts = [
        CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC,
        CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC,
        CLONE_NEWNET,
        CLONE_NEWUSER | CLONE_NEWNET,
    ]
    for flags in attempts:
        if libc.unshare(flags) == 0:
            break
        setup["errors"].append(f"unshare({flags:#x}): {os.strerror(ctypes.get_errno())}")
    else:
        return 0
    if flags & CLONE_NEWUSER:
        # Map the caller's own ids, so files it creates keep their owner.
        try:
            write_file("/proc/self/setgroups", "deny")
            write_file("/proc/self/uid_map", f"{uid} {uid} 1")
            write_file("/proc/self/gid_map", f"{gid} {gid} 1")
        except OSError as error:
            setup["errors"].append(f"user namespace id map: {error}")
    return flags


def make_filesystem_readonly(workdir):
    # Private propagation first, so that no mount change below reaches the parent's namespace.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount(workdir, workdir, None, MS_BIND)
    devices = [device for device in DEVICES if os.path.exists(device)]
    for device in devices:
        mount(device, device, None, MS_BIND)
    set_mount_attributes("/", True, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV)
    # From here on a failure leaves the working directory read-only, so it is fatal.
    try:
        set_mount_attributes(workdir, False, attr_clear=MOUNT_ATTR_RDONLY)
        for device in devices:
            set_mount_attributes(device, False, attr_clear=MOUNT_ATTR_NODEV)
    except OSError as error:
        raise RuntimeError(f"read-only setup failed halfway: {error}") from error
    # The current directory still points below the read-only mount, not the new bind mount.
    os.chdir(workdir)


def drop_capabilities():
    """Set no_new_privs and drop every capability; return True when all steps worked."""
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
    header = CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    check(libc.capget(ctypes.byref(header), data))
    if not any(part.effective or part.permitted or part.inheritable for part in data):
        return True  # an unprivileged process: no_new_privs alone keeps it that way
    with open("/proc/sys/kernel/cap_last_cap") as file:
        last_capability = int(file.read())
    # An empty bounding set keeps root from regaining capabilities when it executes a program.
    for capability in range(last_capability + 1):
        check(libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0))
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    check(libc.capset(ctypes.byref(header), (CapData * 2)()))
    return True


def finish_setup(setup):
    try:
        setup["capabilities_dropped"] = drop_capabilities()
    except OSError as error:
        setup["errors"].append(f"dropping capabilities: {error}")
    report({"setup": setup})


def exec_target(config, argv):
    try:
        for name, (soft, hard) in config["rlimits"].items():
            kind = getattr(resource, name)
            current_hard = resource.getrlimit(kind)[1]
            if current_hard != resource.RLIM_INFINITY:
                hard = min(hard, current_hard)
                soft = min(soft, hard)
            resource.setrlimit(kind, (soft, hard))
        # Python ignores these two signals; give the program the default actions back.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        os.execvp(argv[0], argv)
    except OSError as error:
        sys.stderr.write(f"sandbox: cannot run {argv[0]}: {error.strerror}\n")
        sys.stderr.flush()
    os._exit(127)


def run_init(config, argv, setup):
    """Run as PID 1 of the new PID namespace: start the program and reap every child."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if setup["filesystem_readonly"]:
        try:
            mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            setup["fresh_proc"] = True
        except OSError as error:
            setup["errors"].append(f"mounting /proc: {error}")
    finish_setup(setup)
    target = os.fork()
    if target == 0:
        exec_target(config, argv)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == target:
            report({"status": status})
            # Exiting makes the kernel kill whatever the program left running in the namespace.
            os._exit(0)


def join_cgroup(config, setup):
    """Move this process into the run's pids cgroup; return True on success."""
    try:
        write_file(os.path.join(config["cgroup"], "cgroup.procs"), str(os.getpid()))
        return True
    except OSError as error:
        setup["errors"].append(f"joining cgroup {config['cgroup']}: {error}")
        return False


def limit_processes(config, setup):
    """Set pids.max, counting the launcher and init only when they exist."""
    extra = config["launcher_tasks"] if setup["pid_namespace"] else 0
    try:
        write_file(os.path.join(config["cgroup"], "pids.max"),
                   str(config["max_processes"] + extra))
        setup["cgroup"] = True
    except OSError as error:
        setup["errors"].append(f"setting pids.max in {config['cgroup']}: {error}")


def main():
    config = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    os.set_inheritable(REPORT_FD, False)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != config["parent_pid"]:
        os._exit(1)  # the parent died before the death signal was armed

    setup = {"cgroup": False, "network_isolated": False, "pid_namespace": False,
             "filesystem_readonly": False, "fresh_proc": False, "capabilities_dropped": False,
             "errors": []}
    # Join the cgroup before entering a user namespace, which may lose the right to.
    joined = bool(config["cgroup"]) and join_cgroup(config, setup)
    flags = enter_namespaces(setup)
    setup["network_isolated"] = bool(flags & CLONE_NEWNET)
    setup["pid_namespace"] = bool(flags & CLONE_NEWPID)
    # Before the file system, /sys/fs/cgroup included, becomes read-only.
    if joined:
        limit_processes(config, setup)
    if flags & CLONE_NEWNS:
        try:
            make_filesystem_readonly(config["workdir"])
            setup["filesystem_readonly"] = True
        except OSError as error:
            setup["errors"].append(f"read-only file system: {error}")

    if setup["pid_namespace"]:
        init = os.fork()
        if init == 0:
            run_init(config, argv, setup)
        os.waitpid(init, 0)
        os._exit(0)
    finish_setup(setup)
    exec_target(config, argv)


REPORT_FD = json.loads(sys.argv[1])["report_fd"]
try:
    main()
except BaseException as error:
    report({"fatal": f"{type(error).__name__}: {error}"})
    os._exit(126)
'''


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run and the isolation it actually had.

    `returncode` is the exit status, the negative signal number when a signal killed the
    program (as in `subprocess`), or None when the run timed out. `killed_by` is "timeout" or
    the signal's name, such as "SIGXCPU" for the CPU time limit or "SIGKILL".
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed_by: str | None
    duration: float
    output_truncated: bool
    network_isolated: bool
    processes_limited: bool
    pid_namespace: bool
    filesystem_readonly: bool
    capabilities_dropped: bool

    @property
    def ok(self) -> bool:
        """True when the program exited with status 0 within the time limit."""
        return self.returncode == 0 and not self.timed_out


def run_python(code: str, timeout: float = DEFAULT_TIMEOUT, memory_mb: int = DEFAULT_MEMORY_MB,
               max_processes: int = DEFAULT_MAX_PROCESSES,
               files: Mapping[str, str | bytes] | None = None, stdin: str | bytes | None = None,
               max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
               env: Mapping[str, str] | None = None,
               max_file_mb: int = DEFAULT_MAX_FILE_MB) -> SandboxResult:
    """Run Python source as `main.py` with this interpreter in isolated mode (`-I`)."""
    files = _with_main_file(files, PYTHON_MAIN, code)
    return run([sys.executable, "-I", PYTHON_MAIN], stdin=stdin, timeout=timeout,
               memory_mb=memory_mb, max_processes=max_processes, files=files,
               max_output_bytes=max_output_bytes, env=env, max_file_mb=max_file_mb)


def run_bash(script: str, timeout: float = DEFAULT_TIMEOUT, memory_mb: int = DEFAULT_MEMORY_MB,
             max_processes: int = DEFAULT_MAX_PROCESSES,
             files: Mapping[str, str | bytes] | None = None, stdin: str | bytes | None = None,
             max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
             env: Mapping[str, str] | None = None,
             max_file_mb: int = DEFAULT_MAX_FILE_MB) -> SandboxResult:
    """Run a Bash script as `main.sh` with `bash --noprofile --norc`."""
    files = _with_main_file(files, BASH_MAIN, script)
    return run(["bash", "--noprofile", "--norc", BASH_MAIN], stdin=stdin, timeout=timeout,
               memory_mb=memory_mb, max_processes=max_processes, files=files,
               max_output_bytes=max_output_bytes, env=env, max_file_mb=max_file_mb)


def run(argv: Sequence[str], stdin: str | bytes | None = None, timeout: float = DEFAULT_TIMEOUT,
        memory_mb: int = DEFAULT_MEMORY_MB, max_processes: int = DEFAULT_MAX_PROCESSES,
        files: Mapping[str, str | bytes] | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, env: Mapping[str, str] | None = None,
        max_file_mb: int = DEFAULT_MAX_FILE_MB,
        workdir: str | Path | None = None) -> SandboxResult:
    """Run a command in a fresh temporary directory under the sandbox's limits.

    `argv[0]` is looked up on the sandbox's PATH (/usr/local/bin:/usr/bin:/bin) unless it is a
    path. `files` maps relative paths to contents written into the working directory first.
    `timeout` is wall-clock seconds, and the CPU time limit is one second more. `memory_mb`
    limits the address space of each process. `max_processes` bounds processes and threads
    together. `max_file_mb` limits the size of each written file. Each of stdout and stderr
    keeps its first `max_output_bytes` bytes.

    `workdir` names an existing directory to run in instead of a fresh one. The program can
    change files there, the directory is kept afterwards, and every other isolation step
    stays the same.
    """
    _check_limits(argv, timeout, memory_mb, max_processes, max_output_bytes, max_file_mb)
    if workdir is not None:
        existing = _existing_workdir(workdir)
        _write_files(Path(existing), files or {})
        return _run_in(argv, existing, stdin, timeout, memory_mb, max_processes,
                       max_output_bytes, env, max_file_mb)
    fresh = tempfile.mkdtemp(prefix="codeling-sandbox-")
    try:
        _write_files(Path(fresh), files or {})
        return _run_in(argv, fresh, stdin, timeout, memory_mb, max_processes, max_output_bytes,
                       env, max_file_mb)
    finally:
        _remove_workdir(fresh)


def _run_in(argv: Sequence[str], workdir: str, stdin: str | bytes | None, timeout: float,
            memory_mb: int, max_processes: int, max_output_bytes: int,
            env: Mapping[str, str] | None, max_file_mb: int) -> SandboxResult:
    cgroup = _PidsCgroup.create()
    try:
        return _execute(list(argv), workdir, stdin, timeout, memory_mb, max_processes,
                        max_output_bytes, env or {}, max_file_mb, cgroup)
    finally:
        if cgroup is not None:
            cgroup.remove()


def _existing_workdir(workdir: str | Path) -> str:
    """Return the absolute, symlink-free path of an existing directory, or raise."""
    resolved = Path(workdir).resolve()
    if not resolved.is_dir():
        raise CodelingError(f"sandbox working directory {str(workdir)!r} does not exist or is "
                            "not a directory; create it first")
    if resolved == Path(resolved.anchor):
        raise CodelingError("the sandbox working directory cannot be the root directory '/', "
                            "because it stays writable; pass a subdirectory")
    return str(resolved)


@functools.lru_cache(maxsize=1)
def isolation_support() -> dict[str, bool]:
    """Run a trivial program once and return which isolation steps this system allows."""
    result = run(["true"], timeout=30)
    return {
        "network_isolated": result.network_isolated,
        "processes_limited": result.processes_limited,
        "pid_namespace": result.pid_namespace,
        "filesystem_readonly": result.filesystem_readonly,
        "capabilities_dropped": result.capabilities_dropped,
    }


# -- arguments and files --------------------------------------------------------------------------


def _check_limits(argv: Sequence[str], timeout: float, memory_mb: int, max_processes: int,
                  max_output_bytes: int, max_file_mb: int) -> None:
    if isinstance(argv, str) or not argv:
        raise CodelingError(f"sandbox command must be a non-empty list of arguments, got {argv!r}")
    if not timeout > 0:
        raise CodelingError(f"sandbox timeout must be positive seconds, got {timeout}")
    if memory_mb < 16:
        raise CodelingError(f"sandbox memory_mb must be at least 16, got {memory_mb}")
    if max_processes < 1:
        raise CodelingError(f"sandbox max_processes must be at least 1, got {max_processes}")
    if max_output_bytes < 0:
        raise CodelingError(f"sandbox max_output_bytes must be >= 0, got {max_output_bytes}")
    if max_file_mb < 1:
        raise CodelingError(f"sandbox max_file_mb must be at least 1, got {max_file_mb}")


def _with_main_file(files: Mapping[str, str | bytes] | None, name: str,
                    source: str) -> dict[str, str | bytes]:
    files = dict(files or {})
    if name in files:
        raise CodelingError(f"sandbox file name {name!r} is reserved for the program; "
                            "rename that file")
    files[name] = source
    return files


def _write_files(workdir: Path, files: Mapping[str, str | bytes]) -> None:
    for name, content in files.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise CodelingError(f"invalid sandbox file name {name!r}; use a relative path "
                                "without '..'")
        path = workdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def _remove_workdir(workdir: str) -> None:
    def log_error(function: Any, path: str, error: Any) -> None:
        logger.warning("could not remove sandbox path %s: %s", path, error)

    if sys.version_info >= (3, 12):
        shutil.rmtree(workdir, onexc=log_error)
    else:
        shutil.rmtree(workdir, onerror=log_error)


def _child_env(workdir: str, extra: Mapping[str, str]) -> dict[str, str]:
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir,
           "TMPDIR": workdir}
    env.update(extra)
    return env


def _rlimits(timeout: float, memory_mb: int, max_file_mb: int,
             max_processes: int, cgroup: _PidsCgroup | None) -> dict[str, list[int]]:
    cpu_seconds = math.ceil(timeout) + 1
    limits = {
        "RLIMIT_AS": [memory_mb << 20, memory_mb << 20],
        # SIGXCPU at the soft limit, SIGKILL one second later.
        "RLIMIT_CPU": [cpu_seconds, cpu_seconds + 1],
        "RLIMIT_FSIZE": [max_file_mb << 20, max_file_mb << 20],
        "RLIMIT_CORE": [0, 0],
        "RLIMIT_NOFILE": [MAX_OPEN_FILES, MAX_OPEN_FILES],
    }
    if cgroup is None and os.getuid() != 0:
        # RLIMIT_NPROC counts every task of the user, not only the sandbox's, so allow the
        # tasks the user already has. Root ignores this limit.
        # NOTE: not exercised on the development machine, where the tests run as root with a
        # pids cgroup. Sandboxes running at the same time share this per-user count.
        allowed = _user_task_count(os.getuid()) + max_processes
        limits["RLIMIT_NPROC"] = [allowed, allowed]
    return limits


def _user_task_count(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue  # the process exited while we looked
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


# -- running and collecting output ----------------------------------------------------------------


def _execute(argv: list[str], workdir: str, stdin: str | bytes | None, timeout: float,
             memory_mb: int, max_processes: int, max_output_bytes: int,
             env: Mapping[str, str], max_file_mb: int,
             cgroup: _PidsCgroup | None) -> SandboxResult:
    report_read, report_write = os.pipe()
    config = {
        "parent_pid": os.getpid(),
        "report_fd": report_write,
        "workdir": workdir,
        "cgroup": str(cgroup.path) if cgroup is not None else None,
        "max_processes": max_processes,
        "launcher_tasks": LAUNCHER_TASKS,
        "rlimits": _rlimits(timeout, memory_mb, max_file_mb, max_processes, cgroup),
    }
    command = [sys.executable, "-I", "-S", "-c", _LAUNCHER_SOURCE, json.dumps(config), *argv]
    stdin_file = _stdin_file(stdin)
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            command, cwd=workdir, env=_child_env(workdir, env),
            stdin=stdin_file if stdin_file is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(report_write,),
            start_new_session=True)
    except BaseException:
        os.close(report_read)
        raise
    finally:
        os.close(report_write)
        if stdin_file is not None:
            stdin_file.close()

    try:
        output = _collect(process, started + timeout, max_output_bytes, cgroup)
        duration = time.monotonic() - started
        messages = _read_report(report_read)
    finally:
        os.close(report_read)
        if process.poll() is None:  # only after an unexpected error in the parent
            _kill_all(process, cgroup)
            process.wait()
    return _build_result(process, output, duration, messages)


def _stdin_file(stdin: str | bytes | None) -> IO[bytes] | None:
    if stdin is None:
        return None
    data = stdin.encode("utf-8") if isinstance(stdin, str) else stdin
    file = tempfile.TemporaryFile()
    file.write(data)
    file.seek(0)
    return file


@dataclass
class _Output:
    stdout: bytearray
    stderr: bytearray
    truncated: bool = False
    timed_out: bool = False


def _collect(process: subprocess.Popen, deadline: float, max_output_bytes: int,
             cgroup: _PidsCgroup | None) -> _Output:
    """Read output until the launcher exits or the deadline passes, then kill what is left."""
    output = _Output(bytearray(), bytearray())
    buffers = {process.stdout.fileno(): output.stdout, process.stderr.fileno(): output.stderr}
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        output.timed_out = not _read_until(selector, buffers, deadline, max_output_bytes, output)
        if not output.timed_out:
            output.timed_out = not _wait_without_reaping(process.pid, deadline)
        # The launcher is a zombie or still running here, so its process group id cannot have
        # been reused yet.
        _kill_all(process, cgroup)
        _read_until(selector, buffers, time.monotonic() + 1.0, max_output_bytes, output)
    process.stdout.close()
    process.stderr.close()
    process.wait()
    return output


def _read_until(selector: selectors.BaseSelector, buffers: dict[int, bytearray], deadline: float,
                max_output_bytes: int, output: _Output) -> bool:
    """Read from both pipes until they reach end of file (True) or the deadline passes."""
    while selector.get_map():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        for key, _ in selector.select(remaining):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fd)
                continue
            buffer = buffers[key.fd]
            room = max_output_bytes - len(buffer)
            if len(chunk) > room:
                output.truncated = True
            buffer += chunk[:max(room, 0)]
    return True


def _wait_without_reaping(pid: int, deadline: float) -> bool:
    """Wait until the process exits, leaving it a zombie; return False at the deadline."""
    delay = 0.001
    while True:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


def _kill_all(process: subprocess.Popen, cgroup: _PidsCgroup | None) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if cgroup is not None:
        cgroup.kill_all()


def _read_report(fd: int) -> list[dict[str, Any]]:
    data = bytearray()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
        if not readable:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    messages = []
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            messages.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("ignoring a malformed sandbox launcher report line: %r", line[:200])
    return messages


def _build_result(process: subprocess.Popen, output: _Output, duration: float,
                  messages: list[dict[str, Any]]) -> SandboxResult:
    fatal = next((message["fatal"] for message in messages if "fatal" in message), None)
    setup = next((message["setup"] for message in messages if "setup" in message), None)
    stderr = output.stderr.decode("utf-8", "replace")
    if fatal is not None:
        raise RuntimeError(f"sandbox launcher failed: {fatal}")
    if setup is None:
        if not output.timed_out:
            raise RuntimeError(f"sandbox launcher failed without a setup report; "
                               f"stderr: {stderr[-500:]!r}")
        setup = dict.fromkeys(_SETUP_FLAGS, False)  # timed out before the setup finished
    else:
        _warn_about_missing_isolation(setup)

    returncode: int | None = None
    killed_by: str | None = None
    if output.timed_out:
        killed_by = "timeout"
    elif setup["pid_namespace"]:
        status = next((message["status"] for message in messages if "status" in message), None)
        if status is None:
            raise RuntimeError("sandbox launcher failed: the program's exit status is missing")
        returncode = os.waitstatus_to_exitcode(status)
    else:
        returncode = process.returncode
    if returncode is not None and returncode < 0:
        killed_by = _signal_name(-returncode)

    return SandboxResult(
        returncode=returncode,
        stdout=output.stdout.decode("utf-8", "replace"),
        stderr=stderr,
        timed_out=output.timed_out,
        killed_by=killed_by,
        duration=duration,
        output_truncated=output.truncated,
        network_isolated=setup["network_isolated"],
        processes_limited=setup["cgroup"] or (os.getuid() != 0),
        pid_namespace=setup["pid_namespace"],
        filesystem_readonly=setup["filesystem_readonly"],
        capabilities_dropped=setup["capabilities_dropped"],
    )


_SETUP_FLAGS = ("cgroup", "network_isolated", "pid_namespace", "filesystem_readonly",
                "capabilities_dropped")
_warned: set[str] = set()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _warn_about_missing_isolation(setup: dict[str, Any]) -> None:
    """Log a warning, once per process, for each isolation step this run did not get."""
    missing = [(key, message) for key, message in _MISSING_ISOLATION.items() if not setup[key]]
    if not setup["cgroup"] and os.getuid() == 0:
        missing.append(("cgroup", "no pids cgroup, and RLIMIT_NPROC does not apply to root, so "
                                  "the number of processes is not limited"))
    errors = "; ".join(setup["errors"]) or "no error reported"
    for key, message in missing:
        if key not in _warned:
            _warned.add(key)
            logger.warning("sandbox: %s (%s)", message, errors)


_MISSING_ISOLATION = {
    "network_isolated": "no network namespace, so sandboxed code can use the network",
    "pid_namespace": "no PID namespace, so processes that leave the process group can outlive "
                     "a run unless the pids cgroup catches them",
    "filesystem_readonly": "no read-only mount namespace, so sandboxed code can write outside "
                           "its working directory",
    "capabilities_dropped": "capabilities were not dropped",
}


# -- the pids cgroup ------------------------------------------------------------------------------


class _PidsCgroup:
    """A cgroup with the pids controller for one run, removed after it."""

    _counter = itertools.count()

    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls) -> _PidsCgroup | None:
        """Create a child cgroup below this process's pids cgroup, or return None."""
        parent = _pids_cgroup_parent()
        if parent is None:
            return None
        path = parent / f"codeling-sandbox-{os.getpid()}-{next(cls._counter)}"
        try:
            path.mkdir()
        except OSError as error:
            logger.debug("cannot create cgroup %s: %s", path, error)
            return None
        return cls(path)

    def kill_all(self) -> None:
        """Send SIGKILL to every process in the group until it is empty."""
        kill_file = self.path / "cgroup.kill"  # cgroup v2 on Linux 5.14+
        deadline = time.monotonic() + CLEANUP_SECONDS
        while time.monotonic() < deadline:
            pids = self._pids()
            if not pids:
                return
            if kill_file.exists():
                kill_file.write_text("1")
            else:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.01)
        logger.warning("sandbox cgroup %s still has processes after SIGKILL", self.path)

    def remove(self) -> None:
        """Kill what is left and remove the cgroup directory."""
        self.kill_all()
        deadline = time.monotonic() + CLEANUP_SECONDS
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as error:
                if time.monotonic() > deadline:
                    logger.warning("could not remove sandbox cgroup %s: %s", self.path, error)
                    return
                time.sleep(0.02)

    def _pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except FileNotFoundError:
            return []
        return [int(line) for line in text.split()]


@functools.lru_cache(maxsize=1)
def _pids_cgroup_parent() -> Path | None:
    """Find a directory where a child cgroup gets a `pids.max` file, or return None."""
    for candidate in _pids_cgroup_candidates():
        probe = candidate / f"codeling-sandbox-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        try:
            works = (probe / "pids.max").exists()
        finally:
            probe.rmdir()
        if works:
            return candidate
    return None


def _pids_cgroup_candidates() -> list[Path]:
    """List this process's cgroup directories in a v1 pids hierarchy and in the v2 hierarchy."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    v1_path = v2_path = None
    for line in own:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            v1_path = path
        elif controllers == "":
            v2_path = path
    candidates = []
    for line in mounts:
        fields, _, tail = line.partition(" - ")
        parts, tail_parts = fields.split(), tail.split()
        if len(parts) < 5 or len(tail_parts) < 3:
            continue
        root, mount_point, fstype, options = parts[3], parts[4], tail_parts[0], tail_parts[2]
        if fstype == "cgroup" and "pids" in options.split(",") and v1_path is not None:
            own_path = v1_path
        elif fstype == "cgroup2" and v2_path is not None:
            own_path = v2_path
        else:
            continue
        if not own_path.startswith(root):
            continue
        relative = own_path[len(root):].lstrip("/")
        candidates.append(Path(mount_point) / relative)
    return candidates
