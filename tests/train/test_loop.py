"""The loop's speed options (bf16, activation checkpointing, prefetch, compile) and its metrics."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from albor.data.windows import WindowSampler
from albor.errors import AlborError, ConfigError, StageFailed
from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.track import metrics
from albor.train.batches import Prefetcher
from albor.train.checkpoint import FullCheckpointer
from albor.train.loop import train
from albor.train.objectives import NextToken
from albor.train.optim import build, build_adamw
from albor.train.settings import TrainSettings
from albor.train.state import LoopResult

CPU = torch.device("cpu")


def cycle_sampler(seq_len: int = 32) -> WindowSampler:
    """Token windows from a repeated cycle of 64 distinct ids: each id predicts the next, so a
    tiny model's loss falls within a few dozen steps."""
    ids = np.random.default_rng(0).permutation(512)[:64]
    return WindowSampler([np.tile(ids, 200).astype(np.uint16)], seq_len, seed=0)


def settings(**kw: object) -> TrainSettings:
    base: dict[str, object] = dict(
        max_steps=40,
        warmup_steps=4,
        lr=1e-2,
        min_lr_ratio=0.1,
        micro_batch=4,
        grad_accum=1,
        grad_clip=1.0,
        eval_every=10**9,
        checkpoint_every=10**9,
        keep_checkpoints=1,
        log_every=1,
    )
    base.update(kw)
    return TrainSettings.model_validate(base)


