"""Batches of fixed-length token windows for training and evaluation.

A window is seq_len + 1 consecutive tokens starting at a multiple of seq_len:
x is its first seq_len tokens and y its last seq_len, so y is x shifted by one.
Documents are already separated by eos in the token files, so windows cross
document boundaries. The up to seq_len tokens after the last full window of a
source are never used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from codeling.errors import CodelingError

LOADER_STATE_VERSION = 1


def _window_count(tokens: np.ndarray, seq_len: int) -> int:
    return (len(tokens) - 1) // seq_len


def _check_length(tokens: np.ndarray, seq_len: int, name: str) -> None:
    if len(tokens) < seq_len + 1:
        raise CodelingError(
            f"source {name!r} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "use a smaller seq_len or more data"
        )


def _windows_to_batch(
    tokens_by_source: Sequence[np.ndarray], picks: Sequence[tuple[int, int]], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (source index, window start) windows into x and y of shape (len(picks), seq_len)."""
    rows = np.empty((len(picks), seq_len + 1), dtype=np.int64)
    for row, (source, start) in enumerate(picks):
        rows[row] = tokens_by_source[source][start : start + seq_len + 1]
    windows = torch.from_numpy(rows)
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def check_loader_state(state: dict[str, Any], expected: dict[str, Any], same: str) -> None:
    """Raise CodelingError listing each key where a saved loader state differs from `expected`.

    `same` names what a resume has to keep, for example "data, seed, seq_len and global batch
    size".
    """
    mismatches = [f"{key} {state.get(key)!r} != {value!r}"
                  for key, value in expected.items() if state.get(key) != value]
    if mismatches:
        raise CodelingError(f"loader state does not match this loader ({'; '.join(mismatches)}); "
                            f"resume with the same {same}")


