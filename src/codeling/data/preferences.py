"""Preference pairs for stage 4: reading public layouts, tokenizing, batching, building a set.

A preference pair is a prompt (messages, optionally with tools) and two assistant replies, the
chosen and the rejected one. `read_preferences` accepts one JSON object per line in any of
these layouts:

1. `{"prompt": str, "chosen": str, "rejected": str}`: the prompt is one user message and the
   responses are plain assistant text. `prompt` may also be a message list.
2. `{"chosen": [messages], "rejected": [messages]}`: two whole conversations that share every
   message but the last, which is the assistant's response (Anthropic HH and UltraFeedback as
   message lists). The shared messages are the prompt; a `prompt` field is then ignored.
3. `{"messages": [prompt messages], "chosen": ..., "rejected": ..., "tools": [...]}` with each
   response an assistant message (text and/or `tool_calls`) or a string. This is the layout
   `codeling data preferences` writes, with `kind` and `origin` added.

Strings in the Anthropic HH transcript form ("\\n\\nHuman: ...\\n\\nAssistant: ...") are read as
layout 2. Every record becomes a `PreferencePair` in the canonical chat form of
`codeling.chat`, and a bad record raises CodelingError naming its file and line.

A pair renders to two token sequences, prompt + chosen and prompt + rejected. Their masks are 1
on the completion only: the assistant turn's text, tool calls and closing `<|end_turn|>`. DPO
sums log-probabilities over exactly those tokens.

`codeling.data.preference_builder` (`codeling data preferences`) builds a set whose labels are
checked by running code or validating tool calls.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codeling import chat
from codeling.data.chat_data import Example, examples_to_batch, iter_sft_eval_batches
from codeling.data.loader import check_loader_state
from codeling.data.sources import iter_json_lines
from codeling.errors import CodelingError
from codeling.tokenizer import SPECIAL_TOKENS, Tokenizer

log = logging.getLogger(__name__)

PREFERENCES = "preferences"
PREFS_PREFIX = "prefs:"
STATE_VERSION = 1
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


# -- the canonical pair and reading public layouts ----------------------------------------------


@dataclass
class PreferencePair:
    """A prompt and two assistant replies in canonical chat form, with where they came from."""

    prompt: list[dict[str, Any]]
    chosen: dict[str, Any]
    rejected: dict[str, Any]
    tools: list[dict[str, Any]] | None = None
    kind: str = ""  # what is wrong with the rejected reply, e.g. "code/wrong_result"
    origin: dict[str, str] = field(default_factory=dict)  # {"chosen": ..., "rejected": ...}
    id: str = ""

    def to_record(self) -> dict[str, Any]:
        """Return the pair as a layout-3 JSON object."""
        record: dict[str, Any] = {"id": self.id, "kind": self.kind, "origin": self.origin,
                                  "messages": self.prompt}
        if self.tools:
            record["tools"] = self.tools
        record["chosen"] = self.chosen
        record["rejected"] = self.rejected
        return record


class RecordError(ValueError):
    """A record that does not fit any preference layout; the reader adds file and line."""


def canonical_message(message: Any, where: str) -> dict[str, Any]:
    """Return a message in canonical form: text content and tool calls as name plus dict."""
    if not isinstance(message, Mapping):
        raise RecordError(f"{where} must be a message object, got {type(message).__name__}")
    role = message.get("role", "assistant")
    if role not in chat.ROLE_TOKENS:
        raise RecordError(f"{where} has role {role!r}; expected one of "
                          f"{', '.join(chat.ROLE_TOKENS)}")
    role = "system" if role == "developer" else role
    try:
        content = chat.message_text(message.get("content"), f"{where}.content")
        result: dict[str, Any] = {"role": role, "content": content}
        calls = message.get("tool_calls") or []
        if calls and role != "assistant":
            raise RecordError(f"{where} has tool_calls but role {role!r}; only assistant "
                              "messages call tools")
        if calls:
            result["tool_calls"] = []
            for index, call in enumerate(calls):
                name, arguments = chat.call_function(call, f"{where}.tool_calls[{index}]")
                result["tool_calls"].append({"type": "function", "function": {
                    "name": name, "arguments": arguments}})
    except chat.ChatFormatError as error:
        raise RecordError(f"{error} ({error.param})") from None
    return result


def _response(value: Any, where: str) -> dict[str, Any]:
    """Return an assistant message from a string, a message or a one-message list."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, list):
        if len(value) != 1:
            raise RecordError(f"{where} must be one assistant message here, got a list of "
                              f"{len(value)}")
        value = value[0]
    message = canonical_message(value, where)
    if message["role"] != "assistant":
        raise RecordError(f"{where} must be an assistant message, got role {message['role']!r}")
    return message


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where} must be a non-empty list of messages")
    return [canonical_message(message, f"{where}[{index}]")
            for index, message in enumerate(value)]


