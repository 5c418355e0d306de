"""The figures a training plan estimates: memory, checkpoints on disk, FLOPs and wall time.

Memory follows the optimizer the run configures (`Trained`): AdamW keeps a gradient and two
fp32 moments for every weight; Muon one momentum buffer for the block matrices it takes and
AdamW's two for the embeddings, norms and biases; a LoRA run gradients and states for its
adapters alone, the frozen base holding weights only. Wall time comes from the measured peak of
this CPU or a target GPU's datasheet, at an MFU that is measured where albor has measured one
and a stated assumption otherwise; under `max_time` the budget sizes the steps, and a budget
that cannot fit one step, or the warmup, is refused.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from albor.model.estimate import flops_per_token, format_bytes, format_count, memory_budget
from albor.plan import Plan
from albor.train import hardware
from albor.train.settings import TrainSettings

if TYPE_CHECKING:
    from albor.train.preflight import Extra, Setup

# Activation checkpointing runs each block's forward twice: 8 FLOPs per weight per token where
# training otherwise does 6.
RECOMPUTE_FACTOR = 8 / 6

# Fraction of the matmul peak a training step reaches on CPU, for the wall-time estimate only
# (benchmarks/train.py measured 65% for the demo preset on 2 cores; larger models do better).
ASSUMED_MFU = 0.6

# Config precision -> the memory model's name for it: bf16 autocast keeps fp32 master weights,
# gradients and optimizer states, with bf16 activations.
MEMORY_PRECISION = {"fp32": "fp32", "bf16": "bf16-mixed"}

# Checkpoints hold weights and optimizer states in fp32 whatever the precision.
CHECKPOINT_BYTES = 4


@dataclass(frozen=True)
class Trained:
    """The parameters a run holds, as the optimizer it configures keeps them: which have a
    gradient, and how many optimizer states each."""

    frozen: int  # weights alone (a LoRA run's base): no gradient, no optimizer state
    muon: int  # Muon's block matrices: one momentum buffer each
    adamw: int  # AdamW's: two moments each
    adapters: bool = False  # the AdamW parameters are LoRA adapters beside the frozen weights

    @property
    def total(self) -> int:
        return self.frozen + self.muon + self.adamw

    @property
    def trainable(self) -> int:
        return self.muon + self.adamw

    @property
    def states(self) -> int:
        """Optimizer state tensors' elements over every parameter."""
        return self.muon + 2 * self.adamw

    def describe(self) -> str:
        """What the memory and checkpoint estimates assume of the optimizer."""
        if self.adapters:
            return (
                f"LoRA: a gradient and AdamW's two fp32 moments for the {format_count(self.adamw)} "
                f"adapter parameters only; the {format_count(self.frozen)} frozen base "
                "parameters hold their weights alone"
            )
        if self.muon:
            return (
                f"Muon: one fp32 momentum buffer for the {format_count(self.muon)} parameters of "
                f"the block matrices; AdamW: two fp32 moments for the other "
                f"{format_count(self.adamw)}; a gradient for each"
            )
        return (
            f"AdamW: a gradient and two fp32 moments for each of the {format_count(self.adamw)} "
            "parameters"
        )


def trained(settings: TrainSettings, s: Setup, adapters: int = 0) -> Trained:
    """How the run's optimizer holds the model of `s`: `adapters` > 0 is a LoRA run of that many
    adapter parameters on the frozen model (AdamW); else `settings.optimizer` on every weight,
    Muon taking the matrices `optim.muon_split` gives it."""
    if adapters:
        return Trained(frozen=s.parameters, muon=0, adamw=adapters, adapters=True)
    if settings.optimizer != "muon":
        return Trained(frozen=0, muon=0, adamw=s.parameters)
    import torch

    from albor.model.gpt import GPT
    from albor.train.optim import muon_split

    with torch.device("meta"):  # shapes only: no memory, no random numbers
        model = GPT(s.model)
    matrices, other = muon_split(model)
    return Trained(
        frozen=0, muon=sum(p.numel() for p in matrices), adamw=sum(p.numel() for p in other)
    )