class PackedLoader:
    """An endless, seeded and resumable iterator over (x, y) batches of packed token windows.

    Each source has its own epochs: an epoch visits every window of the source
    once, in a permutation seeded by (seed, source index, epoch). With several
    sources, each sample's source is drawn by `weights` from a seeded generator;
    without weights, sources are drawn in proportion to their token counts.

    `batch_size` is per rank. All ranks compute the same global batch of
    batch_size * world_size samples, and rank r takes samples
    [r * batch_size, (r + 1) * batch_size), so the ranks never share a window
    within an epoch and together they get the batches of one rank with the global batch size.
    """

    def __init__(
        self,
        tokens: np.ndarray | Sequence[np.ndarray],
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        sources = [tokens] if isinstance(tokens, np.ndarray) else list(tokens)
        if not sources:
            raise CodelingError(
                "PackedLoader got no token arrays; pass at least one prepared split"
            )
        self.names = (
            list(names)
            if names is not None
            else [f"source {index}" for index in range(len(sources))]
        )
        if len(self.names) != len(sources):
            raise CodelingError(
                f"got {len(self.names)} names for {len(sources)} token arrays; "
                "pass one name per array"
            )
        if batch_size < 1:
            raise CodelingError(f"batch_size {batch_size} is invalid; use 1 or more")
        if seq_len < 1:
            raise CodelingError(f"seq_len {seq_len} is invalid; use 1 or more")
        if world_size < 1 or not 0 <= rank < world_size:
            raise CodelingError(
                f"rank {rank} with world_size {world_size} is invalid; use 0 <= rank < world_size"
            )
        for array, name in zip(sources, self.names):
            if array.ndim != 1:
                raise CodelingError(
                    f"token array of {name!r} has shape {array.shape}; pass a 1-D array"
                )
            _check_length(array, seq_len, name)

        if weights is None:
            weights = (
                [1.0] * len(sources) if len(sources) == 1 else [len(array) for array in sources]
            )
        if len(weights) != len(sources):
            raise CodelingError(
                f"got {len(weights)} weights for {len(sources)} sources; pass one weight per source"
            )
        weight_array = np.asarray(weights, dtype=np.float64)
        if (
            not np.all(np.isfinite(weight_array))
            or np.any(weight_array < 0)
            or weight_array.sum() <= 0
        ):
            raise CodelingError(
                f"mixture weights {list(weights)} are invalid; "
                "use non-negative numbers with a positive sum"
            )

        self.sources = sources
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.probabilities = weight_array / weight_array.sum()
        self.window_counts = [_window_count(array, seq_len) for array in sources]

        self._epochs = [0] * len(sources)
        self._positions = [0] * len(sources)
        self._steps = 0
        self._choice_generator = np.random.Generator(np.random.PCG64(seed))
        self._permutations: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def global_batch_size(self) -> int:
        """Samples per step over all ranks."""
        return self.batch_size * self.world_size

    @property
    def batches_per_epoch(self) -> float:
        """Batches (over all ranks) that draw as many windows as the sources hold together."""
        return sum(self.window_counts) / self.global_batch_size

    @property
    def epochs(self) -> list[int]:
        """Current epoch of each source, counting from 0."""
        return list(self._epochs)

    @property
    def steps(self) -> int:
        """Number of batches produced so far."""
        return self._steps

    def _permutation(self, source: int) -> np.ndarray:
        epoch = self._epochs[source]
        cached = self._permutations.get(source)
        if cached is None or cached[0] != epoch:
            generator = np.random.default_rng([self.seed, source, epoch])
            cached = (epoch, generator.permutation(self.window_counts[source]))
            self._permutations[source] = cached
        return cached[1]

    def _next_window_start(self, source: int) -> int:
        if self._positions[source] >= self.window_counts[source]:
            self._epochs[source] += 1
            self._positions[source] = 0
        window = self._permutation(source)[self._positions[source]]
        self._positions[source] += 1
        return int(window) * self.seq_len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return this rank's next (x, y) batch, each int64 of shape (batch_size, seq_len)."""
        if len(self.sources) == 1:
            choices = np.zeros(self.global_batch_size, dtype=np.int64)
        else:
            choices = self._choice_generator.choice(
                len(self.sources), size=self.global_batch_size, p=self.probabilities
            )
        # Every rank advances through the whole global batch so that all ranks stay in step.
        picks = [(int(source), self._next_window_start(int(source))) for source in choices]
        own = picks[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self._steps += 1
        return _windows_to_batch(self.sources, own, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        """Return the position as plain Python values, to store in a checkpoint."""
        return {
            "version": LOADER_STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "window_counts": list(self.window_counts),
            "epochs": list(self._epochs),
            "positions": list(self._positions),
            "steps": self._steps,
            "choice_generator": self._choice_generator.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by `state_dict`, so the next batches continue that run."""
        expected = {
            "version": LOADER_STATE_VERSION,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "window_counts": list(self.window_counts),
        }
        check_loader_state(state, expected, "data, seed, seq_len and global batch size")
        self._epochs = list(state["epochs"])
        self._positions = list(state["positions"])
        self._steps = int(state["steps"])
        self._choice_generator.bit_generator.state = state["choice_generator"]


def iter_eval_batches(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    name: str = "val",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validate the arguments and return batches of consecutive windows from the start of tokens.

    Every batch has batch_size rows except possibly the last. The same tokens
    always give the same batches, so losses are comparable between evaluations.
    """
    if batch_size < 1:
        raise CodelingError(f"batch_size {batch_size} is invalid; use 1 or more")
    if seq_len < 1:
        raise CodelingError(f"seq_len {seq_len} is invalid; use 1 or more")
    if max_batches is not None and max_batches < 1:
        raise CodelingError(f"max_batches {max_batches} is invalid; use 1 or more, or no limit")
    _check_length(tokens, seq_len, name)
    window_count = _window_count(tokens, seq_len)
    if max_batches is not None:
        window_count = min(window_count, max_batches * batch_size)
    return _iter_consecutive_batches(tokens, batch_size, seq_len, window_count)


def _iter_consecutive_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, window_count: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for first in range(0, window_count, batch_size):
        picks = [
            (0, window * seq_len) for window in range(first, min(first + batch_size, window_count))
        ]
        yield _windows_to_batch([tokens], picks, seq_len)
