"""The one training loop (pretrain; distill and finetune pass their objective and parameters).

Per optimizer step (`train_step`): the step's `grad_accum` micro-batches, a pure function of the
step built in a background thread while the previous step trains; each micro-batch is
backpropagated as its sum of token losses divided by the number of tokens the whole step scores,
so the gradient is that of the mean over every token of the step however the tokens fall into
micro-batches; then gradient clipping that is always on (safety never hangs on an optional
setting) and the optimizer with the warmup + cosine schedule. Options: bf16 autocast (fp32
master weights, gradients and optimizer; no loss scaling, which bf16's fp32 range makes
needless), `torch.compile`, activation checkpointing. The run ends at `max_steps`, or when the
training steps have spent `max_time` (the decay then reaches its floor there instead): it
validates and returns as at any end.

A non-finite loss or gradient skips the step (weights and optimizer untouched) and is counted;
`max_bad_steps` in a row (a finite step resets the count) stop the run with the step, the last
finite loss and the likely causes. `health.py` warns of runs that learn nothing. Metrics go to
`metrics.jsonl`; validation every `eval_every` steps. Checkpoints, written by the run's
`Checkpointer`, every `checkpoint_every` steps, when validation improves, and on SIGINT /
SIGTERM. A run restarted with the same directory resumes from the newest usable checkpoint, even
after SIGKILL: batches are step-indexed and the weights, optimizer, RNG states, counters
(`TrainState`) and schedule position are all restored, so it continues exactly as if never
stopped.

Under torchrun (`distributed.py`) with DDP or FSDP2, each rank takes its slice of the batch one
process with `micro_batch x world` would draw, the loss is normalised by the step's token count
over all ranks, and the gradients are reduced only on the last micro-batch: the update is that
of the single process with the global batch. Rank 0 alone writes metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch import nn

from albor import progress
from albor.data.windows import WindowSampler
from albor.errors import AlborError, StageFailed
from albor.model.gpt import GPT
from albor.track import metrics
from albor.track.metrics import METRICS_FILE
from albor.track.plot import write_loss_plot
from albor.track.runs import RunTracker
from albor.train import checkpoint, distributed
from albor.train.batches import Prefetcher, StepBatches
from albor.train.checkpoint import Checkpointer
from albor.train.health import Health
from albor.train.objectives import NextToken, Objective
from albor.train.optim import lr_at, set_lr, time_progress
from albor.train.settings import Parallelism, Precision, TrainSettings

log = logging.getLogger(__name__)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on `device` (CUDA or CPU) when asked for; otherwise plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def accumulate(
    model: nn.Module,
    objective: Objective,
    batches: list[torch.Tensor],
    device: torch.device,
    precision: Precision = "fp32",
    *,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> float:
    """Forward and backward over one optimizer step's micro-batches; the step's mean token loss.

    Dividing each micro-batch's mean by their number would weight a token by how many others
    share its micro-batch; dividing sums by the step's token count weights every token alike,
    exactly as one batch holding all the micro-batches would. NaN when nothing is scored.

    Under DDP / FSDP the count is the whole step's over every rank, and each rank's loss is
    multiplied by the world size because the gradient reduction averages over ranks: the update
    is then that of one process holding the global batch. `no_sync` (the wrapper's way to skip
    the gradient reduction) is entered for every micro-batch but the last.
    """
    world = distributed.world_size() if distributed.active() else 1
    total = sum(objective.targets(b) for b in batches)
    if world > 1:
        total = int(distributed.all_reduce_sum(total, device))
    if total == 0:
        return float("nan")
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(batches):
        b = b.to(device, non_blocking=True)
        last = i == len(batches) - 1
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            with autocast(device, precision):
                loss = objective.loss_sum(model, b)
            if world == 1:
                (loss / total).backward()
            else:
                (loss * (world / total)).backward()
        loss_sum += loss.detach().float()
    if world > 1:
        return distributed.all_reduce_sum(float(loss_sum), device) / total
    return float(loss_sum) / total  # one device sync per step, not one per micro-batch


def _number(value: Any) -> float:
    return float(value) if value is not None else float("nan")


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value  # JSON has no NaN


@dataclass
class TrainState:
    """What the loop carries from step to step; a checkpoint's `trainer_state.json` holds it."""

    step: int = 0
    tokens: int = 0
    loss: float = float("nan")  # the latest step's mean token loss, finite or not
    last_finite_loss: float = float("nan")
    lr: float = 0.0
    val_loss: float | None = None  # measured at this step, if validation ran
    best: dict[str, Any] | None = None  # {"step", "val_loss"} of the lowest validation loss
    evals: list[dict[str, Any]] = field(default_factory=list)
    skipped_steps: int = 0
    bad_in_row: int = 0
    elapsed_s: float = 0.0  # wall time over every session of the run
    train_s: float = 0.0  # the loop's wall time over every session: what max_time budgets
    warmup_end_s: float | None = None  # train_s when warmup ended (the time decay starts there)
    resume_warnings: list[str] = field(default_factory=list)
    loss_reference: float | None = None  # health's first-window mean, carried over a resume

    @classmethod
    def restore(cls, saved: dict[str, Any]) -> TrainState:
        """The state a checkpoint saved ({}: a fresh run)."""
        reference = saved.get("loss_reference")
        return cls(
            step=int(saved.get("step", 0)),
            tokens=int(saved.get("tokens", 0)),
            last_finite_loss=_number(saved.get("last_finite_loss")),
            best=saved.get("best"),
            evals=list(saved.get("evals", [])),
            skipped_steps=int(saved.get("skipped_steps", 0)),
            bad_in_row=int(saved.get("bad_in_row", 0)),
            elapsed_s=float(saved.get("elapsed_s", 0.0)),
            train_s=float(saved.get("train_s", 0.0)),
            warmup_end_s=_optional_float(saved.get("warmup_end_s")),
            resume_warnings=list(saved.get("resume_warnings", [])),
            loss_reference=float(reference) if reference is not None else None,
        )

    def to_json(
        self, settings: TrainSettings, data: dict[str, Any], precision: Precision
    ) -> dict[str, Any]:
        """`trainer_state.json`: the state, with the schedule and data position it belongs to."""
        found = {
            "step": self.step,
            "tokens": self.tokens,
            "loss": _json_number(self.loss),
            "last_finite_loss": _json_number(self.last_finite_loss),
            "val_loss": self.val_loss,
            "best": self.best,
            "lr": self.lr,
            "schedule": settings.schedule(),
            # The batches are a function of these and the step.
            "data": {**data, "next_step": self.step},
            "precision": precision,
            "skipped_steps": self.skipped_steps,
            "bad_in_row": self.bad_in_row,
            "elapsed_s": round(self.elapsed_s, 3),
            "train_s": self.train_s,  # unrounded: a resume continues the time schedule exactly
            "evals": self.evals,
            "resume_warnings": self.resume_warnings,
            "loss_reference": self.loss_reference,
        }
        if self.warmup_end_s is not None:
            found["warmup_end_s"] = self.warmup_end_s
        return found


