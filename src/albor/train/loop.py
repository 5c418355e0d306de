"""The one training loop (pretrain; distill and finetune pass their objective and parameters).

Per optimizer step (`step.train_step`): the step's `grad_accum` micro-batches, a pure function
of the step built in a background thread while the previous step trains, forward and backward
with the step's token count as the divisor; gradient clipping that is always on; the optimizer
with the warmup + decay schedule. Options: bf16 autocast, `torch.compile`, activation
checkpointing. The run ends at `max_steps`, or when the training steps have spent `max_time`
(the decay then reaches its floor there instead): it validates and returns as at any end.

A non-finite loss or gradient skips the step (weights and optimizer untouched) and is counted;
`max_bad_steps` in a row (a finite step resets the count) stop the run with the step, the last
finite loss and the likely causes. `health.py` warns of runs that learn nothing. Metrics go to
`metrics.jsonl` (`monitor.py`); validation every `eval_every` steps. Checkpoints, written by
the run's `Checkpointer`, every `checkpoint_every` steps, when validation improves, and on
SIGINT / SIGTERM. A run restarted with the same directory resumes from the newest usable
checkpoint, even after SIGKILL (`session.py`): batches are step-indexed and the weights,
optimizer, RNG states, counters (`TrainState`) and schedule position are all restored, so it
continues exactly as if never stopped.

Under torchrun (`distributed.py`) with DDP or FSDP2, each rank takes its slice of the batch one
process with `micro_batch x world` would draw, the loss is normalised by the step's token count
over all ranks, and the gradients are reduced only on the last micro-batch: the update is that
of the single process with the global batch. Rank 0 alone writes metrics and checkpoints.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from albor.data.windows import WindowSampler
from albor.errors import AlborError
from albor.model.gpt import GPT
from albor.track.runs import RunTracker
from albor.train import checkpoint, distributed, monitor
from albor.train.batches import Prefetcher
from albor.train.checkpoint import Checkpointer
from albor.train.objectives import NextToken, Objective
from albor.train.session import best_location, open_session, record_best, save, snapshot
from albor.train.settings import Precision, TrainSettings
from albor.train.state import LoopResult
from albor.train.step import step_time, train_step


class TrainingStopped(AlborError):
    """SIGINT or SIGTERM: a checkpoint was saved and the run can resume. Not a failure."""

    exit_code = 0


class _StopSignals:
    """Turn SIGINT / SIGTERM into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def prefetches(s: TrainSettings, device: torch.device) -> bool:
    """`prefetch`, with auto resolved: a thread only where the compute is not on the CPU."""
    return s.prefetch if isinstance(s.prefetch, bool) else device.type != "cpu"


def train(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    sampler: WindowSampler,
    settings: TrainSettings,
    *,
    device: torch.device,
    run_dir: Path,
    checkpointer: Checkpointer,
    evaluate: Callable[[], dict[str, Any]] | None = None,
    objective: Objective | None = None,
    tracker: RunTracker | None = None,
    label: str = "train",
    precision: Precision | None = None,
) -> LoopResult:
    """Train `model` to `settings.max_steps` (or until `settings.max_time` is spent), resuming
    from `run_dir/checkpoints` if a run was there; `label` names the progress bar. `precision`:
    what `precision: auto` resolved to (the preflight's `Setup.precision`); without it the
    settings' own, which must then not be auto."""
    s = settings
    if precision is None and s.precision == "auto":
        raise AlborError(
            "precision: auto is resolved by the preflight (albor.train.preflight.setup): pass "
            "its Setup.precision to train(precision=...)"
        )
    session, st, resumed = open_session(
        model,
        optimizer,
        sampler,
        s,
        device=device,
        run_dir=run_dir,
        checkpointer=checkpointer,
        objective=objective or NextToken(),
        precision=precision or cast(Precision, s.precision),
        tracker=tracker,
    )
    model.train()
    t0, start_step, elapsed_before = time.perf_counter(), st.step, st.elapsed_s
    with (
        monitor.metrics_file(run_dir) as out,
        _StopSignals() as stop,
        Prefetcher(session.batches, s.max_steps, enabled=prefetches(s, device)) as prefetch,
        monitor.bar(label, s, st) as bar,
    ):
        if resumed.path is not None or resumed.warnings:
            name = resumed.path.name if resumed.path is not None else None
            monitor.log_resume(out, st, name, resumed.warnings)
        mark = time.perf_counter()
        while st.step < s.max_steps and not st.spent(s):
            grad_norm = train_step(session, st, prefetch.get(st.step))
            # The budget counts the wall clock of the loop: this step, and the logging,
            # validation and checkpoint of the step before (the final ones come on top).
            now = time.perf_counter()
            st.train_s += step_time(session, now - mark)
            mark = now
            st.step += 1
            st.tokens += session.tokens_per_step
            st.elapsed_s = elapsed_before + time.perf_counter() - t0
            session_s = max(st.elapsed_s - elapsed_before, 1e-9)
            rate = (st.step - start_step) * session.tokens_per_step / session_s
            last = st.step >= s.max_steps or st.spent(s)
            if st.step % s.log_every == 0 or last:
                monitor.log_step(session, out, st, grad_norm, rate)
            st.val_loss = None
            if evaluate is not None and (st.step % s.eval_every == 0 or last):
                monitor.validate(session, out, st, evaluate)
            monitor.show(bar, s, st, rate)
            # Every rank must stop at the same step, whichever the signal reached first.
            stopping = distributed.any_rank(stop.signal is not None, device)
            stopping = stopping and not last
            improved = st.best is not None and st.best["step"] == st.step
            due = st.step % s.checkpoint_every == 0 or stopping or improved
            if due and not last:
                path = save(session, st)
                distributed.barrier()  # no rank runs ahead of a checkpoint being written
                if stopping:
                    name = signal.Signals(stop.signal or signal.SIGTERM).name
                    raise TrainingStopped(
                        f"stopped by {name} at step {st.step} of {s.max_steps}: checkpoint "
                        f"saved to {path or checkpoint.step_dir(session.checkpoints, st.step)}; "
                        "run the same command again to resume from it"
                    )
        if distributed.is_rank0():
            record_best(session.checkpoints, st.best, st.step)
    wall = time.perf_counter() - t0
    return LoopResult(
        steps=st.step,
        tokens=st.tokens,
        final_loss=st.last_finite_loss,
        wall_time_s=wall,
        tokens_per_s=(st.step - start_step) * session.tokens_per_step / max(wall, 1e-9),
        skipped_steps=st.skipped_steps,
        resumed_from=checkpoint.step_of(resumed.path) if resumed.path is not None else None,
        evals=st.evals,
        warnings=session.health.warnings,
        resume_warnings=st.resume_warnings,
        best=best_location(st.best, st.step),
        state=snapshot(session, st),
        ended_by="max_time" if st.step < s.max_steps and st.spent(s) else "max_steps",
        train_s=st.train_s,
    )
