"""The builtin tools of `codeling chat`: OpenAI tool specs and the code that executes them.

Every tool works in one working directory, owned by a `ToolBox`:

- `read_file`, `list_files` and `write_file` resolve the path, symlinks included, and reject
  one that lands outside the working directory;
- `run_python`, `run_shell`, `git_status` and `search_code` run in `codeling.sandbox` with the
  working directory as their current directory: no network, a minimal environment without the
  parent's variables, and limits on time, memory and processes. `search_code` runs there too,
  so that a regular expression with catastrophic backtracking hits the time limit instead of
  hanging the chat.

A tool call always returns a string: the file text for `read_file`, JSON for everything else.
A problem (an unknown tool, arguments that do not match the schema, a path outside the working
directory, a timeout) comes back as the JSON object {"error": MESSAGE}, so the model receives
it and the chat goes on.

NOTE: The sandboxed tools can write anything inside the working directory, `.git/hooks` and
`.git/config` included, and git runs those hooks and config commands later outside any
sandbox. Inspect a working directory before running git or other programs there yourself.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from codeling import sandbox
from codeling.errors import CodelingError


def _tool(name: str, description: str, properties: dict[str, Any],
          required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required,
                       "additionalProperties": False}}}


# The synthetic training conversations use these exact names and arguments.
BUILTIN_TOOLS: list[dict[str, Any]] = [
    _tool("run_python", "Run Python code and return its exit code, stdout and stderr.",
          {"code": {"type": "string", "description": "Python source"}}, ["code"]),
    _tool("run_shell", "Run a Bash command and return its exit code, stdout and stderr.",
          {"command": {"type": "string"}}, ["command"]),
    _tool("read_file", "Read a text file.",
          {"path": {"type": "string", "description": "relative path"}}, ["path"]),
    _tool("list_files", "List a directory. Subdirectories end with '/'.",
          {"path": {"type": "string", "default": "."}}, []),
    _tool("search_code", "Search the files under a path for a regular expression and "
          "return the matching lines.",
          {"pattern": {"type": "string"}, "path": {"type": "string", "default": "."}},
          ["pattern"]),
    _tool("write_file", "Write a text file, replacing any existing one.",
          {"path": {"type": "string", "description": "relative path"},
           "content": {"type": "string"}}, ["path", "content"]),
    _tool("git_status", "Show git status --short.", {}, []),
]

TOOL_NAMES = tuple(tool["function"]["name"] for tool in BUILTIN_TOOLS)


def working_directory(workdir: str | None, prefix: str) -> tuple[Path, bool]:
    """Return the tools' working directory and whether it is a new temporary one.

    Without `workdir`, a new temporary directory named PREFIX... is made and left in place
    afterwards, so that what the tools wrote can be inspected. A given `workdir` is created
    when missing.
    """
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix=prefix)), True
    path = Path(workdir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CodelingError(f"failed to create the working directory {workdir!r}: "
                            f"{error.strerror}; pass another --workdir") from error
    return path.resolve(), False


def parse_tools_option(value: str) -> list[str] | None:
    """Return the builtin tool names a --tools value selects, or None for "none".

    "builtin" selects every builtin tool, and a comma-separated list of names selects those.
    Fewer tool descriptions leave more of a small model's context for the conversation.
    """
    value = value.strip()
    if value == "none":
        return None
    if value == "builtin":
        return list(TOOL_NAMES)
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in TOOL_NAMES]
    fix = f"use none, builtin, or a comma-separated list of {', '.join(TOOL_NAMES)}"
    if not names:
        raise CodelingError(f"--tools {value!r} names no tool; {fix}")
    if unknown:
        raise CodelingError(f"--tools {value!r}: {', '.join(map(repr, unknown))} is not a "
                            f"builtin tool; {fix}")
    return list(dict.fromkeys(names))

# Linux rejects a single command-line argument longer than 32 pages (128 KiB).
MAX_CODE_CHARS = 100_000
# Directories that `search_code` does not enter.
SKIPPED_DIRECTORIES = (".git", "__pycache__", "node_modules", ".venv", ".mypy_cache")


@dataclass(frozen=True)
class ToolLimits:
    """Bounds on what one tool call may use and return.

    `timeout` (wall-clock seconds), `memory_mb` and `max_processes` apply to each sandboxed
    run. `max_output_chars` bounds each returned text: a file, stdout, stderr or a listing.
    """

    timeout: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 64
    max_output_chars: int = 8000
    max_read_bytes: int = 1_000_000
    max_write_bytes: int = 1_000_000
    max_list_entries: int = 200
    max_search_matches: int = 50
    max_search_files: int = 2000

    def validate(self) -> None:
        """Raise CodelingError for a limit that is not positive."""
        for name, value in vars(self).items():
            if not value > 0:
                raise CodelingError(f"tool limit {name} must be positive, got {value}")


class ToolError(CodelingError):
    """A tool call that cannot run; the message goes back to the model as the result."""


def error_result(message: str) -> str:
    """Return the JSON string that reports a failed tool call to the model."""
    return json.dumps({"error": message}, ensure_ascii=False)


class ToolBox:
    """The builtin tools, confined to one existing working directory."""

    def __init__(self, workdir: str | Path, limits: ToolLimits | None = None,
                 names: list[str] | None = None):
        """Confine the builtin tools to `workdir`, with only the tools in `names` (default: all).

        Tools left out are neither described to the model nor run.
        """
        unknown = sorted(set(names or ()) - set(TOOL_NAMES))
        if unknown:
            raise CodelingError(f"unknown builtin tools {unknown}; choose from "
                                f"{', '.join(TOOL_NAMES)}")
        self.limits = limits or ToolLimits()
        self.limits.validate()
        self.workdir = Path(workdir).resolve()
        if not self.workdir.is_dir():
            raise CodelingError(f"tool working directory {str(workdir)!r} does not exist or is "
                                "not a directory; create it first")
        if self.workdir == Path(self.workdir.anchor):
            raise CodelingError("the tool working directory cannot be the root directory '/'; "
                                "pass a subdirectory")
        chosen = [tool for tool in BUILTIN_TOOLS
                  if names is None or tool["function"]["name"] in names]
        self.specs: list[dict[str, Any]] = copy.deepcopy(chosen)
        self._validators = {
            tool["function"]["name"]: jsonschema.Draft202012Validator(
                tool["function"]["parameters"])
            for tool in chosen}

    # -- dispatch ---------------------------------------------------------------------------------

    def execute(self, call: Mapping[str, Any]) -> str:
        """Execute one canonical tool call ({"type": "function", "function": {...}}).

        A call that the chat parser could not read carries "error" and "raw" keys; it gets an
        error result without running anything.
        """
        if call.get("error"):
            return error_result(f"the tool call could not be parsed ({call['error']}); write "
                                'it as {"name": ..., "arguments": {...}}')
        function = call.get("function")
        if not isinstance(function, Mapping):
            return error_result('the tool call has no "function" object')
        return self.call(function.get("name"), function.get("arguments"))

    def call(self, name: Any, arguments: Any) -> str:
        """Validate the arguments against the tool's schema, run the tool, return its result."""
        if not isinstance(name, str) or name not in self._validators:
            return error_result(f"unknown tool {name!r}; the available tools are "
                                f"{', '.join(TOOL_NAMES)}")
        if not isinstance(arguments, Mapping):
            return error_result(f"the arguments of {name} must be a JSON object, got "
                                f"{type(arguments).__name__} {truncate(repr(arguments), 200)}")
        problems = sorted(self._validators[name].iter_errors(dict(arguments)),
                          key=lambda error: list(error.path))
        if problems:
            details = "; ".join(_describe_schema_error(error) for error in problems)
            return error_result(f"invalid arguments for {name}: {details}")
        try:
            return getattr(self, f"_tool_{name}")(**arguments)
        except ToolError as error:
            return error_result(str(error))

    @property
    def _max_output_bytes(self) -> int:
        """Bytes kept of each sandboxed stream: enough for max_output_chars of any UTF-8 text."""
        return 4 * self.limits.max_output_chars + 4

    # -- file tools -------------------------------------------------------------------------------

    def resolve(self, path: str) -> Path:
        """Resolve a path given to a tool, symlinks included; raise ToolError outside workdir."""
        if not path or "\0" in path:
            raise ToolError(f"invalid path {path!r}; pass a relative path such as 'src/main.py'")
        candidate = Path(path) if os.path.isabs(path) else self.workdir / path
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as error:  # a symlink loop, for example
            raise ToolError(f"failed to resolve path {path!r}: {error}") from error
        if resolved != self.workdir and self.workdir not in resolved.parents:
            raise ToolError(f"path {path!r} resolves to {str(resolved)!r}, which is outside the "
                            f"working directory {str(self.workdir)!r}; use a path inside it")
        return resolved

    def _relative(self, path: Path) -> str:
        return str(path.relative_to(self.workdir)) if path != self.workdir else "."

    def _tool_read_file(self, path: str) -> str:
        resolved = self.resolve(path)
        info = _stat(resolved, path)
        if not stat.S_ISREG(info.st_mode):
            raise ToolError(f"{path!r} is not a regular file; use list_files for a directory")
        # O_NONBLOCK keeps a FIFO swapped in after the check from blocking the open, and
        # O_NOFOLLOW rejects a final symlink swapped in after it.
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except OSError as error:
            raise ToolError(f"failed to read {path!r}: {error.strerror}") from error
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise ToolError(f"{path!r} is not a regular file")
            data = file.read(self.limits.max_read_bytes)
        text = _decode_text(data, path)
        note = ""
        if info.st_size > len(data):
            note = f"\n[file truncated: read the first {len(data)} of {info.st_size} bytes]"
        return truncate(text, self.limits.max_output_chars) + note

    def _tool_list_files(self, path: str = ".") -> str:
        resolved = self.resolve(path)
        if not stat.S_ISDIR(_stat(resolved, path).st_mode):
            raise ToolError(f"{path!r} is not a directory; use read_file for a file")
        try:
            with os.scandir(resolved) as entries:
                names = sorted(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else "")
                               for entry in entries)
        except OSError as error:
            raise ToolError(f"failed to list {path!r}: {error.strerror}") from error
        limit = self.limits.max_list_entries
        if len(names) > limit:
            names = names[:limit] + [f"... and {len(names) - limit} more entries"]
        return json.dumps(names, ensure_ascii=False)

    def _tool_write_file(self, path: str, content: str) -> str:
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ToolError(f"content is not valid Unicode text: {error.reason} at character "
                            f"{error.start}") from error
        if len(data) > self.limits.max_write_bytes:
            raise ToolError(f"content is {len(data)} bytes; the limit for write_file is "
                            f"{self.limits.max_write_bytes} bytes")
        resolved = self.resolve(path)
        if resolved.exists() and not resolved.is_file():
            raise ToolError(f"{path!r} exists and is not a regular file; choose another path")
        try:
            resolved.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(resolved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_NONBLOCK, 0o644)
            with os.fdopen(fd, "wb") as file:
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                    raise ToolError(f"{path!r} is not a regular file")
                file.write(data)
        except OSError as error:
            raise ToolError(f"failed to write {path!r}: {error.strerror}") from error
        return json.dumps({"path": self._relative(resolved), "bytes_written": len(data)})

    # -- sandboxed tools --------------------------------------------------------------------------

    def _tool_run_python(self, code: str) -> str:
        _check_program(code, "code")
        # -E and -s instead of -I: the working directory stays on sys.path, so the code can
        # import modules that write_file created there.
        return self._run_process([sys.executable, "-E", "-s", "-c", code])

    def _tool_run_shell(self, command: str) -> str:
        _check_program(command, "command")
        return self._run_process(["bash", "--noprofile", "--norc", "-c", command])

    def _tool_git_status(self) -> str:
        # Git looks for a repository in parent directories too; the ceiling stops it at the
        # working directory.
        ceiling = {"GIT_CEILING_DIRECTORIES": str(self.workdir.parent)}
        return self._run_process(["git", "status", "--short"], env=ceiling)

    def _tool_search_code(self, pattern: str, path: str = ".") -> str:
        _check_program(pattern, "pattern")
        resolved = self.resolve(path)
        _stat(resolved, path)
        settings = {"pattern": pattern, "root": str(resolved), "workdir": str(self.workdir),
                    "skip": list(SKIPPED_DIRECTORIES),
                    "max_matches": self.limits.max_search_matches,
                    "max_files": self.limits.max_search_files,
                    "max_file_bytes": self.limits.max_read_bytes, "max_line_chars": 300}
        result = self._sandboxed([sys.executable, "-I", "-S", "-c", _SEARCH_SOURCE,
                                  json.dumps(settings)])
        if result.timed_out:
            raise ToolError(f"search_code timed out after {self.limits.timeout:g} s; use a "
                            "simpler pattern or a narrower path")
        if not result.ok:
            raise ToolError(f"search_code failed: {truncate(result.stderr.strip(), 500)}")
        return result.stdout.strip()

    def _run_process(self, argv: list[str], env: Mapping[str, str] | None = None) -> str:
        result = self._sandboxed(argv, env)
        report: dict[str, Any] = {"exit_code": result.returncode,
                                  "stdout": self._stream_text(result.stdout, result),
                                  "stderr": self._stream_text(result.stderr, result)}
        if result.timed_out:
            report["error"] = f"timed out after {self.limits.timeout:g} s and was killed"
        elif result.killed_by is not None:
            report["error"] = f"killed by {result.killed_by}"
        return json.dumps(report, ensure_ascii=False)

    def _stream_text(self, text: str, result: sandbox.SandboxResult) -> str:
        # The sandbox reports one flag for both streams; a stream it cut filled its buffer.
        full = len(text.encode("utf-8", "replace")) >= self._max_output_bytes - 3
        return truncate(text, self.limits.max_output_chars, result.output_truncated and full)

    def _sandboxed(self, argv: list[str],
                   env: Mapping[str, str] | None = None) -> sandbox.SandboxResult:
        try:
            return sandbox.run(argv, timeout=self.limits.timeout, memory_mb=self.limits.memory_mb,
                               max_processes=self.limits.max_processes,
                               max_output_bytes=self._max_output_bytes,
                               env=env, workdir=self.workdir)
        except (OSError, RuntimeError, CodelingError) as error:
            raise ToolError(f"the sandbox failed to run {argv[0]}: {error}") from error


