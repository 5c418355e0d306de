"""The micro-batches of each optimizer step, and a thread that builds the next step's ahead.

A step's batches are a pure function of the step and the data settings (seed, window, micro
batch, accumulation, world size): that is what makes a resumed run draw exactly the batches an
uninterrupted one would, and what lets a background thread build them early without changing
them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from albor.data.windows import WindowSampler
from albor.train.settings import TrainSettings


class StepBatches:
    """The micro-batches of a step: a pure function of the step (and the data settings)."""

    def __init__(
        self, sampler: WindowSampler, s: TrainSettings, world: int, rank: int, *, pin: bool
    ) -> None:
        self.sampler, self.micro_batch, self.grad_accum = sampler, s.micro_batch, s.grad_accum
        self.world, self.rank, self.pin = world, rank, pin

    def __call__(self, step: int) -> list[torch.Tensor]:
        m = self.micro_batch
        if self.world == 1:
            out = [self.sampler.batch(step, micro, m) for micro in range(self.grad_accum)]
        else:
            # This rank's slice of the batch one process with micro_batch x world would draw.
            lo, hi = self.rank * m, (self.rank + 1) * m
            out = [
                self.sampler.batch(step, micro, m * self.world)[lo:hi]
                for micro in range(self.grad_accum)
            ]
        return [b.pin_memory() for b in out] if self.pin else out

    def describe(self) -> dict[str, int]:
        """What the batches are a function of besides the step (a checkpoint records it)."""
        found = {
            "seed": self.sampler.seed,
            "seq_len": self.sampler.seq_len,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
        }
        if self.world > 1:  # absent for one process, so single-process checkpoints read as before
            found["world_size"] = self.world
        return found


class Prefetcher:
    """Builds the next step's micro-batches in a background thread while this step trains.

    Batches are a pure function of the step, so the thread changes when they are built, never
    what they are. On CUDA they are pinned, for asynchronous copies to the device.
    """

    def __init__(
        self, make: Callable[[int], list[torch.Tensor]], end: int, *, enabled: bool = True
    ) -> None:
        self._make = make
        self._end = end
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="albor-prefetch") if enabled else None
        self._next: tuple[int, Future[list[torch.Tensor]]] | None = None

    def get(self, step: int) -> list[torch.Tensor]:
        if self._pool is None:
            return self._make(step)
        if self._next is not None and self._next[0] == step:
            batches = self._next[1].result()
        else:
            batches = self._make(step)
        nxt = step + 1
        self._next = (nxt, self._pool.submit(self._make, nxt)) if nxt < self._end else None
        return batches

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
