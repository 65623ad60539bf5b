"""A decoding engine that serves many requests at once from one model.

Requests wait in a queue. A worker thread repeats one iteration: it drops cancelled sequences,
admits waiting sequences into free slots (prefilling each one on its own), then takes one decode
step for every active sequence. A sequence leaves its slot as soon as it finishes or its request
is cancelled, so sequences join and leave the batch at any step.

Two decoders implement the model calls, and the engine loop does not depend on which one runs:

- `BatchedDecoder` keeps each active sequence in one row of a slot cache and decodes all rows in
  one forward pass, each row at its own position. `CodeModel.forward` has one position for the
  whole batch, so this decoder calls the model's layers itself and applies per-row rotary
  positions and attention masks.
- `SequentialDecoder` keeps one cache per sequence and calls `CodeModel.forward` once per
  sequence per step. It uses only the public model API, so it is the reference for the batched
  one and the fallback for layer types the batched decoder does not know.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from codeling.errors import CodelingError
from codeling.inference.generate import Generator, _first_stop, _longest_stop_prefix
from codeling.inference.sampling import sample_next
from codeling.models.attention import Attention, KVCache
from codeling.models.decoder import CodeModel, DecoderLayer, ModelCache
from codeling.models.layers import apply_rotary
from codeling.models.mamba import MambaCache
from codeling.tokenizer import SPECIAL_TOKENS, Tokenizer
from codeling.training.device import autocast

log = logging.getLogger(__name__)

FINISH_STOP = "stop"  # eos, end of turn or a stop string
FINISH_LENGTH = "length"  # max_tokens or the end of the model's context
FINISH_CANCELLED = "cancelled"  # the request was cancelled, for example by a disconnected client
FINISH_ERROR = "error"  # the model raised an exception; the message is in Finished.error


class EngineError(CodelingError):
    """A request the engine rejects; the message states why and what to change."""


class EngineOverloadedError(EngineError):
    """The wait queue is full; the client should retry later."""


class PromptTooLongError(EngineError):
    """The prompt leaves no room in the model's context for a generated token."""

    def __init__(self, prompt_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        super().__init__(f"the prompt is {prompt_tokens} tokens but the model's context length is "
                         f"{context_length} tokens, and at least one token must remain for the "
                         "completion; shorten the prompt")


class EngineStoppedError(EngineError):
    """The engine is not running: it was never started or it has been stopped."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings.

    `max_tokens=None` generates until a stop condition or the end of the context. With `n > 1`
    and a seed, choice i samples with seed + i, so the choices differ but are reproducible.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    # Let the model open tool calls with <|tool_call|>. Text after the first call is not sent
    # as deltas; the Finished event carries the token ids, for codeling.chat.parse_assistant.
    tool_calls: bool = False

    def validate(self) -> None:
        """Raise EngineError for settings outside their valid ranges."""
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise EngineError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EngineError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise EngineError(f"n must be at least 1, got {self.n}")
        if self.seed is not None and not -2**63 <= self.seed < 2**63:
            raise EngineError(f"seed must be a signed 64-bit integer, got {self.seed}")


@dataclass(frozen=True)
class TextDelta:
    """New text of choice `index`, in order; the pieces of one choice concatenate to its text."""

    index: int
    text: str


@dataclass(frozen=True)
class Finished:
    """The last event of choice `index`: why it ended and how many tokens it sampled."""

    index: int
    finish_reason: str
    completion_tokens: int
    error: str | None = None
    token_ids: tuple[int, ...] = ()  # the sampled tokens, stop tokens left out


Event = TextDelta | Finished


@dataclass
class RequestOutput:
    """The collected result of a request: one text and finish reason per choice."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    errors: list[str | None]


class RequestHandle:
    """A submitted request: its events, its token counts and a way to cancel it.

    Without a callback, events go to an internal thread-safe queue that `events()` reads. With a
    callback, the worker thread calls it for every event, so it must return quickly and must not
    block (an asyncio server passes `loop.call_soon_threadsafe` wrapped in a function).
    """

    def __init__(self, request_id: str, prompt_tokens: int, n: int, engine: "Engine",
                 on_event: Callable[[Event], None] | None):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self.n = n
        self._engine = engine
        self._on_event = on_event
        self._queue: queue.Queue[Event] = queue.Queue()
        self._lock = threading.Lock()
        self._completion_tokens = [0] * n
        self._finished = [False] * n
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        """Whether `cancel()` was called."""
        return self._cancelled.is_set()

    @property
    def finished(self) -> bool:
        """Whether every choice has sent its `Finished` event."""
        with self._lock:
            return all(self._finished)

    @property
    def completion_tokens(self) -> int:
        """Count the tokens sampled so far over all choices, stop tokens included."""
        with self._lock:
            return sum(self._completion_tokens)

    def usage(self) -> dict[str, int]:
        """Return the OpenAI usage counts: prompt, completion and total tokens."""
        completion = self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def cancel(self) -> None:
        """Stop every choice of the request and free its slots within one decode step."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._engine._on_cancel(self)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events until every choice has finished; only without a callback.

        Raises TimeoutError when no event arrives within `timeout` seconds; the request keeps
        running, so cancel it if the caller gives up.
        """
        if self._on_event is not None:
            raise EngineError("this request sends its events to a callback; read them there")
        remaining = self.n
        while remaining:
            try:
                event = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event within {timeout} s") from None
            if isinstance(event, Finished):
                remaining -= 1
            yield event

    def collect(self, timeout: float | None = None) -> RequestOutput:
        """Wait for every choice and return the texts, finish reasons and usage."""
        texts = [""] * self.n
        reasons = [""] * self.n
        errors: list[str | None] = [None] * self.n
        for event in self.events(timeout):
            if isinstance(event, TextDelta):
                texts[event.index] += event.text
            else:
                reasons[event.index] = event.finish_reason
                errors[event.index] = event.error
        return RequestOutput(texts, reasons, self.prompt_tokens, self.completion_tokens, errors)

    def _emit(self, event: Event) -> None:
        """Deliver an event; a failing callback is logged and cancels the request."""
        if isinstance(event, Finished):
            with self._lock:
                self._finished[event.index] = True
                self._completion_tokens[event.index] = event.completion_tokens
        if self._on_event is None:
            self._queue.put(event)
            return
        try:
            self._on_event(event)
        except Exception:  # a consumer that is gone (closed event loop) must not stop the engine
            log.exception("request %s: event callback failed; cancelling the request", self.id)
            self._cancelled.set()


@dataclass
class EngineStats:
    """Counters since the engine was created; written by the worker thread only."""

    decode_steps: int = 0
    finished_sequences: int = 0  # ended with finish reason stop or length
    cancelled_sequences: int = 0  # cancelled while holding a slot
    failed_sequences: int = 0  # ended by an exception in the model
    peak_active: int = 0  # most sequences decoded in one step


@dataclass(eq=False)
class Sequence:
    """One choice of a request while it waits or decodes; owned by the engine's worker thread."""

    handle: RequestHandle
    index: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    generator: torch.Generator | None
    new_ids: list[int] = field(default_factory=list)  # sampled tokens, stop tokens left out
    sampled: int = 0  # sampled tokens, stop tokens included: the usage count
    emitted: int = 0  # characters of the decoded completion already sent as deltas
    stop_string_found: bool = False
    in_tool_call: bool = False  # the model opened a tool call; its text is not streamed
    last_token: int = -1
    position: int = 0  # tokens stored in this sequence's cache
    row: int = -1  # BatchedDecoder: row of the slot cache
    cache: ModelCache | None = None  # SequentialDecoder: this sequence's own cache
    finish_reason: str | None = None
    error: str | None = None


class Decoder(Protocol):
    """The model calls of the engine: prefill one sequence, decode one step for all of them."""

    def prefill(self, sequence: Sequence) -> torch.Tensor:
        """Store the prompt in a free slot; return the logits (V,) of its last position."""
        ...

    def decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """Feed each sequence's last token; return logits (len(sequences), V) in that order."""
        ...

    def release(self, sequence: Sequence) -> None:
        """Free the sequence's slot."""
        ...


class SequentialDecoder:
    """One cache per sequence and one `CodeModel.forward` call per sequence per step."""

    def __init__(self, model: CodeModel, device: torch.device, bf16: bool):
        self.model = model
        self.device = device
        self.bf16 = bf16

    @torch.inference_mode()
    def prefill(self, sequence: Sequence) -> torch.Tensor:
        """Run the prompt through a new cache sized for the whole sequence."""
        length = len(sequence.prompt) + sequence.max_new_tokens
        sequence.cache = self.model.new_cache(1, length)
        tokens = torch.tensor([sequence.prompt], device=self.device)  # (1, T)
        with autocast(self.device, self.bf16):
            logits = self.model(tokens, sequence.cache)[0, -1]  # (V)
        sequence.position = len(sequence.prompt)
        return logits.float()

    @torch.inference_mode()
    def decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """Run one forward call per sequence."""
        rows = []
        for sequence in sequences:
            tokens = torch.tensor([[sequence.last_token]], device=self.device)  # (1, 1)
            with autocast(self.device, self.bf16):
                rows.append(self.model(tokens, sequence.cache)[0, -1].float())  # (V)
            sequence.position += 1
        return torch.stack(rows)  # (n, V)

    def release(self, sequence: Sequence) -> None:
        """Drop the sequence's cache."""
        sequence.cache = None


class BatchedDecoder:
    """All active sequences in the rows of one slot cache, decoded in one forward pass.

    Rows 0 .. active-1 are in use, so every decode step works on the leading rows of each cache
    tensor. Releasing a row moves the last row into it.
    """

    def __init__(self, model: CodeModel, device: torch.device, bf16: bool, max_batch_size: int):
        unsupported = unsupported_layers(model)
        if unsupported:
            raise EngineError(f"the batched decoder does not support layers {unsupported}; "
                              "use the sequential decoder")
        self.model = model
        self.device = device
        self.bf16 = bf16
        self.max_batch_size = max_batch_size
        # Allocated once, so a model too large for the requested batch fails at start-up.
        self.cache = model.new_cache(max_batch_size, model.config.max_seq_len)
        self.rows: list[Sequence] = []

    @torch.inference_mode()
    def prefill(self, sequence: Sequence) -> torch.Tensor:
        """Prefill in a batch-1 cache, then copy its state into a free row."""
        if len(self.rows) >= self.max_batch_size:
            raise EngineError(f"no free row: all {self.max_batch_size} rows are in use")
        single = self.model.new_cache(1, len(sequence.prompt))
        tokens = torch.tensor([sequence.prompt], device=self.device)  # (1, T)
        with autocast(self.device, self.bf16):
            logits = self.model(tokens, single)[0, -1]  # (V)
        row = len(self.rows)
        length = len(sequence.prompt)
        for target, source in zip(self.cache.layers, single.layers):
            if isinstance(target, KVCache):
                target.keys[row, :, :length] = source.keys[0, :, :length]
                target.values[row, :, :length] = source.values[0, :, :length]
            else:
                target.conv_state[row] = source.conv_state[0]
                target.ssm_state[row] = source.ssm_state[0]
        sequence.row = row
        sequence.position = length
        self.rows.append(sequence)
        return logits.float()

    @torch.inference_mode()
    def decode(self, sequences: list[Sequence]) -> torch.Tensor:
        """Decode one token for every row; the sequences must be exactly the rows in use."""
        if set(sequences) != set(self.rows):
            raise EngineError("decode() needs exactly the sequences that hold rows")
        count = len(self.rows)
        tokens = torch.tensor([[s.last_token] for s in self.rows], device=self.device)  # (n, 1)
        positions = torch.tensor([s.position for s in self.rows], device=self.device)  # (n)
        span = max(s.position for s in self.rows) + 1
        cos, sin = self.model.rotary(0, span)  # (span, E)
        cos = cos[positions][:, None, None, :]  # (n, 1, 1, E), broadcast over heads
        sin = sin[positions][:, None, None, :]
        step = _AttentionStep(positions, torch.arange(count, device=self.device), span)
        with autocast(self.device, self.bf16):
            x = self.model.embed_tokens(tokens)  # (n, 1, D)
            for layer, layer_cache in zip(self.model.layers, self.cache.layers):
                x = self._layer_step(layer, layer_cache, x, cos, sin, step)
            logits = self.model.lm_head(self.model.norm(x))[:, -1].float()  # (n, V)
        for sequence in self.rows:
            sequence.position += 1
        order = torch.tensor([s.row for s in sequences], device=self.device)
        return logits[order]

    def release(self, sequence: Sequence) -> None:
        """Free the sequence's row by moving the last row into it."""
        row = sequence.row
        if row < 0:
            return  # released before
        last = self.rows.pop()
        sequence.row = -1
        if last is sequence:
            return
        self._copy_row(last.row, row, last.position)
        self.rows[row] = last
        last.row = row

    def _layer_step(self, layer: DecoderLayer, layer_cache: KVCache | MambaCache,
                    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    step: _AttentionStep) -> torch.Tensor:
        count = x.shape[0]
        if isinstance(layer_cache, MambaCache):
            # The Mamba step is already per-row; it just needs a cache of batch size n.
            view = MambaCache(layer_cache.conv_state[:count], layer_cache.ssm_state[:count])
            x = layer(x, cos, sin, view, 0)
            layer_cache.conv_state[:count] = view.conv_state
            layer_cache.ssm_state[:count] = view.ssm_state
            return x
        x = x + _attention_step(layer.self_attn, layer.input_layernorm(x), cos, sin,
                                layer_cache, step)
        # The feed-forward part of DecoderLayer.forward.
        if layer.ffn_kind == "mlp":
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        elif layer.ffn_kind == "moe":
            x = x + layer.moe(layer.post_attention_layernorm(x))
        return x

    def _copy_row(self, source: int, target: int, length: int) -> None:
        for layer_cache in self.cache.layers:
            if isinstance(layer_cache, KVCache):
                layer_cache.keys[target, :, :length] = layer_cache.keys[source, :, :length]
                layer_cache.values[target, :, :length] = layer_cache.values[source, :, :length]
            else:
                layer_cache.conv_state[target] = layer_cache.conv_state[source]
                layer_cache.ssm_state[target] = layer_cache.ssm_state[source]


class _AttentionStep:
    """Row indices, positions and the attention mask of one decode step, shared by all layers."""

    def __init__(self, positions: torch.Tensor, rows: torch.Tensor, span: int):
        self.positions = positions  # (n)
        self.rows = rows  # (n): 0 .. n-1
        self.span = span  # cache positions any row attends to: max(positions) + 1
        # Row b attends to positions 0 .. positions[b]. When every row is at the last position
        # of the span (always so for one row), nothing is masked, so no mask is passed.
        visible = torch.arange(span, device=positions.device)[None, :] <= positions[:, None]
        self.mask = None if bool(visible.all()) else visible[:, None, None, :]  # (n, 1, 1, S)


def _attention_step(attention: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cache: KVCache, step: _AttentionStep) -> torch.Tensor:
    """Attend one new token per row, each row at its own position; x (n, 1, D).

    This is `Attention.forward` for T = 1 with per-row positions: row b stores its key and value
    at positions[b] and attends to cache positions 0 .. positions[b] only.
    """
    count = x.shape[0]
    heads, kv_heads, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
    q = attention.q_proj(x).view(count, 1, heads, head_dim).transpose(1, 2)  # (n, H, 1, E)
    k = attention.k_proj(x).view(count, 1, kv_heads, head_dim).transpose(1, 2)  # (n, K, 1, E)
    v = attention.v_proj(x).view(count, 1, kv_heads, head_dim).transpose(1, 2)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    cache.keys[step.rows, :, step.positions] = k[:, :, 0].to(cache.keys.dtype)  # (n, K, E)
    cache.values[step.rows, :, step.positions] = v[:, :, 0].to(cache.values.dtype)
    keys = cache.keys[:count, :, :step.span].to(q.dtype)  # (n, K, S, E)
    values = cache.values[:count, :, :step.span].to(q.dtype)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask,
                                         enable_gqa=heads != kv_heads)  # (n, H, 1, E)
    out = out.transpose(1, 2).reshape(count, 1, heads * head_dim)
    return attention.o_proj(out)  # (n, 1, D)