def truncate(text: str, limit: int, cut_before: bool = False) -> str:
    """Return text cut to `limit` characters, with a note saying how much was cut.

    `cut_before` means the text is already the start of a longer output.
    """
    if len(text) <= limit and not cut_before:
        return text
    shown = min(limit, len(text))
    total = f"more than {len(text)}" if cut_before else str(len(text))
    return text[:limit] + f"\n[output truncated: showed {shown} of {total} characters]"


def _describe_schema_error(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(part) for part in error.path)
    return f"{where}: {error.message}" if where else error.message


def _check_program(text: str, name: str) -> None:
    if "\0" in text:
        raise ToolError(f"{name} contains a NUL character, which a command line cannot carry")
    if len(text) > MAX_CODE_CHARS:
        raise ToolError(f"{name} is {len(text)} characters; the limit is {MAX_CODE_CHARS}")


def _stat(resolved: Path, path: str) -> os.stat_result:
    try:
        return resolved.stat()
    except FileNotFoundError:
        raise ToolError(f"{path!r} does not exist; use list_files to see what does") from None
    except OSError as error:
        raise ToolError(f"failed to access {path!r}: {error.strerror}") from error


def _decode_text(data: bytes, path: str) -> str:
    if b"\0" in data:
        raise ToolError(f"{path!r} is a binary file, not text")
    # A multi-byte character may be cut at the read limit, so ignore errors in the last 3 bytes.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(data) - 3:
            raise ToolError(f"{path!r} is not UTF-8 text") from error
        return data[:error.start].decode("utf-8")


