from __future__ import annotations

from itertools import pairwise
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from albor.errors import ConfigError
from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.train.optim import (
    MuonAdamW,
    build,
    build_adamw,
    lr_at,
    muon_problems,
    muon_split,
    param_groups,
    set_lr,
    time_progress,
)
from albor.train.settings import TrainSettings

CPU = torch.device("cpu")


@given(
    st.integers(1, 5000),
    st.integers(0, 500),
    st.floats(1e-5, 1e-1),
    st.floats(0.0, 1.0),
    st.sampled_from(["cosine", "wsd"]),
    st.floats(0.01, 1.0),
)
def test_schedule_shape(
    max_steps: int, warmup: int, lr: float, floor: float, schedule: str, warmdown: float
) -> None:
    warmup = min(warmup, max_steps - 1)
    shape: dict[str, Any] = dict(schedule=schedule, warmdown_ratio=warmdown)
    rates = [
        lr_at(s, lr=lr, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=floor, **shape)
        for s in range(max_steps)
    ]
    assert all(0 < r <= lr * (1 + 1e-12) for r in rates)
    if warmup:
        assert rates[warmup - 1] == pytest.approx(lr)  # warmup ends at the peak
        assert all(a < b for a, b in pairwise(rates[:warmup]))
    decay = rates[warmup:]
    assert all(a >= b - 1e-15 for a, b in pairwise(decay))
    end = lr_at(
        max_steps, lr=lr, warmup_steps=warmup, max_steps=max_steps, min_lr_ratio=floor, **shape
    )
    assert end == pytest.approx(lr * floor)  # the schedule decays to its floor (ALB-079)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_warmdown() -> None:
    kw: dict[str, Any] = dict(
        lr=1e-3, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, schedule="wsd"
    )
    rates = [lr_at(s, **kw, warmdown_ratio=0.2) for s in range(111)]
    assert rates[9:90] == [1e-3] * 81  # held from the warmup's end to 80% of the decay span
    steps = [rates[s] - rates[s + 1] for s in range(90, 110)]
    assert steps == pytest.approx([steps[0]] * 20)  # linear
    assert rates[110] == pytest.approx(1e-4)
    # Under a time budget the same shape runs over the time: half the budget, still the peak.
    assert lr_at(20, **kw, warmdown_ratio=0.2, time_progress=0.5) == 1e-3
    assert lr_at(20, **kw, warmdown_ratio=0.2, time_progress=0.9) == pytest.approx(5.5e-4)


def test_weight_decay_only_on_matrices() -> None:
    model = GPT(preset("tiny"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"])  # type: ignore[attr-defined]
    assert all(p.dim() == 1 for p in no_decay["params"])  # type: ignore[attr-defined]
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])  # type: ignore[attr-defined]
    assert n == model.num_params()


@given(st.integers(0, 2000), st.floats(0.0, 1.0))
def test_time_moves_the_decay_only_forward(step: int, progress: float) -> None:
    kw: dict[str, Any] = dict(lr=1e-3, warmup_steps=10, max_steps=1000, min_lr_ratio=0.1)
    by_steps = lr_at(step, **kw)
    assert lr_at(step, **kw, time_progress=0.0) == by_steps  # no budget: bit for bit as before
    with_time = lr_at(step, **kw, time_progress=progress)
    if step < 10:
        assert with_time == by_steps  # warmup stays in steps
    else:
        assert 1e-4 * (1 - 1e-12) <= with_time <= by_steps
    assert lr_at(10, **kw, time_progress=1.0) == pytest.approx(1e-4)  # budget spent: the floor


def test_time_progress_runs_from_the_end_of_warmup_to_the_budget() -> None:
    assert time_progress(5.0, None, 10.0) == 0.0  # warmup not over yet
    assert time_progress(5.0, 2.0, None) == 0.0  # no budget
    assert time_progress(2.0, 2.0, 10.0) == 0.0
    assert time_progress(6.0, 2.0, 10.0) == pytest.approx(0.5)
    assert time_progress(10.0, 2.0, 10.0) == pytest.approx(1.0)


def muon_settings(**kw: Any) -> TrainSettings:
    return TrainSettings.model_validate({"optimizer": "muon", "lr": 1e-3, "muon_lr": 0.02, **kw})


def test_muon_takes_the_block_matrices_and_adamw_the_rest() -> None:
    model = GPT(preset("tiny"))  # tied embeddings: one tensor for embedding and head
    matrices, other = muon_split(model)
    in_blocks = {id(p) for p in model.model.layers.parameters()}
    assert matrices and all(p.dim() == 2 and id(p) in in_blocks for p in matrices)
    assert any(p is model.model.embed_tokens.weight for p in other)
    assert all(p.dim() == 1 or id(p) not in in_blocks for p in other)
    ids = [id(p) for p in matrices + other]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert muon_problems(model) == []


def test_muon_and_adamw_step_together_follow_one_schedule_and_round_trip() -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    s = muon_settings()
    opt = build(model, s, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW) and isinstance(opt.muon, torch.optim.Muon)
    set_lr(opt, 5e-4, s)  # half the peak: Muon's groups get half of muon_lr
    assert {g["lr"] for g in opt.adamw.param_groups} == {5e-4}
    assert [g["lr"] for g in opt.muon.param_groups] == [pytest.approx(0.01)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 512, (2, 17))
    model(x[:, :-1], targets=x[:, 1:]).backward()
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) == len(before)  # both optimizers stepped
    assert len(opt.state) == len(before)  # each parameter's state, read through the one object

    other = build(GPT(preset("tiny")), s, torch.device("cpu"))
    other.load_state_dict(opt.state_dict())
    saved, restored = opt.state_dict(), other.state_dict()
    for part in ("muon", "adamw"):
        for i, state in saved[part]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, restored[part]["state"][i][k]), (part, i, k)
    set_lr(other, 1e-4, s)  # after a load the schedule still reaches the inner groups
    assert [g["lr"] for g in other.muon.param_groups] == [pytest.approx(0.002)]
    with pytest.raises(ValueError, match="muon, adamw"):
        other.load_state_dict(build_adamw(model, 1e-3, 0.1, (0.9, 0.95), 1e-8, CPU).state_dict())


class ConvBlocks(nn.Module):
    """A model whose blocks hold a matrix Muon cannot take (a 3-D convolution kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Conv1d(4, 4, 3), nn.Linear(4, 4)])


def test_muon_refuses_what_it_cannot_take_naming_the_key_and_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    [problem] = muon_problems(ConvBlocks())
    assert "model.layers.0.weight (4, 4, 3)" in problem and "use optimizer: adamw" in problem
    with pytest.raises(ConfigError, match="takes only 2-D matrices"):
        build(ConvBlocks(), muon_settings(), CPU)
    [problem] = muon_problems(GPT(preset("tiny")), "fsdp")
    assert "use distributed: ddp, or optimizer: adamw" in problem
    monkeypatch.delattr(torch.optim, "Muon")
    [problem] = muon_problems(GPT(preset("tiny")))
    assert problem.endswith("upgrade torch to >= 2.9 or use optimizer: adamw")
