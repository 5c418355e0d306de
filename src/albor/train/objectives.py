"""What the training loop minimises: the seam where each training stage plugs in its loss.

An `Objective` turns a micro-batch into a sum of per-token losses and says how many tokens that
sum is over; the loop divides by the step's total, so every objective gets exact gradient
accumulation and the same handling of non-finite steps. `NextToken` is pretrain's (and
finetune's, with prompt tokens masked by `ignore_index`); a distillation loss (KL to a teacher's
distribution) is another implementation of the same two methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


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
        if self.ignore_index != -100:  # the model's loss ignores -100, as HF's does
            targets = targets.masked_fill(targets == self.ignore_index, -100)
        # The model computes the loss itself: under torch.compile the cross-entropy is compiled
        # with it, and the full-vocabulary logits never leave the compiled graph.
        loss: torch.Tensor = model(inputs, targets, reduction="sum")
        return loss
