"""Signs that a run is learning nothing, raised as warnings instead of silently ignored.

The specification's log is full of runs that printed numbers while learning nothing: a loss of
exactly 0.0 (ALB-042, ALB-069), a flat loss with the learning rate stuck in warmup (ALB-060),
weights that never left their initial values (ALB-038). Each is cheap to notice.
"""

from __future__ import annotations

import logging
from collections import deque

import torch
from torch import nn

log = logging.getLogger(__name__)


# A model that learns anything at all soon scores well below where it started; one whose weights
# do not move (learning rate 0 or far too small, a detached loss, frozen parameters) scores
# every batch much as it did at first. So the mean loss over the latest STUCK_WINDOW steps is
# compared with the mean over the first STUCK_WINDOW steps after warmup: a fall of less than
# STUCK_TOLERANCE of it means the run is stuck. Comparing with the start, rather than looking for
# a flat window, cannot mistake a late plateau for a stuck run: the plateau lies far below the
# start. (A frozen tiny model's window means differ by about 0.02%; a learning run falls by
# tens of percent within its first hundred steps.)
STUCK_WINDOW = 50
STUCK_TOLERANCE = 0.01


class Health:
    """Watches per-step loss and gradient norm, and the weights between checkpoints.

    Steps before `warmup_steps` do not count toward the stuck-loss check: a long warmup's first
    learning rates are tiny by design. `reference` is the first window's mean, as a resumed run
    carries it over (`state()`); a run resumed past that window without one does not check.
    """

    def __init__(
        self,
        window: int = STUCK_WINDOW,
        tol: float = STUCK_TOLERANCE,
        *,
        warmup_steps: int = 0,
        reference: float | None = None,
    ) -> None:
        self.window = window
        self.tol = tol
        self.warmup_steps = warmup_steps
        self.reference = reference
        self.losses: deque[float] = deque(maxlen=window)
        self.zero_grad_steps = 0
        self.warnings: dict[str, str] = {}
        self._weights: float | None = None

    def state(self) -> dict[str, float | None]:
        """What a resumed run needs to go on checking: the first window's mean loss."""
        return {"loss_reference": self.reference}

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warnings:
            self.warnings[key] = message
            log.warning(message)

    def step(self, step: int, loss: float, grad_norm: float) -> None:
        """Record optimizer step `step` (0-based), whose loss and gradient norm are finite."""
        if loss == 0.0:
            self._warn(
                "zero_loss",
                f"step {step + 1}: the loss is exactly 0, which a language model "
                "cannot reach honestly: check the loss and the targets",
            )
        if grad_norm == 0.0:
            self.zero_grad_steps += 1
            self._warn(
                "zero_gradients",
                f"step {step + 1}: every gradient is zero: the parameters "
                "are not being trained (frozen, detached or masked out?)",
            )
        self.losses.append(loss)
        if len(self.losses) < self.window:
            return
        why = "the model is not learning (learning rate 0 or far too small? loss detached? "
        why += "parameters frozen?)"
        if max(self.losses) == min(self.losses):
            self._warn(
                "constant_loss",
                f"step {step + 1}: the loss has been exactly {loss:.6f} for {self.window} "
                f"steps: {why}",
            )
            return
        first = self.warmup_steps + self.window - 1  # the step that completes the first window
        mean = sum(self.losses) / self.window
        if step == first and self.reference is None:
            self.reference = mean
        if self.reference is None or step < first + self.window:
            return
        fall = (self.reference - mean) / abs(self.reference) if self.reference else 1.0
        if fall < self.tol:
            self._warn(
                "constant_loss",
                f"step {step + 1}: the loss has not fallen: {mean:.4f} on average over the last "
                f"{self.window} steps against {self.reference:.4f} over the first {self.window} "
                f"after warmup (a fall of {fall:.2%}, under {self.tol:.0%}): {why}",
            )

    def checkpoint(self, step: int, model: nn.Module) -> None:
        """Compare a checksum of the weights with the previous checkpoint's."""
        with torch.no_grad():
            total = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
        if self._weights is not None and total == self._weights:
            self._warn(
                "frozen_weights",
                f"step {step}: the weights are identical to the previous "
                "checkpoint's: the optimizer is not updating them",
            )
        self._weights = total
