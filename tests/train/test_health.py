from __future__ import annotations

import torch

from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.train.health import Health


def test_a_learning_run_raises_no_warning() -> None:
    h = Health(window=5)
    for step, loss in enumerate([5.0, 4.5, 4.4, 4.41, 4.2, 4.0, 3.9]):
        h.step(step, loss, grad_norm=1.0)
    assert h.warnings == {}


def test_silent_failures_are_named() -> None:
    h = Health(window=5)
    for step in range(6):
        h.step(step, 10.39, grad_norm=0.0)
    h.step(6, 0.0, grad_norm=0.5)
    assert set(h.warnings) == {"constant_loss", "zero_gradients", "zero_loss"}
    assert "10.390000 for 5 steps" in h.warnings["constant_loss"]


def test_weights_that_do_not_change_between_checkpoints() -> None:
    model = GPT(preset("tiny"))
    h = Health()
    h.checkpoint(10, model)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    h.checkpoint(20, model)
    assert h.warnings == {}
    h.checkpoint(30, model)
    assert "identical to the previous checkpoint" in h.warnings["frozen_weights"]