def _optional_float(value: Any) -> float | None:
    return float(value) if value is not None else None


@dataclass
class LoopResult:
    steps: int
    tokens: int
    final_loss: float
    wall_time_s: float
    tokens_per_s: float
    skipped_steps: int
    resumed_from: int | None
    evals: list[dict[str, Any]] = field(default_factory=list)
    warnings: dict[str, str] = field(default_factory=dict)
    resume_warnings: list[str] = field(default_factory=list)
    best: dict[str, Any] | None = None
    state: dict[str, Any] = field(default_factory=dict)
    ended_by: str = "max_steps"  # or "max_time": the time budget was spent first
    train_s: float = 0.0  # the loop's wall time over every session of the run


@dataclass
class Session:
    """What stays fixed while one process trains: the model as this run wraps it (compiled,
    DDP), the optimizer and objective, the settings, where files go, and who writes them."""

    model: GPT
    forward: nn.Module  # `model`, compiled and / or wrapped in DDP
    optimizer: torch.optim.Optimizer
    objective: Objective
    settings: TrainSettings
    precision: Precision  # settings.precision with "auto" resolved
    device: torch.device
    mode: Parallelism
    world: int  # ranks the batch is spread over (1 without a process group)
    run_dir: Path
    checkpointer: Checkpointer
    data: dict[str, Any]  # what the batches are a function of, besides the step
    tokens_per_step: int
    health: Health
    params: list[nn.Parameter]  # the trainable ones: the gradient clipped is theirs
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    tracker: RunTracker | None = None

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


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
    chosen = precision or cast(Precision, s.precision)
    rank0 = distributed.is_rank0()
    mode, world = _parallelism(s)
    root = run_dir / "checkpoints"
    resumed = checkpoint.resume_ranks(root, model, optimizer, device, fsdp=mode == "fsdp")
    st = TrainState.restore(resumed.state)
    st.resume_warnings += resumed.warnings
    batches = StepBatches(sampler, s, world, distributed.rank(), pin=device.type == "cuda")
    data = batches.describe()
    if resumed.state:
        _note_changed_settings(st, resumed.state, s, data, chosen)
    forward, no_sync = _wrap(model, s, device, mode)
    session = Session(
        model=model,
        forward=forward,
        optimizer=optimizer,
        objective=objective or NextToken(),
        settings=s,
        precision=chosen,
        device=device,
        mode=mode,
        world=world,
        run_dir=run_dir,
        checkpointer=checkpointer,
        data=data,
        tokens_per_step=s.tokens_per_step(sampler.seq_len, world),
        health=Health(warmup_steps=s.warmup_steps, reference=st.loss_reference),
        params=[p for p in model.parameters() if p.requires_grad],
        no_sync=no_sync,
        tracker=tracker,
    )
    # Lines after the resume point will be written again; a line cut by a kill is dropped.
    if rank0:
        metrics.truncate(run_dir / METRICS_FILE, st.step)
    if tracker is not None:
        tracker.truncate(st.step)
    if resumed.path is not None:
        log.info("resuming from %s (step %d)", resumed.path, st.step)

    model.train()
    t0, start_step, elapsed_before = time.perf_counter(), st.step, st.elapsed_s
    with (
        _metrics_file(run_dir) as out,
        _StopSignals() as stop,
        Prefetcher(batches, s.max_steps, enabled=s.prefetch) as prefetch,
        _bar(label, s, st) if rank0 else _no_bar() as bar,
    ):
        if resumed.path is not None or resumed.warnings:
            # No numeric fields besides the step: plots read every number as a curve.
            name = resumed.path.name if resumed.path is not None else None
            resume = {"event": "resume", "checkpoint": name, "warnings": resumed.warnings}
            metrics.append(out, {"step": st.step, **resume})
        mark = time.perf_counter()
        while st.step < s.max_steps and not _spent(s, st):
            grad_norm = train_step(session, st, prefetch.get(st.step))
            # The budget counts the wall clock of the loop: this step, and the logging,
            # validation and checkpoint of the step before (the final ones come on top).
            now = time.perf_counter()
            st.train_s += _step_time(session, now - mark)
            mark = now
            st.step += 1
            st.tokens += session.tokens_per_step
            st.elapsed_s = elapsed_before + time.perf_counter() - t0
            session_s = max(st.elapsed_s - elapsed_before, 1e-9)
            rate = (st.step - start_step) * session.tokens_per_step / session_s
            last = st.step >= s.max_steps or _spent(s, st)
            if st.step % s.log_every == 0 or last:
                _log_step(session, out, st, grad_norm, rate)
            st.val_loss = None
            if evaluate is not None and (st.step % s.eval_every == 0 or last):
                _validate(session, out, st, evaluate)
            _show(bar, s, st, rate)
            # Every rank must stop at the same step, whichever the signal reached first.
            stopping = distributed.any_rank(stop.signal is not None, device)
            stopping = stopping and not last
            improved = st.best is not None and st.best["step"] == st.step
            due = st.step % s.checkpoint_every == 0 or stopping or improved
            if due and not last:
                path = _save(session, st)
                distributed.barrier()  # no rank runs ahead of a checkpoint being written
                if stopping:
                    name = signal.Signals(stop.signal or signal.SIGTERM).name
                    raise TrainingStopped(
                        f"stopped by {name} at step {st.step} of {s.max_steps}: checkpoint "
                        f"saved to {path or checkpoint.step_dir(root, st.step)}; run the "
                        "same command again to resume from it"
                    )
        if rank0:
            _record_best(root, st.best, st.step)
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
        best=_best_location(st.best, st.step),
        state=_snapshot(session, st),
        ended_by="max_time" if st.step < s.max_steps and _spent(s, st) else "max_steps",
        train_s=st.train_s,
    )


