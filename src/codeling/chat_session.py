"""`codeling chat`: an interactive terminal chat that executes the model's tool calls.

Each user line starts an exchange. The session renders the conversation with `codeling.chat`
(the tools in the system turn), generates one assistant turn, prints its text and executes its
tool calls with a `ToolBox`, appends one tool message per call, and generates again. The
exchange ends when the model replies without calls or after `max_tool_rounds` rounds of calls.

Input comes from stdin line by line, so the chat works at a terminal and with piped input.
`/exit` or end of input ends the chat, `/reset` clears the conversation, and Ctrl-C ends it
too, after saving the transcript.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from codeling import chat
from codeling.errors import CodelingError
from codeling.tokenizer import Tokenizer
from codeling.tools import ToolBox, error_result, parse_tools_option, working_directory

if TYPE_CHECKING:  # importing generate imports torch, which `codeling --help` does not need
    from codeling.inference.generate import GenerationConfig

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


class TurnGenerator(Protocol):
    """The model interface of the chat, met by `Generator` and by scripted test generators."""

    tokenizer: Tokenizer

    def generate_turn(self, prompt_ids: list[int], config: GenerationConfig,
                      tools: list[dict[str, Any]] | None, constrained: bool) -> Sequence[int]:
        """Return the ids of one assistant turn that continues `prompt_ids`."""
        ...


class ChatSession:
    """One conversation: its messages, the tools it may call and where it prints."""

    def __init__(self, generator: TurnGenerator, config: GenerationConfig,
                 toolbox: ToolBox | None = None, system: str | None = None,
                 constrained: bool = False, max_tool_rounds: int = 5,
                 output: TextIO | None = None, transcript: Path | None = None):
        if max_tool_rounds < 0:
            raise CodelingError(f"max tool rounds must be >= 0, got {max_tool_rounds}")
        config.validate()
        self.generator = generator
        self.config = config
        self.toolbox = toolbox
        self.tools = toolbox.specs if toolbox is not None else None
        self.system = system
        self.constrained = constrained
        self.max_tool_rounds = max_tool_rounds
        self.output = output or sys.stdout
        self.transcript = transcript
        self.messages: list[dict[str, Any]] = []
        self.turns_generated = 0
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, keeping the system message."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    # -- one exchange -----------------------------------------------------------------------------

    def send(self, text: str) -> list[dict[str, Any]]:
        """Add a user message and run the exchange to the model's reply; return new messages.

        Raises CodelingError when a turn cannot be generated (a conversation longer than the
        model's context, for example), after removing the whole exchange from the history.
        """
        start = len(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            for round_number in range(self.max_tool_rounds + 1):
                message = self._generate()
                self.messages.append(message)
                self._print_assistant(message)
                calls = message.get("tool_calls") or []
                if not calls:
                    break
                allowed = round_number < self.max_tool_rounds
                for call in calls:
                    self._print_call(call)
                    result = self._execute(call, allowed)
                    self._print(f"[tool result] {result}")
                    self.messages.append({"role": "tool", "content": result})
                if not allowed:
                    self._print(f"[stopped after {self.max_tool_rounds} rounds of tool calls; "
                                "raise --max-tool-rounds to allow more]")
        except CodelingError:
            del self.messages[start:]
            raise
        return self.messages[start:]

    def _generate(self) -> dict[str, Any]:
        tokenizer = self.generator.tokenizer
        prompt = chat.render(_renderable(self.messages), tokenizer, tools=self.tools)
        config = self.config
        if config.seed is not None:
            # A new seed for each turn, so turns differ but the whole chat is reproducible.
            config = dataclasses.replace(config, seed=config.seed + self.turns_generated)
        ids = self.generator.generate_turn(prompt, config, self.tools, self.constrained)
        self.turns_generated += 1
        return chat.parse_assistant(list(ids), tokenizer)

    def _execute(self, call: dict[str, Any], allowed: bool) -> str:
        if not allowed:
            return error_result(f"not executed: the limit of {self.max_tool_rounds} rounds of "
                                "tool calls in one answer was reached")
        if self.toolbox is None:
            return error_result("tools are disabled in this chat; answer without calling tools")
        return self.toolbox.execute(call)

    # -- printing ---------------------------------------------------------------------------------

    def _print(self, text: str) -> None:
        print(text, file=self.output, flush=True)

    def _print_assistant(self, message: dict[str, Any]) -> None:
        if message["content"] or not message.get("tool_calls"):
            self._print(f"assistant> {message['content']}")

    def _print_call(self, call: dict[str, Any]) -> None:
        if call.get("error"):
            self._print(f"[invalid tool call] {call['raw']} ({call['error']})")
            return
        function = call["function"]
        arguments = json.dumps(function["arguments"], ensure_ascii=False)
        self._print(f"[tool call] {function['name']} {arguments}")

    # -- the read loop ----------------------------------------------------------------------------

    def run(self, lines: Iterator[str]) -> None:
        """Send each input line until /exit, the end of input or Ctrl-C; save the transcript."""
        try:
            for line in lines:
                text = line.strip()
                if not text:
                    continue
                if text in EXIT_COMMANDS:
                    break
                if text == RESET_COMMAND:
                    self.reset()
                    self._print("[conversation cleared]")
                    continue
                try:
                    self.send(text)
                except CodelingError as error:
                    print(f"codeling: error: {error}; the exchange was dropped, type /reset "
                          "to start over", file=sys.stderr, flush=True)
                self.save_transcript()
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr, flush=True)
        finally:
            self.save_transcript()

    def save_transcript(self) -> None:
        """Write the conversation, the tools and the working directory as JSON, atomically."""
        if self.transcript is None:
            return
        data = {"messages": self.messages, "tools": self.tools,
                "workdir": str(self.toolbox.workdir) if self.toolbox is not None else None}
        self.transcript.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.transcript.with_name(self.transcript.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n",
                             encoding="utf-8")
        os.replace(temporary, self.transcript)


def _renderable(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return the messages with each unparsed tool call replaced by an empty call.

    NOTE: the chat format has no place for call text that is not valid JSON, so the model gets
    an empty call name in the history where it wrote that text. Its tool result still
    states why the call failed.
    """
    renderable = []
    for message in messages:
        calls = message.get("tool_calls")
        if calls and any(call.get("error") for call in calls):
            fixed = [{"type": "function", "function": {"name": "", "arguments": {}}}
                     if call.get("error") else call for call in calls]
            message = {**message, "tool_calls": fixed}
        renderable.append(message)
    return renderable


def read_user_lines(stream: TextIO, prompt: str = "you> ") -> Iterator[str]:
    """Yield input lines; at a terminal show a prompt and use readline for editing."""
    if stream.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing)
        except ImportError:
            pass
        while True:
            try:
                yield input(prompt)
            except EOFError:
                print(file=sys.stdout)
                return
    else:
        for line in stream:
            yield line.rstrip("\n")


