"""How far a model variant (quantized, pruned, merged) is from the full model it came from, on
the same validation windows: its bits per byte, the mean per-token KL(full || variant) and the
top-1 agreement, measured in one pass (the variant's forward and the full model's side by side).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from albor.evals.perplexity import score_model


class _Comparison(nn.Module):
    """Returns the variant's logits and accumulates, from the same inputs, KL(full || variant)
    and top-1 agreement: the scoring pass and the comparison share one forward."""

    def __init__(self, full: nn.Module, variant: nn.Module) -> None:
        super().__init__()
        self.full, self.variant = full, variant
        self.kl, self.agree, self.tokens = 0.0, 0, 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        theirs: torch.Tensor = self.variant(inputs)
        ours = self.full(inputs) if self.full is not self.variant else theirs
        p = F.log_softmax(ours.float(), dim=-1)
        q = F.log_softmax(theirs.float(), dim=-1)
        self.kl += float((p.exp() * (p - q)).sum())
        self.agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        self.tokens += inputs.numel()
        return theirs


def fidelity(
    full: nn.Module, variant: nn.Module, windows: list[torch.Tensor], token_bytes: np.ndarray
) -> dict[str, Any]:
    """Val bits/byte of `variant`, and its mean per-token KL from `full` and top-1 agreement
    with it, in one pass over the windows."""
    compare = _Comparison(full, variant)
    bpb = score_model(compare, windows, token_bytes).bits_per_byte
    return {
        "val_bpb": round(bpb, 6),
        "kl_mean": round(compare.kl / max(compare.tokens, 1), 8),
        "top1_agreement": round(compare.agree / max(compare.tokens, 1), 6),
    }