def memory(settings: TrainSettings, s: Setup, held: Trained, extra: Extra | None) -> dict[str, int]:
    """Bytes of device memory for one training step: weights (a LoRA run's base, then its
    adapters), gradients, optimizer states, activations, what runs beside the model, total."""
    budget = memory_budget(
        s.model,
        settings.micro_batch,
        s.seq_len,
        precision=MEMORY_PRECISION[s.precision],
        optimizer="none",
        activation_checkpointing=settings.activation_checkpointing,
    )
    width = budget["weights"] // s.parameters  # bytes of one weight, gradient or state
    found = {"weights": s.parameters * width}
    if held.adapters:
        found["adapters"] = held.adamw * width
    found["gradients"] = held.trainable * width
    found["optimizer"] = held.states * width
    found["activations"] = budget["activations"]
    if extra is not None and extra.memory:
        found[extra.what] = extra.memory
    found["total"] = sum(found.values())
    return found


def estimated_seconds(seconds: float) -> float:
    """An estimate in seconds to a tenth of a second, and to two significant figures below
    0.05 s: a tiny run's is small, not 0.0."""
    tenths = round(seconds, 1)
    return tenths if tenths or not seconds else float(f"{seconds:.2g}")


def format_duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} seconds" if seconds >= 10 else f"{seconds:.2g} seconds"


def checkpoints(p: Plan, settings: TrainSettings, held: Trained, steps: int) -> None:
    """Checkpoints written and kept over `steps`, and their size on disk: the weights a
    checkpoint holds (a LoRA run's: the adapters) and the optimizer's states."""
    weights = held.trainable if held.adapters else held.total
    ckpt_bytes = (weights + held.states) * CHECKPOINT_BYTES
    # Intermediate checkpoints every checkpoint_every steps before the last, one more at each
    # validation that improves between them (at most every eval step), and the final weights.
    every = settings.checkpoint_every
    intermediate = (steps - 1) // every
    on_improvement = 0
    if settings.eval_tokens > 0:
        evals = range(settings.eval_every, steps, settings.eval_every)
        on_improvement = sum(1 for e in evals if e % every)
    best = 1 if settings.eval_tokens > 0 else 0
    kept = min(intermediate + on_improvement, settings.keep_checkpoints + best) + 1
    p.estimates["checkpoints"] = {
        "written": intermediate + 1,
        "written_when_validation_improves": on_improvement,
        "kept": kept,
        "size_each": format_bytes(ckpt_bytes),
    }
    p.estimates["disk_bytes"] = kept * ckpt_bytes


def wall_time(p: Plan, settings: TrainSettings, s: Setup, extra_flops: float = 0.0) -> None:
    """Training FLOPs and the wall time they take on this CPU or on the target; under
    `max_time`, the steps the budget fits (`time_budget`)."""
    per_token = flops_per_token(s.model, s.seq_len) + extra_flops
    flops = per_token * s.tokens_per_step * settings.max_steps
    p.estimates["train_flops"] = float(flops)
    # Activation checkpointing runs each block's forward twice.
    work = flops * (RECOMPUTE_FACTOR if settings.activation_checkpointing else 1.0)
    at_peak: float | None = None  # the work at 100% of the peak: no step can be faster
    if s.target is not None:
        at_peak = _target_time(p, s.precision, s.world, s.target, work)
    elif s.device == "cpu":
        at_peak = _cpu_time(p, settings, s.precision, work)
    if settings.max_time is not None:
        time_budget(p, settings, p.estimates.get("wall_time_s"), at_peak)


