"""The one training loop (pretrain; distill and finetune pass their objective and parameters).

Per optimizer step: the step's `grad_accum` micro-batches, a pure function of the step built in a
background thread while the previous step trains; each micro-batch is backpropagated as its sum
of token losses divided by the number of tokens the whole step scores, so the gradient is that of
the mean over every token of the step however the tokens fall into micro-batches; then gradient
clipping that is always on (the ALB-071 lesson: safety never hangs on an optional setting) and
AdamW with the warmup + cosine schedule. Options: bf16 autocast (fp32 master weights, gradients
and optimizer; no loss scaling, the ALB-072 lesson), `torch.compile`, activation checkpointing.

A non-finite loss or gradient skips the step (weights and optimizer untouched) and is counted;
`max_bad_steps` in a row (a finite step resets the count) stop the run with the step, the last
finite loss and the likely causes. `health.py` warns of runs that learn nothing. Metrics go to
`metrics.jsonl`; validation every `eval_every` steps. Checkpoints (`checkpoint.py`) every
`checkpoint_every` steps, when validation improves, and on SIGINT / SIGTERM. A run restarted with
the same directory resumes from the newest usable checkpoint, even after SIGKILL: batches are
step-indexed and the weights, optimizer, RNG states, counters and schedule position are all
restored, so it continues exactly as if never stopped.

Under torchrun (`distributed.py`) with DDP or FSDP2, each rank takes its slice of the batch one
process with `micro_batch x world` would draw, the loss is normalised by the step's token count
over all ranks, and the gradients are reduced only on the last micro-batch: the update is that
of the single process with the global batch. Rank 0 alone writes metrics and checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from albor import progress
from albor.artifact import atomic_write_text
from albor.data.windows import WindowSampler
from albor.errors import AlborError, StageFailed
from albor.model.gpt import GPT
from albor.track.plot import write_loss_plot
from albor.track.runs import RunTracker
from albor.train import checkpoint, distributed
from albor.train.health import Health
from albor.train.optim import lr_at

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]


class Objective(Protocol):
    """What the loop minimises: a sum of per-token losses, and how many tokens it is over."""

    def targets(self, batch: torch.Tensor) -> int:
        """Scored tokens in a micro-batch (counted on the CPU copy, before any transfer)."""
        ...

    def loss_sum(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Sum of the per-token losses of a micro-batch, an fp32 scalar."""
        ...


