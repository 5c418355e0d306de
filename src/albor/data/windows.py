"""Training and evaluation windows over memory-mapped token shards.

Training draws random windows of `seq_len + 1` tokens from a generator seeded by (seed, step,
micro-step), so the batch of any step is a pure function of the step: a resumed run sees exactly
the batches an uninterrupted one would have, and the stream never runs dry (`max_steps` is
authoritative; the data simply repeats, the ALB-060 lesson). Evaluation reads consecutive
non-overlapping windows from the start of a split, so every evaluation sees the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from albor.errors import DataError


class WindowSampler:
    """Random `(B, seq_len + 1)` windows, a deterministic function of (seed, step, micro)."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, seed: int) -> None:
        self.shards = [s for s in shards if len(s) > seq_len + 1]
        if not self.shards:
            longest = max((len(s) for s in shards), default=0)
            raise DataError(
                f"no token shard holds a window of {seq_len + 1} tokens (longest: {longest}): "
                "lower seq_len or add data"
            )
        self.seq_len = seq_len
        self.seed = seed
        # Windows start anywhere a full window fits; shards are picked in proportion to that room.
        room = np.array([len(s) - seq_len - 1 for s in self.shards], dtype=np.float64)
        self.cum = np.cumsum(room)

    @property
    def tokens(self) -> int:
        return int(sum(len(s) for s in self.shards))

    def batch(self, step: int, micro: int, batch_size: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step, micro])
        draws = rng.random(batch_size) * self.cum[-1]
        out = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        for i, d in enumerate(draws):
            k = int(np.searchsorted(self.cum, d, side="right"))
            k = min(k, len(self.shards) - 1)
            start = int(d - (self.cum[k - 1] if k else 0.0))
            out[i] = self.shards[k][start : start + self.seq_len + 1]
        return torch.from_numpy(out)


def aligned_window_count(tokens: int, seq_len: int) -> int:
    """How many aligned windows of `seq_len + 1` tokens (stride `seq_len`) a shard of `tokens`
    tokens holds: the windows `eval_windows` reads from it."""
    return max(tokens - 1, 0) // seq_len


def aligned_window(shard: np.ndarray, window: int, seq_len: int) -> np.ndarray:
    """Aligned window number `window` of `shard`: `seq_len + 1` tokens from `window * seq_len`."""
    start = window * seq_len
    return np.asarray(shard[start : start + seq_len + 1], dtype=np.int64)


class AlignedWindowSampler:
    """Random aligned windows as (shard, window) numbers, a deterministic function of (seed,
    step, micro): every window of every shard equally likely, as `WindowSampler` makes every
    start equally likely."""

    def __init__(self, counts: list[int], seed: int) -> None:
        if sum(counts) < 1:
            raise DataError(
                "no shard holds an aligned window (every shard is shorter than seq_len + 1 "
                "tokens): lower seq_len or add data"
            )
        self.counts = list(counts)
        self.seed = seed
        self.cum = np.cumsum(np.asarray(counts, dtype=np.int64))

    @property
    def windows(self) -> int:
        return int(self.cum[-1])

    def draw(self, step: int, micro: int, batch_size: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, step, micro])
        flat = rng.integers(0, self.windows, size=batch_size)
        shards = np.searchsorted(self.cum, flat, side="right")
        starts = np.concatenate(([0], self.cum[:-1]))
        return [(int(s), int(f - starts[s])) for s, f in zip(shards, flat, strict=True)]


def eval_windows(
    shards: list[np.ndarray], seq_len: int, max_tokens: int, batch_size: int
) -> Iterator[torch.Tensor]:
    """Consecutive windows of `seq_len + 1` tokens (stride `seq_len`, so every target is scored
    once) from the start of the split, in batches, until `max_tokens` targets are covered."""
    covered = 0
    batch: list[np.ndarray] = []
    for shard in shards:
        start = 0
        while start + seq_len + 1 <= len(shard) and covered < max_tokens:
            batch.append(np.asarray(shard[start : start + seq_len + 1], dtype=np.int64))
            covered += seq_len
            start += seq_len
            if len(batch) == batch_size:
                yield torch.from_numpy(np.stack(batch))
                batch = []
        if covered >= max_tokens:
            break
    if batch:
        yield torch.from_numpy(np.stack(batch))


def eval_token_count(shards: list[np.ndarray], seq_len: int, max_tokens: int) -> int:
    """How many targets `eval_windows` will score."""
    total = sum(aligned_window_count(len(s), seq_len) * seq_len for s in shards)
    return min(total, -(-max_tokens // seq_len) * seq_len) if total else 0
