"""What the training loop carries from step to step (`TrainState`) and returns (`LoopResult`).

A checkpoint's `trainer_state.json` is `TrainState.to_json`; a resumed run starts from
`TrainState.restore` of it, so every counter, the best validation and the time spent under a
`max_time` budget continue where the run stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from albor.train.settings import Precision, TrainSettings


def _number(value: Any) -> float:
    return float(value) if value is not None else float("nan")


def _optional_float(value: Any) -> float | None:
    return float(value) if value is not None else None


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

    def spent(self, settings: TrainSettings) -> bool:
        """Whether the time budget is used up (never, without one)."""
        return settings.max_time is not None and self.train_s >= settings.max_time


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