# The search program run in the sandbox. It walks the tree without following symlinks, skips
# files whose real path is outside the working directory (the sandbox can read the whole file
# system), and prints {"matches": [...], "truncated": bool} as JSON.
_SEARCH_SOURCE = r'''
import json, os, re, sys

settings = json.loads(sys.argv[1])
workdir, root = settings["workdir"], settings["root"]
try:
    regex = re.compile(settings["pattern"])
    matches_line = lambda line: regex.search(line) is not None
except re.error:
    matches_line = lambda line: settings["pattern"] in line


def inside(path):
    real = os.path.realpath(path)
    return real == workdir or real.startswith(workdir + os.sep)


def files():
    if not os.path.isdir(root):
        yield root
        return
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories
                                   if name not in settings["skip"])
        for name in sorted(names):
            yield os.path.join(directory, name)


matches, truncated, scanned = [], False, 0
for path in files():
    if not inside(path) or not os.path.isfile(path):
        continue
    scanned += 1
    if scanned > settings["max_files"]:
        truncated = True
        break
    try:
        with open(path, "rb") as file:
            data = file.read(settings["max_file_bytes"])
    except OSError:
        continue
    if b"\0" in data:
        continue
    text = data.decode("utf-8", "replace")
    for number, line in enumerate(text.splitlines(), 1):
        if matches_line(line):
            matches.append({"path": os.path.relpath(path, workdir), "line": number,
                            "text": line[:settings["max_line_chars"]]})
            if len(matches) >= settings["max_matches"]:
                truncated = True
                break
    if truncated:
        break
print(json.dumps({"matches": matches, "truncated": truncated}, ensure_ascii=False))
'''