@dataclass(frozen=True)
class NextToken:
    """Next-token cross-entropy. A batch is `(B, T + 1)` windows (every position scored) or
    `(B, 2, T)` inputs and targets given apart, where targets equal to `ignore_index` are not."""

    ignore_index: int = -100

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.dim() == 3:
            return batch[:, 0], batch[:, 1]
        return batch[:, :-1], batch[:, 1:]

    def targets(self, batch: torch.Tensor) -> int:
        return int((self.split(batch)[1] != self.ignore_index).sum())

    def loss_sum(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        inputs, targets = self.split(batch)
        logits = model(inputs)
        loss: torch.Tensor = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        return loss


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


@dataclass
class LoopSettings:
    max_steps: int
    warmup_steps: int
    lr: float
    min_lr_ratio: float
    micro_batch: int
    grad_accum: int
    grad_clip: float
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int = 10
    max_bad_steps: int = 10
    precision: Precision = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    prefetch: bool = True
    distributed: Literal["none", "ddp", "fsdp"] = "none"

    def schedule(self) -> dict[str, Any]:
        """The LR schedule's settings; with the step, they fix the learning rate."""
        return {
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "max_steps": self.max_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }


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
    s: LoopSettings,
    *,
    device: torch.device,
    run_dir: Path,
    eos_token_id: int,
    extra_files: list[Path],
    evaluate: Callable[[], dict[str, Any]] | None = None,
    objective: Objective | None = None,
    tracker: RunTracker | None = None,
) -> LoopResult:
    """Train `model` to `s.max_steps`, resuming from `run_dir/checkpoints` if a run was there."""
    objective = objective or NextToken()
    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    world, rank0 = distributed.world_size(), distributed.is_rank0()
    mode = s.distributed if distributed.active() else "none"
    if mode == "none" and distributed.active():
        raise AlborError(
            f"distributed: none in a job of {world} processes would train {world} unrelated "
            "copies: set distributed: ddp (or fsdp), or launch one process"
        )
    world = world if mode != "none" else 1
    resumed = _resume(ckpt_root, model, optimizer, device, fsdp=mode == "fsdp")
    st = resumed.state
    step, tokens = int(st.get("step", 0)), int(st.get("tokens", 0))
    evals: list[dict[str, Any]] = list(st.get("evals", []))
    skipped, bad_in_row = int(st.get("skipped_steps", 0)), int(st.get("bad_in_row", 0))
    last = st.get("last_finite_loss")
    last_finite = float(last) if last is not None else float("nan")
    best: dict[str, Any] | None = st.get("best")
    elapsed_before = float(st.get("elapsed_s", 0.0))
    resume_warnings = [*st.get("resume_warnings", []), *resumed.warnings]
    data = {
        "seed": sampler.seed,
        "seq_len": sampler.seq_len,
        "micro_batch": s.micro_batch,
        "grad_accum": s.grad_accum,
    }
    if world > 1:  # absent for one process, so single-process checkpoints read as before
        data["world_size"] = world
    if st:
        then = {"world_size": 1, **st.get("schedule", {}), **st.get("data", {})}
        then.pop("next_step", None)
        now = {"world_size": 1, **s.schedule(), **data}
        if then != now:
            # Not an error (a deliberate change of schedule is legitimate), but the run is then
            # no longer the one the checkpoint belonged to, and the record says so.
            changed = sorted(k for k in now if then.get(k) != now[k])
            resume_warnings.append(
                f"{', '.join(changed)} changed since the checkpoint: the run continues with the "
                "new settings, so it differs from an uninterrupted run"
            )
            log.warning(resume_warnings[-1])
    # Lines after the resume point will be written again; a line cut by a kill is dropped.
    if rank0:
        _truncate_metrics(metrics_path, step)
    if tracker is not None:
        tracker.truncate(step)
    tokens_per_step = s.micro_batch * s.grad_accum * sampler.seq_len * world
    if resumed.path is not None:
        log.info("resuming from %s (step %d)", resumed.path, step)

    model.activation_checkpointing = s.activation_checkpointing
    forward_model = cast(nn.Module, torch.compile(model)) if s.compile else model
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(forward_model, device_ids=ids)
        forward_model, no_sync = ddp, ddp.no_sync
    elif mode == "fsdp":
        no_sync = distributed.fsdp_no_sync(model)
    params = [p for p in model.parameters() if p.requires_grad]
    pin = device.type == "cuda"
    me = distributed.rank()

    def make(at: int) -> list[torch.Tensor]:
        if world == 1:
            out = [sampler.batch(at, micro, s.micro_batch) for micro in range(s.grad_accum)]
        else:
            # This rank's slice of the batch one process with micro_batch x world would draw.
            lo, hi = me * s.micro_batch, (me + 1) * s.micro_batch
            out = [
                sampler.batch(at, micro, s.micro_batch * world)[lo:hi]
                for micro in range(s.grad_accum)
            ]
        return [b.pin_memory() for b in out] if pin else out

    def save(directory: Path, val_loss: float | None) -> Path | None:
        """Write a checkpoint from rank 0 (FSDP: every rank gathers, rank 0 writes)."""
        found = gather_for_save(model, optimizer, fsdp=mode == "fsdp")
        if found is None:
            return None
        full, full_optimizer = found
        path = checkpoint.save(
            directory,
            full,
            full_optimizer,
            trainer_state(val_loss),
            eos_token_id=eos_token_id,
            extra_files=extra_files,
        )
        checkpoint.prune(ckpt_root, s.keep_checkpoints)
        _record_best(ckpt_root, best, s.max_steps)
        health.checkpoint(step, full)
        write_loss_plot(run_dir)
        return path

    def trainer_state(val_loss: float | None) -> dict[str, Any]:
        return {
            "step": step,
            "tokens": tokens,
            "loss": None if math.isnan(loss_value) else loss_value,  # JSON has no NaN
            "last_finite_loss": None if math.isnan(last_finite) else last_finite,
            "val_loss": val_loss,
            "best": best,
            "lr": lr,
            "schedule": s.schedule(),
            "data": {**data, "next_step": step},  # batches are a function of these and the step
            "precision": s.precision,
            "skipped_steps": skipped,
            "bad_in_row": bad_in_row,
            "elapsed_s": round(elapsed, 3),
            "evals": evals,
            "resume_warnings": resume_warnings,
            **health.state(),
        }

    model.train()
    t0 = time.perf_counter()
    start_step = step
    reference = st.get("loss_reference")
    health = Health(
        warmup_steps=s.warmup_steps, reference=float(reference) if reference is not None else None
    )
    loss_value, lr, elapsed, val_loss = float("nan"), 0.0, elapsed_before, None
    # Only rank 0 writes; the others write their (identical) lines nowhere.
    metrics = open(metrics_path if rank0 else os.devnull, "a", encoding="utf-8")  # noqa: SIM115
    try:
        if resumed.path is not None or resumed.warnings:
            # No numeric fields besides the step: plots read every number as a curve.
            name = resumed.path.name if resumed.path is not None else None
            _write(
                metrics,
                {"step": step, "event": "resume", "checkpoint": name, "warnings": resumed.warnings},
            )
        with (
            _StopSignals() as stop,
            Prefetcher(make, s.max_steps, enabled=s.prefetch) as prefetch,
            progress.bar("pretrain", s.max_steps, completed=step) if rank0 else _no_bar() as bar,
        ):
            while step < s.max_steps:
                lr = lr_at(
                    step,
                    lr=s.lr,
                    warmup_steps=s.warmup_steps,
                    max_steps=s.max_steps,
                    min_lr_ratio=s.min_lr_ratio,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batches = prefetch.get(step)
                optimizer.zero_grad(set_to_none=True)
                loss_value = accumulate(
                    forward_model, objective, batches, device, s.precision, no_sync=no_sync
                )
                # The full gradient's norm: DDP has averaged it, FSDP's DTensors reduce it.
                grad_norm = distributed.to_float(
                    torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                )
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    # The update is dropped whole: weights and optimizer state stay as they were.
                    skipped += 1
                    bad_in_row += 1
                    log.warning(
                        "step %d: loss %s, gradient norm %s: step skipped (%d in a row; "
                        "max_bad_steps %d)",
                        step + 1,
                        loss_value,
                        grad_norm,
                        bad_in_row,
                        s.max_bad_steps,
                    )
                    if bad_in_row >= s.max_bad_steps:
                        raise StageFailed(_bad_steps_message(step, bad_in_row, last_finite, s))
                    optimizer.zero_grad(set_to_none=True)
                else:
                    optimizer.step()
                    bad_in_row = 0
                    last_finite = loss_value
                    health.step(step, loss_value, grad_norm)
                step += 1
                tokens += tokens_per_step
                elapsed = elapsed_before + time.perf_counter() - t0
                session = max(elapsed - elapsed_before, 1e-9)
                rate = (step - start_step) * tokens_per_step / session
                if step % s.log_every == 0 or step == s.max_steps:
                    record: dict[str, Any] = {
                        "step": step,
                        "loss": loss_value,  # unrounded: a resumed run must match it exactly
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": tokens,
                        "tokens_per_s": round(rate, 1),
                        "elapsed_s": round(elapsed, 2),
                    }
                    _write(metrics, record)
                    if tracker is not None:
                        tracker.log(**record)
                val_loss = None
                if evaluate is not None and (step % s.eval_every == 0 or step == s.max_steps):
                    # FSDP's forward needs every rank; under DDP rank 0 validates alone.
                    result = {"step": step, **evaluate()} if rank0 or mode == "fsdp" else {}
                    if mode == "ddp":
                        result = distributed.broadcast(result)
                    evals.append(result)
                    _write(metrics, result)
                    if tracker is not None:
                        tracker.log(**result)
                    if isinstance(result.get("val_loss"), int | float):
                        val_loss = float(result["val_loss"])
                        if best is None or val_loss < best["val_loss"]:
                            best = {"step": step, "val_loss": val_loss}
                shown: dict[str, object] = {"step": step, "loss": f"{loss_value:.4f}"}
                shown["tok/s"] = f"{rate:,.0f}"
                if skipped:
                    shown["skipped"] = skipped
                bar.update(completed=step, fields=shown)
                # Every rank must stop at the same step, whichever the signal reached first.
                stopping = distributed.any_rank(stop.signal is not None, device)
                stopping = stopping and step < s.max_steps
                improved = best is not None and best["step"] == step
                due = step % s.checkpoint_every == 0 or stopping or improved
                if due and step < s.max_steps:
                    path = save(checkpoint.step_dir(ckpt_root, step), val_loss)
                    distributed.barrier()  # no rank runs ahead of a checkpoint being written
                    if stopping:
                        name = signal.Signals(stop.signal or signal.SIGTERM).name
                        raise TrainingStopped(
                            f"stopped by {name} at step {step} of {s.max_steps}: checkpoint "
                            f"saved to {path or checkpoint.step_dir(ckpt_root, step)}; run the "
                            "same command again to resume from it"
                        )
        if rank0:
            _record_best(ckpt_root, best, s.max_steps)
    finally:
        metrics.close()
    wall = time.perf_counter() - t0
    done = step - start_step
    return LoopResult(
        steps=step,
        tokens=tokens,
        final_loss=last_finite,
        wall_time_s=wall,
        tokens_per_s=done * tokens_per_step / max(wall, 1e-9),
        skipped_steps=skipped,
        resumed_from=checkpoint.step_of(resumed.path) if resumed.path is not None else None,
        evals=evals,
        warnings=health.warnings,
        resume_warnings=resume_warnings,
        best=_best_location(best, s.max_steps),
        state=trainer_state(val_loss),
    )


def _bad_steps_message(step: int, in_row: int, last_finite: float, s: LoopSettings) -> str:
    """Why the run stopped, where, and what usually causes it."""
    last = "none yet" if math.isnan(last_finite) else f"{last_finite:.4f}"
    if s.precision == "fp32":
        overflow = "overflow in the activations (often the learning rate again)"
    else:
        overflow = f"overflow in {s.precision} (try precision: fp32)"
    return (
        f"training stopped at step {step + 1} of {s.max_steps}: {in_row} steps in a row had a "
        f"non-finite loss or gradient (max_bad_steps {s.max_bad_steps}; last finite loss "
        f"{last}). Likely causes: a learning rate too high (lower lr, now {s.lr:g}), a warmup "
        f"too short (raise warmup_steps, now {s.warmup_steps}), bad data (check the tokenize "
        f"output), or {overflow}"
    )


@contextlib.contextmanager
def _no_bar() -> Iterator[progress.Bar]:
    """The progress bar of a rank other than 0: none."""
    yield progress.Bar(None)


class _FullOptimizerState:
    """Stands in for the optimizer when a checkpoint is written from a gathered state."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def gather_for_save(
    model: GPT, optimizer: torch.optim.Optimizer, *, fsdp: bool
) -> tuple[GPT, torch.optim.Optimizer] | None:
    """What rank 0 writes as a checkpoint: the model and optimizer (None on other ranks).

    Under FSDP every rank must call it: the shards are gathered into full tensors on rank 0's
    CPU, in a plain `GPT` there, with the optimizer state keyed by parameter name (what
    `torch.distributed.checkpoint.state_dict` reads back on resume).
    """
    if not fsdp:
        return (model, optimizer) if distributed.is_rank0() else None
    weights, optim = distributed.full_state(model, optimizer)
    if not distributed.is_rank0():
        return None
    full = GPT(model.cfg)  # on rank 0's CPU, where memory is plentiful
    full.load_state_dict(weights)
    return full, cast(torch.optim.Optimizer, _FullOptimizerState(optim))


def _resume(
    root: Path, model: GPT, optimizer: torch.optim.Optimizer, device: torch.device, *, fsdp: bool
) -> checkpoint.Resume:
    """`checkpoint.resume` on every rank from the same checkpoint: rank 0 picks it (removing
    unusable ones, the only writing), the others then read it."""
    if not distributed.active():
        return checkpoint.resume(root, model, optimizer, device)
    found = checkpoint.Resume(None, {}, [])
    if distributed.is_rank0():
        if fsdp:
            probe = GPT(model.cfg)  # a CPU stand-in: the choice is made by reading the files
            found = checkpoint.resume(
                root, probe, cast(torch.optim.Optimizer, _Ignore()), torch.device("cpu")
            )
        else:
            found = checkpoint.resume(root, model, optimizer, device)
    path, warnings = distributed.broadcast((found.path, found.warnings))
    if path is None:
        return checkpoint.Resume(None, {}, warnings)
    if fsdp:
        loaded = checkpoint.load(path, model, torch.device("cpu"))
        distributed.load_full_state(model, optimizer, loaded.weights, loaded.optimizer)
        checkpoint.set_rng_state(loaded.rng)
    elif not distributed.is_rank0():
        loaded = checkpoint.load(path, model, device)
        checkpoint.apply(loaded, model, optimizer)
    else:
        return found
    return checkpoint.Resume(path, loaded.state, warnings)


class _Ignore:
    """An optimizer whose state is loaded elsewhere (FSDP resume picks the checkpoint on a
    stand-in model, then loads it into the shards)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


def _best_location(best: dict[str, Any] | None, max_steps: int) -> dict[str, Any] | None:
    """The best validation so far and where its weights are, relative to the run directory: a
    kept step directory, or the run's final weights ('.') when the last validation was best."""
    if best is None:
        return None
    step = int(best["step"])
    where = "." if step == max_steps else f"checkpoints/step-{step:07d}"
    return {"step": step, "val_loss": float(best["val_loss"]), "path": where}


def _record_best(root: Path, best: dict[str, Any] | None, max_steps: int) -> None:
    """Point `checkpoints/best.json` at the best weights."""
    found = _best_location(best, max_steps)
    if found is not None:
        checkpoint.write_best(root, found["step"], found["val_loss"], found["path"])


def _write(f: Any, record: dict[str, Any]) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the step we resume from (they are about to be written
    again) and any line a kill cut short; atomically, so a second kill cannot lose the log."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))