def time_budget(
    p: Plan, settings: TrainSettings, wall: float | None, at_peak: float | None
) -> None:
    """Steps the time budget allows by the wall-time estimate. A budget that cannot fit one
    step, or the warmup (the run would end before the learning rate peaks), is refused; judged
    at the device's full peak, since the MFU is an assumption and a refusal must be certain."""
    budget = settings.max_time
    assert budget is not None
    p.estimates["max_time_s"] = budget
    shown = format_duration(budget)
    if wall is None or at_peak is None:
        p.add("time budget", "ok", f"max_time {shown} (no wall-time estimate for this device)")
        return
    step_s, fastest_s = wall / settings.max_steps, at_peak / settings.max_steps
    fit = math.floor(budget / step_s) if step_s > 0 else settings.max_steps
    p.estimates["steps_in_time_budget"] = min(fit, settings.max_steps)
    if budget < fastest_s:
        p.add(
            "time budget",
            "fail",
            f"max_time {budget:g} s is shorter than one step (at least {fastest_s:.3g} s at "
            "the device's peak): raise max_time, or lower micro_batch / grad_accum",
        )
    elif budget <= fastest_s * settings.warmup_steps:
        p.add(
            "time budget",
            "fail",
            f"max_time {shown} ends within the warmup ({settings.warmup_steps} steps take at "
            f"least {format_duration(fastest_s * settings.warmup_steps)} at the device's peak): "
            "raise max_time or lower warmup_steps",
        )
    elif fit < settings.max_steps:
        warmup = settings.warmup_steps / max(fit, 1)
        p.estimates["warmup_fraction"] = round(min(warmup, 1.0), 4)
        p.add(
            "time budget",
            "ok",
            f"max_time {shown}: about {fit:,} of max_steps {settings.max_steps:,} steps (warmup "
            f"{warmup:.0%} of them); the learning rate decays to its floor when the time is "
            "spent",
        )
        # The budget, not max_steps, is what the run will take.
        p.estimates["wall_time_s"] = round(budget, 1)
        p.estimates["wall_time"] = format_duration(budget)
        p.checks = [c for c in p.checks if c.name != "wall time"]
        p.add("wall time", "ok", f"about {shown}: the time budget ends the run")
    else:
        p.add(
            "time budget",
            "ok",
            f"max_time {shown} outlasts max_steps {settings.max_steps:,} (about "
            f"{format_duration(wall)}): the run ends at max_steps",
        )


def _cpu_time(p: Plan, settings: TrainSettings, precision: str, work: float) -> float:
    """Wall time from this CPU's matmul peak, measured now; returns the time at the peak."""
    threads = settings.threads or os.cpu_count() or 1
    peak = hardware.cpu_peak_flops(threads, precision)
    p.estimates["device_peak_gflops"] = round(peak / 1e9, 1)
    wall = work / (peak * ASSUMED_MFU)
    p.estimates["wall_time_s"] = estimated_seconds(wall)
    p.estimates["wall_time"] = format_duration(wall)
    p.warn_if(
        "wall time",
        wall > 7 * 86400,
        f"about {format_duration(wall)} on this CPU: run it on a GPU (device: cuda), or plan "
        "for one with target: h100 (or l4, rtx4090, ...)",
        f"about {format_duration(wall)} at {ASSUMED_MFU:.0%} of the measured peak",
    )
    return work / peak


def _target_time(
    p: Plan, precision: str, world: int, target: tuple[str, hardware.Accelerator], work: float
) -> float:
    """Wall time on `world` of the target GPU, from its datasheet peak and an MFU: albor's
    measured one for that device where there is one, else a stated assumption. Returns the
    time at the peak."""
    name, device = target
    peak = device.peak_flops(precision)
    mfu = device.mfu or hardware.ASSUMED_GPU_MFU
    basis = "measured" if device.mfu else "assumed"
    wall = work / (peak * world * mfu)
    p.estimates["target"] = f"{world} x {name}"
    p.estimates["device_peak_tflops"] = round(peak / 1e12, 1)
    p.estimates["mfu"] = {"value": mfu, "basis": basis}
    p.estimates["wall_time_s"] = estimated_seconds(wall)
    p.estimates["wall_time"] = format_duration(wall)
    p.add(
        "wall time",
        "ok",
        f"about {format_duration(wall)} on {world} x {name} at {mfu:.0%} MFU ({basis}) of "
        f"{peak / 1e12:g} TFLOP/s {precision} each",
    )
    return work / (peak * world)
