from __future__ import annotations

import pytest
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
    assert "exactly 10.390000 for 5 steps" in h.warnings["constant_loss"]


def test_a_loss_that_does_not_fall_below_its_start_is_stuck() -> None:
    h = Health(window=5, tol=0.01)
    losses = [6.2381, 6.2392, 6.2377, 6.2385, 6.2390, 6.2379, 6.2388, 6.2383, 6.2391, 6.2380]
    for step, loss in enumerate(losses):
        h.step(step, loss, grad_norm=0.3)
    warning = h.warnings["constant_loss"]
    assert warning.startswith("step 10: the loss has not fallen: 6.2384 on average over the last")
    assert "against 6.2385 over the first 5 after warmup (a fall of 0.00%, under 1%)" in warning
    assert h.state() == {"loss_reference": pytest.approx(6.2385)}


def test_a_noisy_plateau_and_a_long_warmup_are_not_stuck() -> None:
    learning = Health(window=5, tol=0.01)
    falling = [6.2, 5.1, 4.3, 3.5, 3.0]  # then a plateau with batch noise, far below the start
    for step, loss in enumerate(falling + [2.51, 2.48, 2.53, 2.50, 2.49] * 20):
        learning.step(step, loss, grad_norm=0.3)
    assert learning.warnings == {}
    warmup = Health(window=5, tol=0.01, warmup_steps=4)
    flat_warmup = [6.2383, 6.2384, 6.2382, 6.2383]  # tiny learning rates: hardly moves
    for step, loss in enumerate(flat_warmup + [6.2, 5.1, 4.3, 3.5, 3.0] + [2.5, 2.4] * 10):
        warmup.step(step, loss, grad_norm=0.3)
    assert warmup.warnings == {} and warmup.reference == pytest.approx(4.42)


def test_a_resumed_run_compares_with_the_reference_it_carried() -> None:
    h = Health(window=5, tol=0.01, reference=6.24)
    for step in range(200, 205):  # resumed long after the first window, still at the start
        h.step(step, 6.23 + (step % 2) * 0.02, grad_norm=0.3)
    assert "the loss has not fallen" in h.warnings["constant_loss"]
    fresh = Health(window=5, tol=0.01)  # resumed without one: nothing to compare with
    for step in range(200, 215):
        fresh.step(step, 6.23 + (step % 2) * 0.02, grad_norm=0.3)
    assert fresh.warnings == {} and fresh.reference is None


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