@dataclass
class Spy:
    """Next-token loss that records the dtype the model computed its logits in."""

    dtypes: set[torch.dtype] = field(default_factory=set)

    def targets(self, batch: torch.Tensor) -> int:
        return NextToken().targets(batch)

    def loss_sum(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        self.dtypes.add(logits.dtype)
        return F.cross_entropy(
            logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
        )


def train_tiny(
    tmp_path: Path, s: TrainSettings, objective_for: Callable[[torch.optim.Optimizer], Any] | None
) -> tuple[GPT, torch.optim.Optimizer, list[dict[str, Any]], LoopResult]:
    """Train the tiny preset on the cycling sampler; the model, optimizer, metrics lines, result."""
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    opt = build_adamw(model, s.lr, 0.1, (0.9, 0.95), 1e-8, CPU)
    result = train(
        model,
        opt,
        cycle_sampler(),
        s,
        device=CPU,
        run_dir=tmp_path,
        checkpointer=FullCheckpointer(eos_token_id=0),
        objective=objective_for(opt) if objective_for else None,
    )
    return model, opt, metrics.read(tmp_path / "metrics.jsonl"), result


def run(tmp_path: Path, s: TrainSettings, spy: Spy | None = None) -> tuple[GPT, list[float]]:
    model, opt, lines, _ = train_tiny(tmp_path, s, (lambda _: spy) if spy else None)
    for state in opt.state.values():  # fp32 optimizer whatever the precision
        assert all(v.dtype == torch.float32 for v in state.values())
    return model, [r["loss"] for r in lines if "loss" in r]


def test_bf16_on_cpu_trains_with_fp32_master_weights(tmp_path: Path) -> None:
    spy = Spy()
    model, losses = run(tmp_path, settings(precision="bf16"), spy)
    assert spy.dtypes == {torch.bfloat16}  # autocast was on
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert len(losses) == 40 and losses[-1] < losses[0] - 2.0


def test_fp32_is_the_default(tmp_path: Path) -> None:
    assert settings().precision == "fp32"
    spy = Spy()
    run(tmp_path, settings(max_steps=2), spy)
    assert spy.dtypes == {torch.float32}


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    x = torch.randint(0, 512, (2, 33))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        model(x[:, :-1], targets=x[:, 1:]).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_prefetched_batches_are_the_batches_of_the_step() -> None:
    workers: set[str] = set()

    def make(step: int) -> list[torch.Tensor]:
        workers.add(threading.current_thread().name)
        return [torch.tensor([step, micro]) for micro in range(2)]

    with Prefetcher(make, end=10) as p:
        got = [p.get(s) for s in (0, 1, 2, 7, 8, 9)]  # 7: a jump, as after a resume
    assert [[b.tolist() for b in g] for g in got] == [[[s, 0], [s, 1]] for s in (0, 1, 2, 7, 8, 9)]
    assert any(name.startswith("albor-prefetch") for name in workers)

    def broken(step: int) -> list[torch.Tensor]:
        raise ValueError(f"no batch {step}")

    with Prefetcher(broken, end=10) as p, pytest.raises(ValueError, match="no batch 0"):
        p.get(0)


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_names(tmp_path: Path) -> None:
    _, losses = run(tmp_path, settings(compile=True, max_steps=20, checkpoint_every=10))
    assert losses[-1] < losses[0]
    from safetensors.torch import load_file

    names = load_file(tmp_path / "checkpoints" / "step-0000010" / "model.safetensors")
    assert not any("_orig_mod" in k for k in names)


def test_resuming_with_other_settings_is_recorded(tmp_path: Path) -> None:
    run(tmp_path, settings(max_steps=4, checkpoint_every=2))
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    s = settings(max_steps=6, lr=5e-3, checkpoint_every=2)
    opt = build_adamw(model, s.lr, 0.1, (0.9, 0.95), 1e-8, CPU)
    result = train(
        model,
        opt,
        cycle_sampler(),
        s,
        device=CPU,
        run_dir=tmp_path,
        checkpointer=FullCheckpointer(eos_token_id=0),
    )
    [warning] = result.resume_warnings
    assert warning.startswith("lr, max_steps changed since the checkpoint"), warning
    assert result.steps == 6
    state = json.loads(
        (tmp_path / "checkpoints" / "step-0000004" / "trainer_state.json").read_text()
    )
    assert state["resume_warnings"] == [warning]  # kept for the next resume


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda_trains_with_fused_adamw_and_resumes(tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    s = settings(precision="bf16", checkpoint_every=10)

    def once() -> tuple[int | None, list[float]]:
        torch.manual_seed(0)
        model = GPT(preset("tiny")).to(cuda)
        opt = build_adamw(model, s.lr, 0.1, (0.9, 0.95), 1e-8, cuda)
        assert opt.defaults["fused"]
        result = train(
            model,
            opt,
            cycle_sampler(),
            s,
            device=cuda,
            run_dir=tmp_path,
            checkpointer=FullCheckpointer(eos_token_id=0),
        )
        lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
        return result.resumed_from, [r["loss"] for r in lines if "loss" in r]

    resumed, losses = once()
    assert resumed is None and losses[-1] < losses[0] - 2.0
    resumed, again = once()  # the same run again: from its last checkpoint, to the same end
    assert resumed == 30 and len(again) == 40


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_bf16_on_cuda_trains_and_attention_runs_flash_kernels(tmp_path: Path) -> None:
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = GPT(preset("tiny")).to(cuda)
    batch = cycle_sampler().batch(0, 0, 4).to(cuda)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch[:, :-1], targets=batch[:, 1:])
        loss.backward()
        torch.cuda.synchronize()
    kernels = [e.key.lower() for e in prof.key_averages()]
    assert any("flash" in k for k in kernels), kernels  # SDPA took the flash path in training

    s = settings(precision="bf16", compile=True)
    opt = build_adamw(model, s.lr, 0.1, (0.9, 0.95), 1e-8, cuda)
    result = train(
        model,
        opt,
        cycle_sampler(),
        s,
        device=cuda,
        run_dir=tmp_path,
        checkpointer=FullCheckpointer(eos_token_id=0),
    )
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert result.steps == 40 and result.skipped_steps == 0
    assert losses[-1] < losses[0] - 2.0


# ----- non-finite steps and a loss that does not move -------------------------------------------

Snapshot = tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]