def _spent(s: TrainSettings, st: TrainState) -> bool:
    """Whether the time budget is used up (never, without one)."""
    return s.max_time is not None and st.train_s >= s.max_time


def _step_time(session: Session, seconds: float) -> float:
    """A step's wall time as the time budget counts it: under a budget in a job of several
    ranks, their mean, so that every rank sees the same time, hence the same learning rate and
    the same last step."""
    if session.settings.max_time is not None and session.world > 1:
        return distributed.all_reduce_sum(seconds, session.device) / session.world
    return seconds


def train_step(session: Session, st: TrainState, batches: list[torch.Tensor]) -> float:
    """One optimizer step on `batches` at step `st.step` (0-based); the gradient norm.

    A step whose loss or gradient is not finite is dropped whole (weights and optimizer state
    stay as they were) and counted; `max_bad_steps` of them in a row stop the run.
    """
    s, optimizer = session.settings, session.optimizer
    if s.max_time is not None and st.warmup_end_s is None and st.step >= s.warmup_steps:
        st.warmup_end_s = st.train_s
    st.lr = lr_at(
        st.step,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        max_steps=s.max_steps,
        min_lr_ratio=s.min_lr_ratio,
        time_progress=time_progress(st.train_s, st.warmup_end_s, s.max_time),
        schedule=s.lr_schedule,
        warmdown_ratio=s.warmdown_ratio,
    )
    set_lr(optimizer, st.lr, s)
    optimizer.zero_grad(set_to_none=True)
    st.loss = accumulate(
        session.forward,
        session.objective,
        batches,
        session.device,
        session.precision,
        no_sync=session.no_sync,
    )
    # The full gradient's norm: DDP has averaged it, FSDP's DTensors reduce it.
    grad_norm = distributed.to_float(torch.nn.utils.clip_grad_norm_(session.params, s.grad_clip))
    if math.isfinite(st.loss) and math.isfinite(grad_norm):
        optimizer.step()
        st.bad_in_row = 0
        st.last_finite_loss = st.loss
        session.health.step(st.step, st.loss, grad_norm)
        return grad_norm
    st.skipped_steps += 1
    st.bad_in_row += 1
    log.warning(
        "step %d: loss %s, gradient norm %s: step skipped (%d in a row; max_bad_steps %d)",
        st.step + 1,
        st.loss,
        grad_norm,
        st.bad_in_row,
        s.max_bad_steps,
    )
    if st.bad_in_row >= s.max_bad_steps:
        raise StageFailed(_bad_steps_message(st, s, session.precision))
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def _parallelism(s: TrainSettings) -> tuple[Parallelism, int]:
    """The parallelism in force and the world the batch is spread over."""
    if not distributed.active():
        return "none", 1
    mode, world = s.parallelism(), distributed.world_size()
    if mode == "none":
        raise AlborError(
            f"distributed: none in a job of {world} processes would train {world} unrelated "
            "copies: set distributed: ddp (or fsdp), or launch one process"
        )
    return mode, world


def _note_changed_settings(
    st: TrainState,
    saved: dict[str, Any],
    s: TrainSettings,
    data: dict[str, Any],
    precision: Precision,
) -> None:
    """Record a resume under another schedule, data order or precision than the checkpoint's
    (precision: auto may choose otherwise on another machine). Not an error (a deliberate change
    of schedule is legitimate), but the run is then no longer the one the checkpoint belonged
    to, and the record says so."""
    then = {"world_size": 1, **saved.get("schedule", {}), **saved.get("data", {})}
    then.pop("next_step", None)
    then["precision"] = saved.get("precision", precision)  # older checkpoints: unrecorded
    now = {"world_size": 1, **s.schedule(), **data, "precision": precision}
    if then != now:
        changed = sorted(k for k in {*now, *then} if then.get(k) != now.get(k))
        st.resume_warnings.append(
            f"{', '.join(changed)} changed since the checkpoint: the run continues with the "
            "new settings, so it differs from an uninterrupted run"
        )
        log.warning(st.resume_warnings[-1])


def _wrap(
    model: GPT, s: TrainSettings, device: torch.device, mode: Parallelism
) -> tuple[nn.Module, Callable[[], contextlib.AbstractContextManager[Any]] | None]:
    """The model as this run calls it (activation checkpointing, compiled, in DDP), and the
    wrapper's way to skip a gradient reduction (None: there is none to skip)."""
    model.activation_checkpointing = s.activation_checkpointing
    forward = cast(nn.Module, torch.compile(model)) if s.compile else model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(forward, device_ids=ids)
        return ddp, ddp.no_sync
    if mode == "fsdp":
        return forward, distributed.fsdp_no_sync(model)
    return forward, None


@contextlib.contextmanager
def _metrics_file(run_dir: Path) -> Iterator[IO[str]]:
    """The metrics log, appended to; other ranks write their (identical) lines nowhere."""
    path = run_dir / METRICS_FILE if distributed.is_rank0() else Path(os.devnull)
    with open(path, "a", encoding="utf-8") as f:
        yield f


def _log_step(
    session: Session, out: IO[str], st: TrainState, grad_norm: float, rate: float
) -> None:
    record: dict[str, Any] = {
        "step": st.step,
        "loss": st.loss,  # unrounded: a resumed run must match it exactly
        "lr": st.lr,
        "grad_norm": grad_norm,
        "tokens": st.tokens,
        "tokens_per_s": round(rate, 1),
        "elapsed_s": round(st.elapsed_s, 2),
    }
    metrics.append(out, record)
    if session.tracker is not None:
        session.tracker.log(**record)


def _validate(
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


def _bar(
    label: str, s: TrainSettings, st: TrainState
) -> contextlib.AbstractContextManager[progress.Bar]:
    """The run's progress bar: in steps, or under max_time in seconds of the budget, so that its
    ETA is that of whichever limit ends the run (a step count out of reach would promise years)."""
    if s.max_time is None:
        return progress.bar(label, s.max_steps, completed=st.step)
    return progress.bar(label, s.max_time, unit="s", completed=_done(s, st))


def _done(s: TrainSettings, st: TrainState) -> float:
    """Work done in the bar's units: steps, or the budget's seconds that the larger of the step
    and time progress stands for."""
    if s.max_time is None:
        return st.step
    return min(s.max_time, max(st.train_s, st.step / s.max_steps * s.max_time))


def _show(bar: progress.Bar, s: TrainSettings, st: TrainState, rate: float) -> None:
    shown: dict[str, object] = {"step": st.step, "loss": f"{st.loss:.4f}", "tok/s": f"{rate:,.0f}"}
    if st.skipped_steps:
        shown["skipped"] = st.skipped_steps
    bar.update(completed=_done(s, st), fields=shown)


def _snapshot(session: Session, st: TrainState) -> dict[str, Any]:
    """The trainer state a checkpoint written now holds."""
    st.loss_reference = session.health.reference
    return st.to_json(session.settings, session.data, session.precision)


def _save(session: Session, st: TrainState) -> Path | None:
    """Write this step's checkpoint from rank 0 (FSDP: every rank gathers, rank 0 writes)."""
    found = checkpoint.gather(session.model, session.optimizer, fsdp=session.mode == "fsdp")
    if found is None:
        return None
    full, full_optimizer = found
    root = session.checkpoints
    directory = checkpoint.step_dir(root, st.step)
    path = session.checkpointer.save(directory, full, full_optimizer, _snapshot(session, st))
    checkpoint.prune(root, session.settings.keep_checkpoints)
    _record_best(root, st.best, session.settings.max_steps)  # mid-run: not yet the last step
    session.health.checkpoint(st.step, full)
    write_loss_plot(session.run_dir)
    return path


def _bad_steps_message(st: TrainState, s: TrainSettings, precision: Precision) -> str:
    """Why the run stopped, where, and what usually causes it."""
    last = "none yet" if math.isnan(st.last_finite_loss) else f"{st.last_finite_loss:.4f}"
    if precision == "fp32":
        overflow = "overflow in the activations (often the learning rate again)"
    else:
        overflow = f"overflow in {precision} (try precision: fp32)"
    return (
        f"training stopped at step {st.step + 1} of {s.max_steps}: {st.bad_in_row} steps in a "
        f"row had a non-finite loss or gradient (max_bad_steps {s.max_bad_steps}; last finite "
        f"loss {last}). Likely causes: a learning rate too high (lower lr, now {s.lr:g}), a "
        f"warmup too short (raise warmup_steps, now {s.warmup_steps}), bad data (check the "
        f"tokenize output), or {overflow}"
    )


@contextlib.contextmanager
def _no_bar() -> Iterator[progress.Bar]:
    """The progress bar of a rank other than 0: none."""
    yield progress.Bar(None)


def _best_location(best: dict[str, Any] | None, last_step: int) -> dict[str, Any] | None:
    """The best validation so far and where its weights are, relative to the run directory: a
    kept step directory, or the run's final weights ('.') when the last step's validation (at
    max_steps, or where max_time ran out) was best."""
    if best is None:
        return None
    step = int(best["step"])
    where = "." if step == last_step else f"checkpoints/step-{step:07d}"
    return {"step": step, "val_loss": float(best["val_loss"]), "path": where}


def _record_best(root: Path, best: dict[str, Any] | None, last_step: int) -> None:
    """Point `checkpoints/best.json` at the best weights (`last_step`: the run's final step)."""
    found = _best_location(best, last_step)
    if found is not None:
        checkpoint.write_best(root, found["step"], found["val_loss"], found["path"])
