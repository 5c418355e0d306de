from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.train.optim import lr_at, param_groups


@given(st.integers(1, 5000), st.integers(0, 500), st.floats(1e-5, 1e-1), st.floats(0.0, 1.0))
def test_schedule_shape(max_steps: int, warmup: int, lr: float, floor: float) -> None:
    warmup = min(warmup, max_steps - 1)
    rates = [
        lr_at(s, lr=lr, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=floor)
        for s in range(max_steps)
    ]
    assert all(0 < r <= lr * (1 + 1e-12) for r in rates)
    if warmup:
        assert rates[warmup - 1] == pytest.approx(lr)  # warmup ends at the peak
        assert all(a < b for a, b in pairwise(rates[:warmup]))
    decay = rates[warmup:]
    assert all(a >= b - 1e-15 for a, b in pairwise(decay))
    end = lr_at(max_steps, lr=lr, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=floor)
    assert end == pytest.approx(lr * floor)  # the schedule decays to its floor (ALB-079)


def test_weight_decay_only_on_matrices() -> None:
    model = GPT(preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])  # type: ignore[attr-defined]
    assert all(p.dim() == 1 for p in no_decay["params"])  # type: ignore[attr-defined]
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])  # type: ignore[attr-defined]
    assert n == model.num_params()