def unsupported_layers(model: CodeModel) -> list[str]:
    """List the layers (index and kind) that `BatchedDecoder` cannot decode; empty if none."""
    problems = []
    for index, layer in enumerate(model.layers):
        if layer.kind not in ("A", "M") or layer.ffn_kind not in ("mlp", "moe", "none"):
            problems.append(f"{index}:{layer.kind}/{layer.ffn_kind}")
    return problems


class Engine:
    """Queues requests and decodes them together on a worker thread.

    At most `max_batch_size` sequences decode at once (each choice of a request with n > 1 is a
    sequence); up to `max_queue` more wait. `submit` raises EngineOverloadedError beyond that.
    """

    def __init__(self, model: CodeModel, tokenizer: Tokenizer, device: torch.device | None = None,
                 bf16: bool = False, max_batch_size: int = 16, max_queue: int = 256,
                 decoder: str = "auto"):
        if max_batch_size < 1:
            raise EngineError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue < 0:
            raise EngineError(f"max_queue must be >= 0, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device or model.embed_tokens.weight.device
        self.bf16 = bf16
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.decoder = self._make_decoder(decoder)
        # Plain completion never emits the chat and reserved tokens; eos and end of turn end it.
        self.stop_ids = {tokenizer.eos_id, tokenizer.token_id("<|end_turn|>")}
        self.banned_ids = [i for i in range(len(SPECIAL_TOKENS)) if i not in self.stop_ids]
        self.tool_call_id = tokenizer.token_id("<|tool_call|>")
        self.banned_with_tools = [i for i in self.banned_ids if i != self.tool_call_id]

        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._admitting: list[Sequence] = []  # taken off the queue, not yet in _active
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._running = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._request_numbers = itertools.count(1)
        self.stats = EngineStats()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", precision: str = "auto",
                        **options: object) -> "Engine":
        """Load a run, stage or checkpoint directory into a new, not yet started engine."""
        loaded = Generator.from_checkpoint(path, device=device, precision=precision)
        return cls(loaded.model, loaded.tokenizer, loaded.device, loaded.bf16, **options)

    def _make_decoder(self, name: str) -> Decoder:
        if name == "sequential":
            return SequentialDecoder(self.model, self.device, self.bf16)
        if name == "batched":
            return BatchedDecoder(self.model, self.device, self.bf16, self.max_batch_size)
        if name == "auto":
            unsupported = unsupported_layers(self.model)
            if not unsupported:
                return BatchedDecoder(self.model, self.device, self.bf16, self.max_batch_size)
            log.warning("decoding sequences one at a time: layers %s have no batched step",
                        unsupported)
            return SequentialDecoder(self.model, self.device, self.bf16)
        raise EngineError(f"unknown decoder {name!r}; use auto, batched or sequential")

    # -- life cycle -------------------------------------------------------------------------

    @property
    def context_length(self) -> int:
        """The model's maximum sequence length in tokens, prompt and completion together."""
        return self.model.config.max_seq_len

    @property
    def active_count(self) -> int:
        """Count the sequences that hold a slot now."""
        return len(self._active)

    @property
    def waiting_count(self) -> int:
        """Count the sequences waiting for a slot."""
        return len(self._waiting)

    @property
    def running(self) -> bool:
        """Whether the worker thread is running."""
        return self._running

    def start(self) -> None:
        """Start the worker thread; calling it on a running engine does nothing."""
        with self._lock:
            if self._running:
                return
            self._running = True
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="codeling-engine",
                                            daemon=True)
            self._thread.start()
        log.info("engine started: %s, max batch size %d, max queue %d, context %d tokens",
                 type(self.decoder).__name__, self.max_batch_size, self.max_queue,
                 self.context_length)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel every request, stop the worker thread and wait up to `timeout` seconds."""
        with self._lock:
            if not self._running:
                return
            self._stopping = True
            self._wakeup.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("engine worker did not stop within %.1f s", timeout)
        log.info("engine stopped after %d decode steps", self.stats.decode_steps)

    def __enter__(self) -> "Engine":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- requests ---------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams,
               on_event: Callable[[Event], None] | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue a tokenized prompt for `params.n` completions and return its handle.

        Raises EngineError for invalid parameters, PromptTooLongError when the prompt fills the
        context, EngineOverloadedError when the queue is full and EngineStoppedError when the
        engine is not running.
        """
        params.validate()
        if not prompt:
            raise EngineError("the prompt is empty; pass at least one token (for example bos)")
        limit = self.context_length
        if len(prompt) >= limit:
            raise PromptTooLongError(len(prompt), limit)
        room = limit - len(prompt)
        max_new = room if params.max_tokens is None else min(params.max_tokens, room)
        request_id = request_id or f"req-{next(self._request_numbers)}-{uuid.uuid4().hex[:8]}"
        handle = RequestHandle(request_id, len(prompt), params.n, self, on_event)
        sequences = [Sequence(handle, index, list(prompt), params, max_new,
                              self._make_generator(params.seed, index))
                     for index in range(params.n)]
        with self._lock:
            if not self._running or self._stopping:
                raise EngineStoppedError("the engine is not running; call start() first")
            if len(self._waiting) + params.n > self.max_queue + self._free_slots():
                raise EngineOverloadedError(
                    f"the engine is full: {len(self._active)} sequences decoding and "
                    f"{len(self._waiting)} waiting (max batch size {self.max_batch_size}, max "
                    f"queue {self.max_queue}); retry later")
            self._waiting.extend(sequences)
            self._wakeup.notify()
        return handle

    def generate(self, prompt: list[int], params: SamplingParams,
                 timeout: float | None = None) -> RequestOutput:
        """Submit a request, wait for it and return its output."""
        handle = self.submit(prompt, params)
        try:
            return handle.collect(timeout)
        except TimeoutError:
            handle.cancel()
            raise

    def _free_slots(self) -> int:
        return max(self.max_batch_size - len(self._active) - len(self._admitting), 0)

    def _make_generator(self, seed: int | None, index: int) -> torch.Generator | None:
        if seed is None:
            return None
        return torch.Generator(device=self.device).manual_seed(seed + index)

    def _on_cancel(self, handle: RequestHandle) -> None:
        """Drop a cancelled request's waiting sequences now; the worker drops its active ones."""
        with self._lock:
            dropped = [s for s in self._waiting if s.handle is handle]
            for sequence in dropped:
                self._waiting.remove(sequence)
            self._wakeup.notify()
        for sequence in dropped:
            handle._emit(Finished(sequence.index, FINISH_CANCELLED, 0))
        log.info("request %s cancelled", handle.id)

    # -- worker -----------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except Exception:
            log.exception("engine worker failed; cancelling every request")
        finally:
            self._shutdown()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._stopping or self._waiting or self._active):
                    self._wakeup.wait()
                if self._stopping:
                    return
                self._admitting = [self._waiting.popleft()
                                   for _ in range(min(self._free_slots(), len(self._waiting)))]
            self._drop_cancelled()
            while self._admitting:
                self._admit(self._admitting[0])
                with self._lock:
                    self._admitting.pop(0)
            if self._active:
                self._step()

    def _shutdown(self) -> None:
        with self._lock:
            waiting = self._admitting + list(self._waiting)
            self._admitting = []
            self._waiting.clear()
            self._running = False
        for sequence in dict.fromkeys(waiting + self._active):  # without duplicates, in order
            if sequence in self._active:
                self.decoder.release(sequence)
            sequence.handle._emit(Finished(sequence.index, FINISH_CANCELLED, sequence.sampled))
        self._active = []

    def _drop_cancelled(self) -> None:
        for sequence in [s for s in self._active if s.handle.cancelled]:
            sequence.finish_reason = FINISH_CANCELLED
            self._finish(sequence)

    def _admit(self, sequence: Sequence) -> None:
        """Prefill a sequence and sample its first token."""
        if sequence.handle.cancelled:
            sequence.handle._emit(Finished(sequence.index, FINISH_CANCELLED, 0))
            return
        try:
            logits = self.decoder.prefill(sequence)
        except Exception as error:  # any model failure ends only this sequence
            log.exception("request %s: prefill of %d tokens failed", sequence.handle.id,
                          len(sequence.prompt))
            self.stats.failed_sequences += 1
            sequence.handle._emit(Finished(sequence.index, FINISH_ERROR, 0,
                                           f"{type(error).__name__}: {error}"))
            return
        self._active.append(sequence)
        self._accept(sequence, logits[None])

    def _step(self) -> None:
        """Decode one token for every active sequence."""
        sequences = list(self._active)
        try:
            logits = self.decoder.decode(sequences)  # (n, V)
        except Exception as error:  # the batch state is unknown, so every sequence in it ends
            log.exception("decode step for %d sequences failed", len(sequences))
            for sequence in sequences:
                sequence.finish_reason = FINISH_ERROR
                sequence.error = f"{type(error).__name__}: {error}"
                self._finish(sequence)
            return
        self.stats.decode_steps += 1
        self.stats.peak_active = max(self.stats.peak_active, len(sequences))
        for row, sequence in enumerate(sequences):
            self._accept(sequence, logits[row:row + 1])

    def _accept(self, sequence: Sequence, logits: torch.Tensor) -> None:
        """Sample the next token from logits (1, V), send new text and finish if done."""
        params = sequence.params
        logits[:, self.banned_with_tools if params.tool_calls else self.banned_ids] = float("-inf")
        token = int(sample_next(logits, params.temperature, params.top_k, params.top_p,
                                sequence.generator)[0])
        sequence.sampled += 1
        if token in self.stop_ids:
            sequence.finish_reason = FINISH_STOP
        else:
            if token == self.tool_call_id and not sequence.in_tool_call:
                self._send_text(sequence, final=True)  # the text before the first call
                sequence.in_tool_call = sequence.finish_reason is None  # unless a stop string
            if sequence.finish_reason is None:
                sequence.new_ids.append(token)
                sequence.last_token = token
                if not sequence.in_tool_call:
                    self._send_text(sequence, final=False)
        if sequence.finish_reason is None and sequence.sampled >= sequence.max_new_tokens:
            sequence.finish_reason = FINISH_LENGTH
        if sequence.finish_reason is not None:
            self._finish(sequence)

    def _send_text(self, sequence: Sequence, final: bool) -> None:
        """Send the decoded text up to a stop string; unless final, hold back what may change.

        Held back are an incomplete UTF-8 character at the end and a tail that could be the
        start of a stop string.
        """
        text = self.tokenizer.decode(sequence.new_ids)
        if not final and text.endswith("\ufffd"):
            return  # wait for the next byte token
        stops = sequence.params.stop
        stop_at = _first_stop(text, stops)
        if stop_at is not None:
            self._send(sequence, text[:stop_at])
            sequence.stop_string_found = True
            sequence.finish_reason = FINISH_STOP
        elif final:
            self._send(sequence, text)
        else:
            self._send(sequence, text[:len(text) - _longest_stop_prefix(text, stops)])

    def _send(self, sequence: Sequence, text: str) -> None:
        if len(text) > sequence.emitted:
            sequence.handle._emit(TextDelta(sequence.index, text[sequence.emitted:]))
            sequence.emitted = len(text)

    def _finish(self, sequence: Sequence) -> None:
        """Flush held-back text, free the slot and send the Finished event."""
        finished_normally = sequence.finish_reason in (FINISH_STOP, FINISH_LENGTH)
        if finished_normally and not sequence.stop_string_found and not sequence.in_tool_call:
            self._send_text(sequence, final=True)
        if sequence in self._active:
            self._active.remove(sequence)
            self.decoder.release(sequence)
        if sequence.finish_reason == FINISH_CANCELLED:
            self.stats.cancelled_sequences += 1
        elif sequence.finish_reason in (FINISH_STOP, FINISH_LENGTH):
            self.stats.finished_sequences += 1
        else:
            self.stats.failed_sequences += 1
        sequence.handle._emit(Finished(sequence.index, sequence.finish_reason or FINISH_ERROR,
                                       sequence.sampled, sequence.error,
                                       tuple(sequence.new_ids)))