# -- the command ----------------------------------------------------------------------------------


def add_chat_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Declare `codeling chat` and its options on the `codeling` subcommands."""
    parser = commands.add_parser(
        "chat", help="chat with a model in the terminal, executing its tool calls",
        description="Read user messages from stdin, one per line, and print the model's "
        "answers. With --tools builtin the model can call run_python, run_shell, read_file, "
        "list_files, search_code, write_file and git_status; Python and shell run in the "
        "sandbox, and every tool works in one working directory. /exit or the end of input "
        "ends the chat, /reset clears it.")
    parser.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                        help="run directory, stage directory or checkpoint directory")
    parser.add_argument("--tools", default="none", metavar="TOOLS",
                        help="tools the model may call: none, builtin (all seven), or a "
                        "comma-separated list of builtin tool names such as "
                        "list_files,read_file,run_shell (default: none)")
    parser.add_argument("--workdir", default=None,
                        help="working directory of the tools, created if missing (default: a "
                        "new temporary directory, printed at the start and kept)")
    parser.add_argument("--constrained", action="store_true",
                        help="constrain decoding so that every tool call is valid JSON that "
                        "matches the schema of a listed tool")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature; 0 = greedy (default: 0.7)")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="tokens generated at most per assistant turn (default: 256)")
    parser.add_argument("--system", default=None, help="system message text (default: none)")
    parser.add_argument("--max-tool-rounds", type=int, default=5,
                        help="rounds of tool calls executed at most per user message "
                        "(default: 5)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    parser.add_argument("--transcript", default=None, metavar="FILE",
                        help="write the whole conversation as JSON to FILE after every "
                        "exchange (default: none)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N "
                        "(default: auto)")
    return parser


def chat_command(args: argparse.Namespace) -> int:
    """Load the checkpoint named in `args` and chat over stdin and stdout; return 0."""
    from codeling.inference.generate import GenerationConfig, Generator

    if args.max_tool_rounds < 0:
        raise CodelingError(f"--max-tool-rounds must be >= 0, got {args.max_tool_rounds}")
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              seed=args.seed)
    config.validate()
    tool_names = parse_tools_option(args.tools)
    if args.workdir is not None and tool_names is None:
        raise CodelingError("--workdir sets the working directory of the tools, which are off; "
                            "add --tools builtin or drop --workdir")
    if args.transcript:
        _check_transcript_path(Path(args.transcript))
    generator = Generator.from_checkpoint(args.checkpoint, device=args.device)
    toolbox = _toolbox(args.workdir, tool_names) if tool_names is not None else None
    _check_context(generator, toolbox, args.system)
    session = ChatSession(generator, config, toolbox=toolbox, system=args.system,
                          constrained=args.constrained, max_tool_rounds=args.max_tool_rounds,
                          transcript=Path(args.transcript) if args.transcript else None)
    if sys.stdin.isatty():
        print("Type a message and press Enter; /exit ends the chat, /reset clears it.")
    session.run(read_user_lines(sys.stdin))
    return 0


def _check_transcript_path(path: Path) -> None:
    """Raise CodelingError unless a transcript can be written at `path`."""
    if path.is_dir():
        raise CodelingError(f"--transcript {str(path)!r} is a directory; give a file path such "
                            "as chat.json")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CodelingError(f"--transcript {str(path)!r} cannot be written ({parent} is not a "
                            "writable directory); give a path in a writable directory")


def _check_context(generator: Any, toolbox: ToolBox | None, system: str | None) -> None:
    """Raise CodelingError when the system turn and tools alone fill the model's context."""
    from codeling import chat

    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": ""})
    tools = toolbox.specs if toolbox is not None else None
    length = len(chat.render(messages, generator.tokenizer, tools))
    context = generator.model.config.max_seq_len
    if length >= context:
        fixes = ["use a model with a longer model.max_seq_len"]
        if tools:
            fixes.append("name fewer tools, as in --tools list_files,read_file,run_shell")
        if system:
            fixes.append("give a shorter --system")
        raise CodelingError(
            f"the system turn{' with the tool descriptions' if tools else ''} is {length} "
            f"tokens but the model's context is {context}; {', or '.join(fixes)}")


def _toolbox(workdir: str | None, names: list[str]) -> ToolBox:
    path, new = working_directory(workdir, "codeling-chat-")
    print(f"working directory: {path}{' (new, kept after the chat)' if new else ''}", flush=True)
    return ToolBox(path, names=names)
