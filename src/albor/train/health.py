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


class Health:
    """Watches per-step loss and gradient norm, and the weights between checkpoints."""

    def __init__(self, window: int = 50) -> None:
        self.window = window
        self.losses: deque[float] = deque(maxlen=window)
        self.zero_grad_steps = 0
        self.warnings: dict[str, str] = {}
        self._weights: float | None = None

    def _warn(self, key: str, message: str) -> None:
        if key not in self.warnings:
            self.warnings[key] = message
            log.warning(message)

    def step(self, step: int, loss: float, grad_norm: float) -> None:
        if loss == 0.0:
            self._warn(
                "zero_loss",
                f"step {step}: the loss is exactly 0, which a language model "
                "cannot reach honestly: check the loss and the targets",
            )
        if grad_norm == 0.0:
            self.zero_grad_steps += 1
            self._warn(
                "zero_gradients",
                f"step {step}: every gradient is zero: the parameters "
                "are not being trained (frozen, detached or masked out?)",
            )
        self.losses.append(loss)
        if len(self.losses) == self.window and max(self.losses) == min(self.losses):
            self._warn(
                "constant_loss",
                f"step {step}: the loss has been exactly {loss:.6f} for "
                f"{self.window} steps: the model is not learning (learning rate 0? data "
                "repeated? loss detached?)",
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
