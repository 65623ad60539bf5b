"""Text generation with the decoding cache, stop strings and streamed output."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from codeling.errors import CodelingError
from codeling.inference.constrained import ToolCallConstraint
from codeling.inference.sampling import sample_next
from codeling.models.decoder import CodeModel
from codeling.quantize import load_model_from_checkpoint
from codeling.tokenizer import SPECIAL_TOKENS, Tokenizer
from codeling.training import checkpoint as ckpt
from codeling.training.device import autocast, resolve_device, use_bf16


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        """Raise CodelingError for out-of-range sampling settings."""
        if self.max_new_tokens <= 0:
            raise CodelingError(f"max new tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise CodelingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise CodelingError(f"top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise CodelingError(f"top-p must be in (0, 1], got {self.top_p}")


def decode_in_bf16(precision: str, device: torch.device) -> bool:
    """Decide whether to decode under bf16 autocast.

    `auto` means bf16 on CUDA only. When a CPU decodes one token at a time, casting the weights
    on every call costs more than bf16 saves: the tiny presets decode about 2x faster in fp32 on
    a 2-core AVX512-BF16 CPU (measured with torch 2.13).
    """
    if precision == "auto" and device.type == "cpu":
        return False
    return use_bf16(precision, device)


class Generator:
    """A loaded model and tokenizer that stream completions for a prompt."""

    def __init__(self, model: CodeModel, tokenizer: Tokenizer, device: torch.device, bf16: bool):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.bf16 = bf16
        # Plain completion never emits the chat and reserved tokens; eos and end of turn end it.
        self.stop_ids = {tokenizer.eos_id, tokenizer.token_id("<|end_turn|>")}
        self.banned_ids = [i for i in range(len(SPECIAL_TOKENS)) if i not in self.stop_ids]
        self.last_usage = {"prompt_tokens": 0, "completion_tokens": 0}

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto",
                        precision: str = "auto") -> "Generator":
        """Load the newest checkpoint under a run, stage or checkpoint directory."""
        loaded = ckpt.read_checkpoint_config(ckpt.resolve_checkpoint(path))
        tokenizer = Tokenizer.load(loaded.tokenizer_path)
        ckpt.check_tokenizer(loaded.meta, loaded.path, tokenizer.fingerprint,
                             str(loaded.tokenizer_path))
        model = load_model_from_checkpoint(loaded)  # plain or int8-quantized weights
        target = resolve_device(device)
        return cls(model.to(target), tokenizer, target, decode_in_bf16(precision, target))

    def _prepare(self, prompt: str, config: GenerationConfig
                 ) -> tuple[list[int], int, torch.Generator | None]:
        """Validate settings and prompt; return prompt ids, the new-token limit and the RNG."""
        config.validate()
        ids = self.tokenizer.encode(prompt) or [self.tokenizer.bos_id]
        limit = self.model.config.max_seq_len
        if len(ids) >= limit:
            raise CodelingError(f"prompt is {len(ids)} tokens but the model's context is {limit}; "
                                "shorten the prompt")
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        return ids, min(config.max_new_tokens, limit - len(ids)), generator

    def stream(self, prompt: str, config: GenerationConfig) -> Iterator[str]:
        """Yield the completion piece by piece; stop at max tokens, eos or a stop string."""
        ids, max_new, generator = self._prepare(prompt, config)
        yield from self._decode(ids, max_new, config, generator)

    @torch.inference_mode()
    def _decode(self, ids: list[int], max_new: int, config: GenerationConfig,
                generator: torch.Generator | None) -> Iterator[str]:
        cache = self.model.new_cache(1, len(ids) + max_new)
        tokens = torch.tensor([ids], device=self.device)  # (1, T)
        new_ids: list[int] = []
        emitted = ""
        self.last_usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
        for _ in range(max_new):
            with autocast(self.device, self.bf16):
                logits = self.model(tokens, cache)[:, -1].float()  # (1, V)
            logits[:, self.banned_ids] = float("-inf")
            next_id = int(sample_next(logits, config.temperature, config.top_k, config.top_p,
                                      generator)[0])
            self.last_usage["completion_tokens"] += 1
            if next_id in self.stop_ids:
                break
            new_ids.append(next_id)
            text = self.tokenizer.decode(new_ids)
            if text.endswith("\ufffd"):
                tokens = torch.tensor([[next_id]], device=self.device)
                continue  # an incomplete UTF-8 sequence; wait for the next byte token
            stop_at = _first_stop(text, config.stop)
            if stop_at is not None:
                if stop_at > len(emitted):
                    yield text[len(emitted):stop_at]
                return
            # Hold back a tail that could be the start of a stop string.
            safe = len(text) - _longest_stop_prefix(text, config.stop)
            if safe > len(emitted):
                yield text[len(emitted):safe]
                emitted = text[:safe]
            tokens = torch.tensor([[next_id]], device=self.device)
        text = self.tokenizer.decode(new_ids)
        if len(text) > len(emitted):
            yield text[len(emitted):]

    def complete(self, prompt: str, config: GenerationConfig) -> str:
        """Return the whole completion as one string."""
        return "".join(self.stream(prompt, config))

    @torch.inference_mode()
    def complete_many(self, prompt: str, n: int, config: GenerationConfig) -> list[str]:
        """Sample `n` completions of one prompt together, as one batch of n rows.

        All rows share the prompt, so they stay at the same position and one cache of batch
        size n serves them. A row that reaches eos or a stop string is done, and the batch
        stops when every row is done or max_new_tokens is reached.
        """
        if n < 1:
            raise CodelingError(f"number of samples must be at least 1, got {n}")
        ids, max_new, generator = self._prepare(prompt, config)
        cache = self.model.new_cache(n, len(ids) + max_new)
        tokens = torch.tensor([ids] * n, device=self.device)  # (n, T)
        rows: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        self.last_usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
        for _ in range(max_new):
            with autocast(self.device, self.bf16):
                logits = self.model(tokens, cache)[:, -1].float()  # (n, V)
            logits[:, self.banned_ids] = float("-inf")
            next_ids = sample_next(logits, config.temperature, config.top_k, config.top_p,
                                   generator)  # (n,)
            for row, token in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                self.last_usage["completion_tokens"] += 1
                if token in self.stop_ids:
                    done[row] = True
                    continue
                rows[row].append(token)
                if config.stop and _first_stop(self.tokenizer.decode(rows[row][-64:]),
                                               config.stop) is not None:
                    done[row] = True
            if all(done):
                break
            tokens = next_ids[:, None]
        texts = [self.tokenizer.decode(row) for row in rows]
        return [text[:cut] if (cut := _first_stop(text, config.stop)) is not None else text
                for text in texts]

    def generate_turn(self, prompt_ids: Sequence[int], config: GenerationConfig,
                      tools: Sequence[Any] | None = None, constrained: bool = False) -> list[int]:
        """Generate one assistant turn after a chat prompt and return its ids.

        `prompt_ids` come from `codeling.chat.render` and end with `<|assistant|>`, or with
        `<|tool_call|>` to make the turn start with a call. The returned ids stop before
        `<|end_turn|>` or `<|eos|>`, or at `max_new_tokens`. `<|tool_call|>` may be generated only
        when tools are given; every other special token is banned. `config.stop` is not applied.

        With `constrained=True` the text before the first call is free, and each call is forced
        to be valid JSON naming a listed tool with arguments valid against its schema (see
        `codeling.inference.constrained` for the supported schema keywords). After a call only
        `<|tool_call|>` or `<|end_turn|>` may follow. A call starts only when at least
        `min_call_tokens` tokens remain, and inside a call the constraint also keeps enough tokens
        to close it, so every call in the result is complete even when the token limit is hit.
        """
        return list(self._turn_ids(prompt_ids, config, tools, constrained))

    def stream_turn(self, prompt_ids: Sequence[int], config: GenerationConfig,
                    tools: Sequence[Any] | None = None, constrained: bool = False
                    ) -> Iterator[tuple[str, str]]:
        """Generate one assistant turn like `generate_turn` and yield it as events.

        Events are ("text", piece) for the turn's text as it grows and ("tool_call", json_text)
        for each call once the next call, the end of the turn or the token limit ends it.
        """
        tool_call = self.tokenizer.token_id("<|tool_call|>")
        text_ids: list[int] = []
        emitted = ""
        call_ids: list[int] | None = [] if prompt_ids and prompt_ids[-1] == tool_call else None
        for token in self._turn_ids(prompt_ids, config, tools, constrained):
            if token == tool_call:
                if call_ids is not None:
                    yield "tool_call", self.tokenizer.decode(call_ids)
                else:
                    text = self.tokenizer.decode(text_ids)
                    if len(text) > len(emitted):
                        yield "text", text[len(emitted):]
                call_ids = []
            elif call_ids is not None:
                call_ids.append(token)
            else:
                text_ids.append(token)
                text = self.tokenizer.decode(text_ids)
                if not text.endswith("\ufffd") and len(text) > len(emitted):
                    yield "text", text[len(emitted):]  # held back while a UTF-8 character is split
                    emitted = text
        if call_ids is not None:
            yield "tool_call", self.tokenizer.decode(call_ids)
        else:
            text = self.tokenizer.decode(text_ids)
            if len(text) > len(emitted):
                yield "text", text[len(emitted):]

    def tool_call_constraint(self, tools: Sequence[Any]) -> ToolCallConstraint:
        """Return the constraint for a list of tools, built once per distinct list."""
        constraints: dict[str, ToolCallConstraint] = self.__dict__.setdefault("_constraints", {})
        key = json.dumps(list(tools), sort_keys=True, default=str)
        if key not in constraints:
            if len(constraints) >= 16:
                constraints.clear()
            constraints[key] = ToolCallConstraint(tools, self.tokenizer)
        return constraints[key]

    @torch.inference_mode()
    def _turn_ids(self, prompt_ids: Sequence[int], config: GenerationConfig,
                  tools: Sequence[Any] | None, constrained: bool) -> Iterator[int]:
        """Yield the ids of one assistant turn; see `generate_turn`."""
        config.validate()
        ids = list(prompt_ids)
        if not ids:
            raise CodelingError("prompt is empty; render a conversation with codeling.chat.render")
        limit = self.model.config.max_seq_len
        if len(ids) >= limit:
            raise CodelingError(f"prompt is {len(ids)} tokens but the model's context is {limit}; "
                                "shorten the conversation")
        max_new = min(config.max_new_tokens, limit - len(ids))
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        tool_call = self.tokenizer.token_id("<|tool_call|>")
        stop_ids = {self.tokenizer.eos_id, self.tokenizer.token_id("<|end_turn|>")}
        allowed_special = stop_ids | ({tool_call} if tools else set())
        banned = [i for i in range(len(SPECIAL_TOKENS)) if i not in allowed_special]
        constraint = self.tool_call_constraint(tools) if constrained and tools else None
        state = constraint.start if constraint is not None and ids[-1] == tool_call else None
        if state is not None and max_new < constraint.min_call_tokens:
            raise CodelingError(f"only {max_new} new tokens fit, but the shortest tool call "
                                f"needs up to {constraint.min_call_tokens}; raise max_new_tokens")

        cache = self.model.new_cache(1, len(ids) + max_new)
        tokens = torch.tensor([ids], device=self.device)  # (1, T)
        self.last_usage = {"prompt_tokens": len(ids), "completion_tokens": 0}
        for step in range(max_new):
            with autocast(self.device, self.bf16):
                logits = self.model(tokens, cache)[0, -1].float()  # (V,)
            remaining = max_new - step - 1  # tokens left after this one
            if state is None:
                logits[banned] = float("-inf")
                if constraint is not None and remaining < constraint.min_call_tokens:
                    logits[tool_call] = float("-inf")  # no room left to finish a call
                next_id = int(sample_next(logits[None], config.temperature, config.top_k,
                                          config.top_p, generator)[0])
                if next_id == tool_call and constraint is not None:
                    state = constraint.start
            else:
                next_id, state = constraint.pick(state, logits, config.temperature,
                                                 config.top_k, config.top_p, generator, remaining)
            self.last_usage["completion_tokens"] += 1
            if next_id in stop_ids:
                return
            yield next_id
            tokens = torch.tensor([[next_id]], device=self.device)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return min(positions) if positions else None


def _longest_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest
