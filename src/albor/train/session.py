"""One process's share of a training run: how the loop opens it and how it saves checkpoints.

`open_session` resumes from the newest usable checkpoint under `run_dir/checkpoints` (weights,
optimizer, RNG and the `TrainState`), notes a resume under other settings than the checkpoint's,
wraps the model as the run calls it (activation checkpointing, `torch.compile`, DDP or FSDP2)
and returns the `Session`: what stays fixed while the process trains. `save` writes a step's
checkpoint from rank 0 and keeps `checkpoints/best.json` pointing at the best validation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from albor.data.windows import WindowSampler
from albor.errors import AlborError
from albor.model.gpt import GPT
from albor.track import metrics
from albor.track.metrics import METRICS_FILE
from albor.track.plot import write_loss_plot
from albor.track.runs import RunTracker
from albor.train import checkpoint, distributed
from albor.train.batches import StepBatches
from albor.train.checkpoint import Checkpointer, Resume
from albor.train.health import Health
from albor.train.objectives import Objective
from albor.train.settings import Parallelism, Precision, TrainSettings
from albor.train.state import TrainState

log = logging.getLogger(__name__)

NoSync = Callable[[], contextlib.AbstractContextManager[Any]]
"""A DDP / FSDP wrapper's way to skip the gradient reduction of a micro-batch."""


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
    batches: StepBatches  # this rank's micro-batches of a step: a pure function of the step
    data: dict[str, Any]  # what the batches are a function of, besides the step
    tokens_per_step: int
    health: Health
    params: list[nn.Parameter]  # the trainable ones: the gradient clipped is theirs
    no_sync: NoSync | None = None
    tracker: RunTracker | None = None

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def open_session(
    model: GPT,
    optimizer: torch.optim.Optimizer,
    sampler: WindowSampler,
    settings: TrainSettings,
    *,
    device: torch.device,
    run_dir: Path,
    checkpointer: Checkpointer,
    objective: Objective,
    precision: Precision,
    tracker: RunTracker | None,
) -> tuple[Session, TrainState, Resume]:
    """Resume (or start) the run in `run_dir` on this rank: the session, the state it continues
    from, and where it resumed (a fresh run: no path)."""
    s = settings
    mode, world = _parallelism(s)
    root = run_dir / "checkpoints"
    resumed = checkpoint.resume_ranks(root, model, optimizer, device, fsdp=mode == "fsdp")
    st = TrainState.restore(resumed.state)
    st.resume_warnings += resumed.warnings
    batches = StepBatches(sampler, s, world, distributed.rank(), pin=device.type == "cuda")
    data = batches.describe()
    if resumed.state:
        _note_changed_settings(st, resumed.state, s, data, precision)
    forward, no_sync = _wrap(model, s, device, mode)
    session = Session(
        model=model,
        forward=forward,
        optimizer=optimizer,
        objective=objective,
        settings=s,
        precision=precision,
        device=device,
        mode=mode,
        world=world,
        run_dir=run_dir,
        checkpointer=checkpointer,
        batches=batches,
        data=data,
        tokens_per_step=s.tokens_per_step(sampler.seq_len, world),
        health=Health(warmup_steps=s.warmup_steps, reference=st.loss_reference),
        params=[p for p in model.parameters() if p.requires_grad],
        no_sync=no_sync,
        tracker=tracker,
    )
    # Lines after the resume point will be written again; a line cut by a kill is dropped.
    if distributed.is_rank0():
        metrics.truncate(run_dir / METRICS_FILE, st.step)
    if tracker is not None:
        tracker.truncate(st.step)
    if resumed.path is not None:
        log.info("resuming from %s (step %d)", resumed.path, st.step)
    return session, st, resumed


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
) -> tuple[nn.Module, NoSync | None]:
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


# --- saving --------------------------------------------------------------------------------------


def snapshot(session: Session, st: TrainState) -> dict[str, Any]:
    """The trainer state a checkpoint written now holds."""
    st.loss_reference = session.health.reference
    return st.to_json(session.settings, session.data, session.precision)


def save(session: Session, st: TrainState) -> Path | None:
    """Write this step's checkpoint from rank 0 (FSDP: every rank gathers, rank 0 writes)."""
    found = checkpoint.gather(session.model, session.optimizer, fsdp=session.mode == "fsdp")
    if found is None:
        return None
    full, full_optimizer = found
    root = session.checkpoints
    directory = checkpoint.step_dir(root, st.step)
    path = session.checkpointer.save(directory, full, full_optimizer, snapshot(session, st))
    checkpoint.prune(root, session.settings.keep_checkpoints)
    record_best(root, st.best, session.settings.max_steps)  # mid-run: not yet the last step
    session.health.checkpoint(st.step, full)
    write_loss_plot(session.run_dir)
    return path


def best_location(best: dict[str, Any] | None, last_step: int) -> dict[str, Any] | None:
    """The best validation so far and where its weights are, relative to the run directory: a
    kept step directory, or the run's final weights ('.') when the last step's validation (at
    max_steps, or where max_time ran out) was best."""
    if best is None:
        return None
    step = int(best["step"])
    where = "." if step == last_step else f"checkpoints/step-{step:07d}"
    return {"step": step, "val_loss": float(best["val_loss"]), "path": where}


def record_best(root: Path, best: dict[str, Any] | None, last_step: int) -> None:
    """Point `checkpoints/best.json` at the best weights (`last_step`: the run's final step)."""
    found = best_location(best, last_step)
    if found is not None:
        checkpoint.write_best(root, found["step"], found["val_loss"], found["path"])
