"""One optimizer step of the training loop: the schedule's learning rate, the step's micro-batches
forward and backward, gradient clipping, and the update or, for a non-finite loss or gradient,
the step skipped whole.

Each micro-batch is backpropagated as its sum of token losses divided by the number of tokens
the whole step scores, so the gradient is that of the mean over every token of the step however
the tokens fall into micro-batches. Clipping is always on (safety never hangs on an optional
setting). bf16 autocast keeps fp32 master weights, gradients and optimizer; it needs no loss
scaling, which bf16's fp32 range makes needless.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch import nn

from albor.errors import StageFailed
from albor.train import distributed
from albor.train.objectives import Objective
from albor.train.optim import lr_at, set_lr, time_progress
from albor.train.session import NoSync, Session
from albor.train.settings import Precision, TrainSettings
from albor.train.state import TrainState

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
    no_sync: NoSync | None = None,
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


def step_time(session: Session, seconds: float) -> float:
    """A step's wall time as the time budget counts it: under a budget in a job of several
    ranks, their mean, so that every rank sees the same time, hence the same learning rate and
    the same last step."""
    if session.settings.max_time is not None and session.world > 1:
        return distributed.all_reduce_sum(seconds, session.device) / session.world
    return seconds


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
