"""A simple chat format over the tokenizer's special tokens.

A conversation renders as

    <|bos|> <|system|> text <|end_turn|> <|user|> text <|end_turn|> ... <|assistant|>

where each message is its role token, its encoded text and `<|end_turn|>`. The final
`<|assistant|>` opens the turn the model generates, and the model ends it with `<|end_turn|>`.
Special tokens are inserted by id, so special-token strings inside message text stay plain text.

NOTE: this format is a stand-in until a tuned chat template exists. The server calls only
`render_chat`, so a new template replaces this one function.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from codeling.errors import CodelingError
from codeling.tokenizer import Tokenizer

# OpenAI's "developer" role replaces "system" for newer models; both render as system turns.
ROLE_TOKENS = {
    "system": "<|system|>",
    "developer": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}


class ChatFormatError(CodelingError):
    """A message that the chat format cannot render; `param` names the field, as in OpenAI."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def message_text(content: Any, param: str) -> str:
    """Return the text of a message's content: a string, None or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for index, part in enumerate(content):
            part_type = part.get("type") if isinstance(part, Mapping) else None
            if part_type != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(
                    f"content part {index} has type {part_type!r}; only text parts "
                    "({\"type\": \"text\", \"text\": ...}) are supported", f"{param}[{index}]")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatFormatError(f"content must be a string or a list of text parts, got "
                          f"{type(content).__name__}", param)


def render_chat(messages: Sequence[Mapping[str, Any]], tokenizer: Tokenizer) -> list[int]:
    """Render chat messages into prompt token ids that end with an open assistant turn.

    Raises ChatFormatError for an empty list, an unknown role or content that is not text.
    """
    if not messages:
        raise ChatFormatError("messages is empty; send at least one message", "messages")
    end_turn = tokenizer.token_id("<|end_turn|>")
    ids = [tokenizer.bos_id]
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ROLE_TOKENS:
            raise ChatFormatError(
                f"messages[{index}] has role {role!r}; supported roles are "
                f"{', '.join(ROLE_TOKENS)}", f"messages[{index}].role")
        text = message_text(message.get("content"), f"messages[{index}].content")
        ids.append(tokenizer.token_id(ROLE_TOKENS[role]))
        ids.extend(tokenizer.encode(text))
        ids.append(end_turn)
    ids.append(tokenizer.token_id("<|assistant|>"))
    return ids
