"""Chat with a tools-stage model that calls tools, with the loop written out step by step.

    python examples/chat_with_tools.py runs/cpu-tiny "Which files are in this folder?"

The model sees the builtin tools (run Python or shell, read, list, search and write files, git
status) described in its system turn. Each assistant turn either answers in text or calls
tools; calls run in `codeling.sandbox`, confined to a scratch working directory, and their
results go back to the model until it answers. `codeling chat` runs the same loop
interactively.
"""

import json
import sys
import tempfile
from pathlib import Path

from codeling import chat
from codeling.inference.generate import GenerationConfig, Generator
from codeling.tools import ToolBox

MAX_ROUNDS = 3


def main(run_dir: str, question: str) -> list[dict]:
    generator = Generator.from_checkpoint(run_dir)
    workdir = Path(tempfile.mkdtemp(prefix="codeling-example-"))
    (workdir / "hello.py").write_text('print("hello from the sandbox")\n')
    toolbox = ToolBox(workdir)
    config = GenerationConfig(max_new_tokens=160, temperature=0.0)

    messages = [{"role": "system", "content": "You are a coding assistant with tools."},
                {"role": "user", "content": question}]
    print(f"user: {question}")
    for _ in range(MAX_ROUNDS):
        # 1. Render the conversation and the tool schemas with the chat template.
        prompt = chat.render(messages, generator.tokenizer, toolbox.specs)
        if len(prompt) >= generator.model.config.max_seq_len:
            print(f"[the conversation no longer fits in {generator.model.config.max_seq_len} "
                  "tokens]")
            break
        # 2. Generate one assistant turn; constrained decoding keeps every call valid JSON that
        #    matches a listed tool's schema.
        ids = generator.generate_turn(prompt, config, tools=toolbox.specs, constrained=True)
        # 3. Parse the turn into text and tool calls.
        reply = chat.parse_assistant(ids, generator.tokenizer)
        messages.append(reply)
        if reply["content"]:
            print(f"assistant: {reply['content']}")
        calls = reply.get("tool_calls", [])
        if not calls:
            break
        # 4. Run each call in the sandbox and add its result as a tool message.
        for call in calls:
            function = call["function"]
            print(f"tool call: {function['name']}({json.dumps(function['arguments'])})")
            result = toolbox.execute(call)
            print(f"tool result: {result[:200]}")
            messages.append({"role": "tool", "content": result})
    return messages


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "Which files are in this folder?")