def _hh_messages(text: str, where: str) -> list[dict[str, Any]]:
    """Split an Anthropic HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise RecordError(f"{where} is a string but neither the prompt/chosen/rejected layout "
                          "nor an HH transcript starting with \"\\n\\nHuman: \"")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def _split_conversations(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]
                         ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Return (shared prompt, chosen response, rejected response) of two whole conversations."""
    if len(chosen) != len(rejected) or chosen[:-1] != rejected[:-1]:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        raise RecordError(f"chosen and rejected must share every message but the last; they "
                          f"differ at message {shared} (of {len(chosen)} and {len(rejected)})")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise RecordError("the last message of chosen and of rejected must be the assistant's "
                          "response")
    return chosen[:-1], chosen[-1], rejected[-1]


def normalize_record(record: Any) -> PreferencePair:
    """Turn one record in any supported layout into a PreferencePair; raise RecordError."""
    if not isinstance(record, Mapping):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("chosen", "rejected") if key not in record]
    if missing:
        raise RecordError(f"missing {' and '.join(missing)}; every layout needs chosen and "
                          "rejected")
    chosen, rejected = record["chosen"], record["rejected"]
    tools = record.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise RecordError("tools must be a list of tool specs")
    if isinstance(chosen, list) and isinstance(rejected, list) \
            and (len(chosen) > 1 or len(rejected) > 1 or "messages" not in record
                 and "prompt" not in record):
        prompt, chosen_response, rejected_response = _split_conversations(
            _messages(chosen, "chosen"), _messages(rejected, "rejected"))
    elif "messages" in record:
        prompt = _messages(record["messages"], "messages")
        chosen_response, rejected_response = _response(chosen, "chosen"), _response(rejected, "rejected")
    elif "prompt" in record:
        raw = record["prompt"]
        if isinstance(raw, str):
            prompt = [{"role": "user", "content": raw}]
        else:
            prompt = _messages(raw, "prompt")
        chosen_response, rejected_response = _response(chosen, "chosen"), _response(rejected, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen_response, rejected_response = _split_conversations(
            _hh_messages(chosen, "chosen"), _hh_messages(rejected, "rejected"))
    else:
        raise RecordError("no prompt: give prompt, messages, or chosen and rejected as whole "
                          "conversations")
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):
        last = prompt[-1]["role"] if prompt else "nothing"
        raise RecordError(f"the prompt must end with a user or tool message, so the responses are "
                          f"the assistant's next turn; it ends with {last}")
    if chosen_response == rejected_response:
        raise RecordError("chosen and rejected are the same response; a pair needs two different "
                          "responses")
    origin = record.get("origin") if isinstance(record.get("origin"), dict) else {}
    return PreferencePair(prompt, chosen_response, rejected_response, tools,
                          kind=str(record.get("kind", "")), origin=dict(origin),
                          id=str(record.get("id", "")))