@dataclass
class Faulty:
    """Next-token loss that goes wrong at chosen steps (0-based; one micro-batch a step): a NaN
    loss whose gradient stays finite, or a finite loss whose gradient is infinite. As each step
    begins it snapshots the weights and the optimizer state."""

    optimizer: torch.optim.Optimizer
    nan_loss_at: set[int] = field(default_factory=set)
    inf_grad_at: set[int] = field(default_factory=set)
    snapshots: list[Snapshot] = field(default_factory=list)

    def targets(self, batch: torch.Tensor) -> int:
        return NextToken().targets(batch)

    def loss_sum(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        step = len(self.snapshots)
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state = {
            i: {k: v.clone() for k, v in s.items()}
            for i, s in self.optimizer.state_dict()["state"].items()
        }
        self.snapshots.append((weights, state))
        loss = NextToken().loss_sum(model, batch)
        if step in self.nan_loss_at:
            return loss + float("nan")
        if step in self.inf_grad_at:
            loss.register_hook(lambda g: g * float("inf"))
        return loss


def same(a: Snapshot, b: Snapshot) -> bool:
    (wa, sa), (wb, sb) = a, b
    if wa.keys() != wb.keys() or sa.keys() != sb.keys():
        return False
    tensors = [(wa[k], wb[k]) for k in wa]
    tensors += [(sa[i][k], sb[i][k]) for i in sa for k in sa[i]]
    return all(torch.equal(x, y) for x, y in tensors)


def faulty_run(
    tmp_path: Path, s: TrainSettings, **faults: set[int]
) -> tuple[Faulty, list[dict[str, float]], LoopResult]:
    made: list[Faulty] = []

    def objective_for(opt: torch.optim.Optimizer) -> Faulty:
        made.append(Faulty(opt, **faults))
        return made[0]

    _, _, lines, result = train_tiny(tmp_path, s, objective_for)
    return made[0], [r for r in lines if "loss" in r], result


def test_nonfinite_losses_are_skipped_counted_and_reset_by_a_finite_step(tmp_path: Path) -> None:
    # Four bad steps, never more than two in a row: max_bad_steps 3 lets the run finish.
    s = settings(max_steps=12, max_bad_steps=3, checkpoint_every=6)
    spy, lines, result = faulty_run(tmp_path, s, nan_loss_at={3, 4, 8, 9})
    assert result.steps == 12 and result.skipped_steps == 4
    assert not same(spy.snapshots[2], spy.snapshots[3])  # a good step moves weights and state
    assert same(spy.snapshots[3], spy.snapshots[4]) and same(spy.snapshots[4], spy.snapshots[5])
    assert same(spy.snapshots[8], spy.snapshots[10])
    bad = [r["step"] for r in lines if r["loss"] is None]  # JSON spells a NaN loss null
    assert bad == [4, 5, 9, 10]  # metrics count steps from 1
    assert all(math.isfinite(r["grad_norm"]) for r in lines)  # the loss alone was bad
    state = json.loads(
        (tmp_path / "checkpoints" / "step-0000006" / "trainer_state.json").read_text()
    )
    assert state["skipped_steps"] == 2 and state["bad_in_row"] == 0  # a resume keeps the count
    assert result.final_loss == lines[-1]["loss"]


def test_an_infinite_gradient_skips_the_step(tmp_path: Path) -> None:
    spy, lines, result = faulty_run(tmp_path, settings(max_steps=8), inf_grad_at={5})
    assert result.skipped_steps == 1
    assert same(spy.snapshots[5], spy.snapshots[6])
    assert not same(spy.snapshots[6], spy.snapshots[7])
    [bad] = [r for r in lines if r["grad_norm"] is None]
    assert bad["step"] == 6 and math.isfinite(bad["loss"])  # the gradient alone was bad


def test_max_bad_steps_in_a_row_stop_the_run_naming_step_loss_and_causes(tmp_path: Path) -> None:
    s = settings(max_steps=12, max_bad_steps=3)
    with pytest.raises(StageFailed) as e:
        faulty_run(tmp_path, s, nan_loss_at={5, 7}, inf_grad_at={6})
    lines = metrics.read(tmp_path / "metrics.jsonl")
    last_finite = lines[4]["loss"]  # step 5, the last before the three bad ones
    message = str(e.value)
    assert message.startswith("training stopped at step 8 of 12: 3 steps in a row had a non-finite")
    assert f"last finite loss {last_finite:.4f}" in message and "max_bad_steps 3" in message
    for cause in ("lower lr", "raise warmup_steps", "bad data", "overflow"):
        assert cause in message, message
    assert len(lines) == 7  # nothing was written after the failing step


def test_a_frozen_learning_rate_warns_that_the_loss_is_stuck(tmp_path: Path) -> None:
    # lr 0 is refused by the settings' validation; a run can still meet it (a schedule's floor).
    frozen = settings(max_steps=110, warmup_steps=4).model_copy(update={"lr": 0.0})
    _, lines, result = faulty_run(tmp_path, frozen)
    losses = [r["loss"] for r in lines]
    assert len(set(losses)) > 100  # not bit-identical: different batches, the same frozen model
    warning = result.warnings["constant_loss"]
    # The first 50 steps after warmup are the reference; the 50 after them did not fall.
    assert warning.startswith("step 104: the loss has not fallen"), warning
    assert "the model is not learning (learning rate 0" in warning
    assert result.state["loss_reference"] == pytest.approx(sum(losses[4:54]) / 50)


def test_a_learning_run_does_not_warn(tmp_path: Path) -> None:
    _, lines, result = faulty_run(tmp_path, settings(max_steps=110, checkpoint_every=55))
    assert lines[-1]["loss"] < lines[0]["loss"] - 2.0
    assert result.warnings == {} and result.skipped_steps == 0
    assert result.state["loss_reference"] > lines[-1]["loss"]


def test_resuming_in_another_precision_is_recorded(tmp_path: Path) -> None:
    run(tmp_path, settings(max_steps=4, checkpoint_every=2))  # fp32
    torch.manual_seed(0)
    model = GPT(preset("tiny"))
    s = settings(max_steps=6, checkpoint_every=2, precision="auto")
    opt = build_adamw(model, s.lr, 0.1, (0.9, 0.95), 1e-8, CPU)
    with pytest.raises(AlborError, match="precision: auto is resolved by the preflight"):
        train(
            model,
            opt,
            cycle_sampler(),
            s,
            device=CPU,
            run_dir=tmp_path,
            checkpointer=FullCheckpointer(eos_token_id=0),
        )
    result = train(
        model,
        opt,
        cycle_sampler(),
        s,
        device=CPU,
        run_dir=tmp_path,
        checkpointer=FullCheckpointer(eos_token_id=0),
        precision="bf16",  # what auto chose this time
    )
    [warning] = result.resume_warnings
    assert warning.startswith("max_steps, precision changed since the checkpoint"), warning
    assert result.state["precision"] == "bf16"


def test_resuming_with_another_optimizer_is_refused_and_keeps_the_checkpoint(
    tmp_path: Path,
) -> None:
    run(tmp_path, settings(max_steps=4, checkpoint_every=2))  # adamw
    s = settings(max_steps=4, checkpoint_every=2, optimizer="muon")
    model = GPT(preset("tiny"))
    with pytest.raises(ConfigError, match="trained with optimizer: adamw, but this run's config"):
        train(
            model,
            build(model, s, CPU),
            cycle_sampler(),
            s,
            device=CPU,
            run_dir=tmp_path,
            checkpointer=FullCheckpointer(eos_token_id=0),
        )
    assert (tmp_path / "checkpoints" / "step-0000002").is_dir()  # not taken for damaged


def test_the_progress_bar_of_a_time_budget_counts_the_budget_not_unreachable_steps() -> None:
    from albor.train.monitor import done
    from albor.train.state import TrainState

    assert done(settings(max_steps=40), TrainState(step=7, train_s=99.0)) == 7
    budget = settings(max_steps=10**9, max_time="10s")
    # Time runs out first: the bar stands at the seconds spent, so its ETA is the budget's.
    assert done(budget, TrainState(step=500, train_s=4.0)) == pytest.approx(4.0)
    # Steps run out first: the bar moves with the larger of the two progresses.
    few = settings(max_steps=100, max_time="10s")
    assert done(few, TrainState(step=50, train_s=2.0)) == pytest.approx(5.0)
    assert done(few, TrainState(step=100, train_s=12.0)) == pytest.approx(10.0)  # never past
