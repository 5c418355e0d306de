"""What a training run shows and records as it goes: metrics lines, validation, the progress bar.

Rank 0 appends a line to `metrics.jsonl` every `log_every` steps (and at the last) and one per
validation, mirrored to the run tracker; the other ranks write theirs nowhere. The progress bar
counts steps, or under `max_time` the seconds of the budget, so its ETA is that of whichever
limit ends the run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from albor import progress
from albor.track import metrics
from albor.track.metrics import METRICS_FILE
from albor.train import distributed
from albor.train.session import Session
from albor.train.settings import TrainSettings
from albor.train.state import TrainState


@contextlib.contextmanager
def metrics_file(run_dir: Path) -> Iterator[IO[str]]:
    """The metrics log, appended to; other ranks write their (identical) lines nowhere."""
    path = run_dir / METRICS_FILE if distributed.is_rank0() else Path(os.devnull)
    with open(path, "a", encoding="utf-8") as f:
        yield f


def log_resume(out: IO[str], st: TrainState, checkpoint: str | None, warnings: list[str]) -> None:
    """The line that marks where a resumed run took up again."""
    # No numeric fields besides the step: plots read every number as a curve.
    resume = {"event": "resume", "checkpoint": checkpoint, "warnings": warnings}
    metrics.append(out, {"step": st.step, **resume})


def log_step(session: Session, out: IO[str], st: TrainState, grad_norm: float, rate: float) -> None:
    record: dict[str, Any] = {
        "step": st.step,
        "loss": st.loss,  # unrounded: a resumed run must match it exactly
        "lr": st.lr,
        "grad_norm": grad_norm,
        "tokens": st.tokens,
        "tokens_per_s": round(rate, 1),
        "elapsed_s": round(st.elapsed_s, 2),
    }
    # An objective may add its own figures since the last line (distillation: the KL term).
    extra = getattr(session.objective, "log_metrics", None)
    if callable(extra):
        record.update(extra())
    metrics.append(out, record)
    if session.tracker is not None:
        session.tracker.log(**record)


def validate(
    session: Session, out: IO[str], st: TrainState, evaluate: Callable[[], dict[str, Any]]
) -> None:
    """Run the validation, log it, and keep the best validation loss so far."""
    # FSDP's forward needs every rank; under DDP rank 0 validates alone.
    rank0 = distributed.is_rank0()
    result = {"step": st.step, **evaluate()} if rank0 or session.mode == "fsdp" else {}
    if session.mode == "ddp":
        result = distributed.broadcast(result)
    st.evals.append(result)
    metrics.append(out, result)
    if session.tracker is not None:
        session.tracker.log(**result)
    if isinstance(result.get("val_loss"), int | float):
        st.val_loss = float(result["val_loss"])
        if st.best is None or st.val_loss < st.best["val_loss"]:
            st.best = {"step": st.step, "val_loss": st.val_loss}


def bar(
    label: str, s: TrainSettings, st: TrainState
) -> contextlib.AbstractContextManager[progress.Bar]:
    """The run's progress bar on rank 0 (none elsewhere): in steps, or under max_time in seconds
    of the budget, so that its ETA is that of whichever limit ends the run (a step count out of
    reach would promise years)."""
    if not distributed.is_rank0():
        return _no_bar()
    if s.max_time is None:
        return progress.bar(label, s.max_steps, completed=st.step)
    return progress.bar(label, s.max_time, unit="s", completed=done(s, st))


def done(s: TrainSettings, st: TrainState) -> float:
    """Work done in the bar's units: steps, or the budget's seconds that the larger of the step
    and time progress stands for."""
    if s.max_time is None:
        return st.step
    return min(s.max_time, max(st.train_s, st.step / s.max_steps * s.max_time))


def show(bar: progress.Bar, s: TrainSettings, st: TrainState, rate: float) -> None:
    shown: dict[str, object] = {"step": st.step, "loss": f"{st.loss:.4f}", "tok/s": f"{rate:,.0f}"}
    if st.skipped_steps:
        shown["skipped"] = st.skipped_steps
    bar.update(completed=done(s, st), fields=shown)


@contextlib.contextmanager
def _no_bar() -> Iterator[progress.Bar]:
    """The progress bar of a rank other than 0: none."""
    yield progress.Bar(None)