def read_preferences(path: str | Path) -> list[PreferencePair]:
    """Read a JSONL file of preference records; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise CodelingError(f"preference file not found: {path}; give a JSONL file with one "
                            '{"prompt", "chosen", "rejected"} object per line, or build one '
                            "with `codeling data preferences`")
    pairs = []
    for number, record in iter_json_lines(path):
        try:
            pairs.append(normalize_record(record))
        except RecordError as error:
            raise CodelingError(f"{path}:{number}: invalid preference record: {error}") from None
    if not pairs:
        raise CodelingError(f"{path} has no preference records; add one JSON object per line")
    return pairs


def write_preferences(path: Path, pairs: Sequence[PreferencePair]) -> None:
    """Write pairs as layout-3 JSONL."""
    with open(path, "w", encoding="utf-8") as out:
        for pair in pairs:
            out.write(json.dumps(pair.to_record(), ensure_ascii=False) + "\n")


# -- sources ------------------------------------------------------------------------------------


def is_preference_source(spec: str) -> bool:
    """Return True for specs that name preference pairs."""
    return spec.split(":")[0] == PREFERENCES or spec.startswith(PREFS_PREFIX)


def source_name(spec: str) -> str:
    """Return the directory-safe name of a preference source."""
    if spec.split(":")[0] == PREFERENCES:
        return PREFERENCES
    return "prefs-" + Path(spec[len(PREFS_PREFIX):]).stem


def preference_dataset_dir(run_dir: Path) -> Path:
    """Return the folder where a run keeps its built preference set (train.jsonl, test.jsonl, manifest.json)."""
    return Path(run_dir) / "data" / PREFERENCES


def split_by_hash(pairs: Sequence[PreferencePair], val_fraction: float
                  ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split pairs into (train, validation) by a hash of each record, stable across runs."""
    train, val = [], []
    for pair in pairs:
        key = json.dumps(pair.to_record(), sort_keys=True).encode("utf-8")
        bucket = zlib.crc32(key) % 10_000 / 10_000
        (val if bucket < val_fraction else train).append(pair)
    return train, val


def load_preference_splits(spec: str, run_dir: Path, checkpoint: Path | None,
                           val_fraction: float, seed: int = 0
                           ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Return (train, validation) pairs of a preference source.

    `preferences[:KEY=VALUE,...]` is the run's built set (see
    `codeling.data.preference_builder.build_settings_of`): built
    from `checkpoint` on first use, then its train.jsonl split by hash (test.jsonl stays held
    out for evaluation). `prefs:PATH` reads
    a JSONL file in any supported layout, split the same way.
    """
    if spec.split(":")[0] == PREFERENCES:
        if checkpoint is None:
            raise CodelingError("the preferences source is built from a checkpoint; set "
                                "init_from to the tools stage")
        from codeling.data.preference_builder import build_settings_of, ensure_preference_dataset

        folder = ensure_preference_dataset(run_dir, checkpoint, build_settings_of(spec, seed))
        return split_by_hash(read_preferences(folder / "train.jsonl"), val_fraction)
    if not spec.startswith(PREFS_PREFIX):
        raise CodelingError(f"{spec!r} is not a preference source; use {PREFERENCES} or "
                            "prefs:PATH.jsonl")
    return split_by_hash(read_preferences(spec[len(PREFS_PREFIX):]), val_fraction)


# -- tokenizing and batching --------------------------------------------------------------------


@dataclass
class PairExample:
    """One tokenized pair: prompt + chosen and prompt + rejected, each with its completion mask."""

    chosen_ids: np.ndarray
    chosen_mask: np.ndarray
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    kind: str = ""

    def chosen(self) -> Example:
        return Example(self.chosen_ids, self.chosen_mask)

    def rejected(self) -> Example:
        return Example(self.rejected_ids, self.rejected_mask)


def render_completion(prompt: Sequence[Mapping[str, Any]], response: Mapping[str, Any],
                      tokenizer: Tokenizer, tools: Sequence[Any] | None = None
                      ) -> tuple[list[int], list[int]]:
    """Render prompt + response; return (ids, mask) with the mask 1 on the response's turn only.

    The response's tokens are its text, its tool calls and the closing `<|end_turn|>`. The
    `<|assistant|>` role token belongs to the prompt, as in a generation prompt.
    """
    prompt_ids = chat.render(prompt, tokenizer, tools, add_generation_prompt=True)
    ids, _ = chat.render_with_mask([*prompt, response], tokenizer, tools)
    if ids[:len(prompt_ids)] != prompt_ids:
        raise CodelingError("the rendered response changed the prompt's tokens; this is a bug in "
                            "the chat format")
    return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Tokenizer, max_len: int,
                   name: str, allow_empty: bool = False,
                   fix: str = "raise train.seq_len to keep them") -> list[PairExample]:
    """Render pairs to examples; drop pairs whose longer side exceeds max_len tokens.

    `fix` ends the warning about dropped pairs and the error when none fits.
    """
    examples, too_long = [], 0
    for index, pair in enumerate(pairs):
        try:
            chosen_ids, chosen_mask = render_completion(pair.prompt, pair.chosen, tokenizer,
                                                        pair.tools)
            rejected_ids, rejected_mask = render_completion(pair.prompt, pair.rejected,
                                                            tokenizer, pair.tools)
        except chat.ChatFormatError as error:
            raise CodelingError(f"{name} pair {index}: {error} ({error.param})") from None
        if max(len(chosen_ids), len(rejected_ids)) > max_len:
            too_long += 1
            continue
        examples.append(PairExample(
            np.asarray(chosen_ids, dtype=np.int32), np.asarray(chosen_mask, dtype=np.uint8),
            np.asarray(rejected_ids, dtype=np.int32), np.asarray(rejected_mask, dtype=np.uint8),
            pair.kind))
    if too_long:
        log.warning("%s: dropped %d of %d pairs longer than %d tokens; %s", name, too_long,
                    len(pairs), max_len, fix)
    if not examples and not allow_empty:
        raise CodelingError(f"{name}: no preference pair fits in {max_len} tokens; {fix}")
    return examples


def pairs_to_batch(examples: Sequence[PairExample], seq_len: int, pad_id: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad B pairs into (inputs, targets) of shape (2B, L): chosen rows, then rejected rows.

    Row i and row B + i hold the same pair. Targets are IGNORE_INDEX outside the completions.
    """
    rows = [example.chosen() for example in examples] + [example.rejected()
                                                         for example in examples]
    return examples_to_batch(rows, seq_len, pad_id)


class PreferenceLoader:
    """An endless, seeded and resumable iterator over padded preference batches.

    Each epoch visits every pair once, in a permutation seeded by (seed, epoch). Every rank
    steps through the whole global batch of batch_size * world_size pairs and keeps its slice.
    """

    def __init__(self, examples: Sequence[PairExample], batch_size: int, seq_len: int,
                 pad_id: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not examples:
            raise CodelingError("PreferenceLoader got no pairs; pass at least one")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._position = 0  # pairs taken so far, over all ranks
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> float:
        """Batches (over all ranks) that take every pair once."""
        return len(self.examples) / self.global_batch_size

    def _example_at(self, position: int) -> PairExample:
        epoch, offset = divmod(position, len(self.examples))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch])
                           .permutation(len(self.examples)))
        return self.examples[int(self._order[1][offset])]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this rank's next (inputs, targets), each int64 of shape (2 * batch_size, L)."""
        start = self._position + self.rank * self.batch_size
        own = [self._example_at(start + offset) for offset in range(self.batch_size)]
        self._position += self.global_batch_size
        return pairs_to_batch(own, self.seq_len, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        """Return the position as plain values, to store in a checkpoint."""
        return {"version": STATE_VERSION, "kind": "preferences", "seed": self.seed,
                "pairs": len(self.examples), "global_batch_size": self.global_batch_size,
                "position": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict`."""
        expected = {"version": STATE_VERSION, "kind": "preferences", "seed": self.seed,
                    "pairs": len(self.examples), "global_batch_size": self.global_batch_size}
        check_loader_state(state, expected, "pairs, seed, seq_len and global batch size")
        self._position = int(state["position"])


def iter_pair_batches(examples: Sequence[PairExample], batch_size: int, seq_len: int,
                      pad_id: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield every pair once, in order, as padded preference batches."""
    for start in range(0, len(examples), batch_size):
        yield pairs_to_batch(examples[start:start + batch_size], seq_len, pad_id)


def iter_chosen_eval_batches(examples: Sequence[PairExample], batch_size: int, seq_len: int,
                             pad_id: int, max_batches: int
                             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield batches of chosen completions only, for next-token validation loss."""
    yield from iter_sft_eval_batches([example.chosen() for example in examples], batch_size,
                                     seq_len, pad_id, max_batches)


def chosen_bytes_per_token(examples: Sequence[PairExample], tokenizer: Tokenizer) -> float:
    """Return UTF-8 bytes per completion token of the chosen responses, for bits per byte."""
    total_bytes = total_tokens = 0
    for example in examples[:500]:
        trained = [int(t) for t, m in zip(example.chosen_ids, example.chosen_mask) if m]
        total_tokens += len(trained)
        text_ids = [t for t in trained if t >= len(SPECIAL_TOKENS)]  # special tokens: no bytes
        total_bytes += len(tokenizer.decode(text_ids).encode("utf-8"))
    return total_bytes / max(total_tokens, 1)
