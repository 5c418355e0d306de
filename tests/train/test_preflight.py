"""Planning for the machine one will rent: a `target` GPU's datasheet judges memory and sizes the
wall time, `nproc` x `nodes` size the global batch, and apply refuses another world."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from albor.errors import ConfigError
from albor.model.estimate import format_bytes, format_count, memory_budget
from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.plan import Plan
from albor.stages import pretrain
from albor.train import estimates, hardware, lora, preflight
from albor.train.lora import LoraSpec
from albor.train.settings import TrainSettings, model_config
from helpers import pretrain_config

RUN_350M: dict[str, Any] = dict(
    model="350m",
    seq_len=1024,
    micro_batch=4,
    grad_accum=128,
    max_steps=5000,
    warmup_steps=500,
    precision="bf16",
)


def plan(**kw: Any) -> tuple[dict[str, str], dict[str, Any]]:
    p = pretrain.plan(pretrain.Config.model_validate({**RUN_350M, **kw}))
    return {c.name: f"{c.status}: {c.detail}" for c in p.checks}, p.estimates


def test_a_named_target_judges_memory_and_time_by_its_datasheet() -> None:
    checks, e = plan(target="rtx4090")
    total = e["memory"]["total"]
    assert checks["memory"] == f"ok: {total} of 24.00 GiB (one rtx4090, datasheet)"
    wall = e["train_flops"] / (165.2e12 * hardware.ASSUMED_GPU_MFU)  # bf16 peak, one device
    assert e["wall_time_s"] == round(wall, 1)
    assert e["mfu"] == {"value": hardware.ASSUMED_GPU_MFU, "basis": "assumed"}
    assert checks["wall time"].startswith("ok: about 1.4 days on 1 x rtx4090 at 35% MFU")
    assert "device_peak_gflops" not in e  # this CPU was not measured: it is not the target


def test_fp32_is_planned_at_the_fp32_peak() -> None:
    _, bf16 = plan(target="a100-80gb")
    _, fp32 = plan(target="a100-80gb", precision="fp32")
    assert fp32["device_peak_tflops"] == 19.5 and bf16["device_peak_tflops"] == 312
    assert fp32["train_flops"] == bf16["train_flops"]


def test_a_model_too_large_for_the_target_is_refused_with_the_fix() -> None:
    checks, _ = plan(target="l4", micro_batch=64)
    assert checks["memory"].startswith("fail: needs")
    assert "a l4 has 24.00 GiB" in checks["memory"]
    assert "lower micro_batch" in checks["memory"] and "larger target" in checks["memory"]


def test_an_explicit_device_is_a_peak_memory_and_mfu() -> None:
    target = {"peak_tflops": 100, "memory_gib": 16, "mfu": 0.5}
    checks, e = plan(target=target)
    assert f"of {format_bytes(16 * 2**30)}" in checks["memory"]
    assert e["wall_time_s"] == round(e["train_flops"] / (100e12 * 0.5), 1)
    assert e["mfu"] == {"value": 0.5, "basis": "measured"}


def test_an_unknown_target_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown target 'b300': use one of h200, h100"):
        pretrain.Config(target="b300")


def test_nproc_and_nodes_size_the_global_batch_and_the_time() -> None:
    checks, one = plan(target="h100")
    checks, many = plan(target="h100", nproc=4, nodes=2)
    assert many["tokens_per_step"] == 8 * one["tokens_per_step"]
    assert many["target"] == "8 x h100" and many["distributed"] == "ddp"
    assert checks["distributed"] == "ok: ddp over 8 processes (nccl, as planned)"
    # Eight times the tokens on eight times the devices: the same time.
    assert many["wall_time_s"] == pytest.approx(one["wall_time_s"], rel=1e-6)


def test_apply_refuses_a_world_other_than_the_planned_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = pretrain.Config(model="tiny", nproc=2)
    with pytest.raises(ConfigError, match="torchrun --nnodes 1 --nproc-per-node 2"):
        preflight.require_launch(cfg)  # one process
    monkeypatch.setenv("WORLD_SIZE", "2")
    preflight.require_launch(cfg)
    checks, _ = plan(nproc=4)
    assert checks["distributed"].startswith("fail: nproc x nodes plans 4 processes but torchrun")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_gpu_that_is_not_here_fails_the_plan_unless_planning_for_a_target() -> None:
    checks, _ = plan(device="cuda")
    assert checks["device"].startswith("fail: device: cuda asked for, but torch sees no CUDA")
    checks, _ = plan(device="cuda", target="h100")
    assert "device" not in checks and checks["memory"].startswith("ok")
    with pytest.raises(ConfigError, match="set device to cpu or auto"):
        cfg = pretrain.Config(model="tiny", device="cuda", target="h100")
        preflight.setup(cfg, cfg)  # what apply resolves: training needs the device here


# ----- precision: auto, max_time and the optimizer at plan time -----------------------------------


def checks_of(p: Plan) -> dict[str, str]:
    return {c.name: f"{c.status}: {c.detail}" for c in p.checks}


@pytest.mark.parametrize(("bf16_gflops", "chosen"), [(300.0, "bf16"), (105.0, "fp32")])
def test_auto_precision_on_a_cpu_follows_the_measured_matmul(
    token_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bf16_gflops: float,
    chosen: str,
) -> None:
    shapes: list[tuple[int, int, int]] = []

    def measured(shape: tuple[int, int, int], precision: str, threads: int, *_: float) -> float:
        shapes.append(shape)
        return (bf16_gflops if precision == "bf16" else 100.0) * 1e9

    monkeypatch.setattr(hardware, "matmul_flops", measured)
    cfg = pretrain_config(token_data, tmp_path / "o", precision="auto", device="cpu")
    p = pretrain.plan(cfg)
    mc = model_config(cfg)
    # The model's width: a micro-batch's tokens (4 x 64) x hidden x intermediate.
    assert shapes[:2] == [(4 * 64, mc.hidden_size, mc.intermediate_size)] * 2
    detail = checks_of(p)["precision"]
    assert detail.startswith(f"ok: {chosen} (auto: bf16 matmul {bf16_gflops:g} GFLOP/s vs fp32 100")
    assert p.estimates["precision"]["matmul_gflops"] == {"fp32": 100.0, "bf16": bf16_gflops}
    assert f"in {chosen} with adamw" in p.actions[0]
    setup = preflight.setup(cfg, cfg)  # what apply trains with: the same function, same choice
    assert setup.precision == chosen and setup.precision_reason in detail


def test_auto_precision_for_a_target_gpu_reads_its_datasheet() -> None:
    checks, e = plan(target="a100-80gb", precision="auto")
    assert checks["precision"] == (
        "ok: bf16 (auto: a100-80gb runs bf16 at 312 TFLOP/s vs fp32 19.5 (datasheet))"
    )
    assert e["device_peak_tflops"] == 312  # the wall time is planned in what auto chose


def test_a_precision_set_in_the_config_is_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "matmul_flops", lambda *a: pytest.fail("measured"))
    cfg = pretrain.Config(model="tiny", device="cpu")
    assert preflight.setup(cfg, cfg).precision_reason == "precision: fp32 set in the config"


def test_max_time_sizes_the_steps_and_is_refused_when_no_step_fits(
    token_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fixed peak: on a shared machine two measurements of it differ by more than 2x.
    monkeypatch.setattr(hardware, "cpu_peak_flops", lambda threads, precision: 20e9)

    def planned(**kw: Any) -> tuple[dict[str, str], dict[str, Any]]:
        p = pretrain.plan(pretrain_config(token_data, tmp_path / "o", device="cpu", **kw))
        return checks_of(p), p.estimates

    checks, e = planned(max_steps=10**5)
    assert "time budget" not in checks and "steps_in_time_budget" not in e
    step_s = e["wall_time_s"] / 10**5  # the estimate is rounded to 0.1 s: take a long run's
    # A budget of about 1000 steps in a run of a million: the budget ends it.
    checks, e = planned(max_steps=10**6, warmup_steps=3, max_time=step_s * 1000)
    assert checks["time budget"].startswith("ok: max_time ")
    assert "of max_steps 1,000,000 steps (warmup 0% of them)" in checks["time budget"]
    assert e["max_time_s"] == step_s * 1000 and abs(e["steps_in_time_budget"] - 1000) <= 1
    # What the run will take is the budget, and the checkpoints are those of the steps in it.
    assert e["wall_time_s"] == round(step_s * 1000, 1) and "time budget" in checks["wall time"]
    assert e["warmup_fraction"] == pytest.approx(3 / 1000, abs=1e-5)
    assert e["checkpoints"]["written"] <= 1000 // 10 + 1
    checks, e = planned(max_steps=30, max_time="1h")
    assert "outlasts max_steps 30" in checks["time budget"]
    assert e["steps_in_time_budget"] == 30
    checks, _ = planned(max_time=1e-12)
    assert checks["time budget"].startswith("fail: max_time 1e-12 s is shorter than one step")
    assert "raise max_time" in checks["time budget"]
    # Refusals are judged at the device's peak, where a step takes the assumed MFU's share of
    # the estimate: two such steps are longer than one step, shorter than the warmup's three.
    checks, _ = planned(max_time=step_s * estimates.ASSUMED_MFU * 2, warmup_steps=3)
    assert checks["time budget"].startswith("fail: max_time")
    assert "ends within the warmup (3 steps take at least" in checks["time budget"]
    assert "lower warmup_steps" in checks["time budget"]


def test_muon_is_checked_at_plan_time(
    token_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def planned(**kw: Any) -> dict[str, str]:
        cfg = pretrain_config(token_data, tmp_path / "o", optimizer="muon", **kw)
        return checks_of(pretrain.plan(cfg))

    checks = planned()
    assert checks["optimizer"].startswith("ok: muon (lr 0.02) for ")
    assert "AdamW (lr 0.003) for the other" in checks["optimizer"]
    assert planned(distributed="fsdp", nproc=2)["optimizer"].startswith(
        "fail: optimizer: muon orthogonalises whole matrices"
    )
    monkeypatch.delattr(torch.optim, "Muon")
    assert planned()["optimizer"].endswith("upgrade torch to >= 2.9 or use optimizer: adamw")


# ----- memory as the configured optimizer holds it -----------------------------------------------


def memory_of(cfg: TrainSettings, s: preflight.Setup, adapters: int = 0) -> dict[str, int]:
    return estimates.memory(cfg, s, estimates.trained(cfg, s, adapters), None)


def test_muon_keeps_one_state_where_adamw_keeps_two() -> None:
    adamw_cfg = pretrain.Config(model="tiny", device="cpu")
    muon_cfg = pretrain.Config(model="tiny", device="cpu", optimizer="muon")
    s = preflight.setup(adamw_cfg, adamw_cfg)
    with torch.device("meta"):
        model = GPT(s.model)
    matrices = sum(
        p.numel()
        for name, p in model.named_parameters()
        if name.startswith("model.layers.") and p.dim() == 2
    )
    adamw, muon = memory_of(adamw_cfg, s), memory_of(muon_cfg, s)
    # AdamW on every weight is the model estimate's own figure.
    assert adamw == memory_budget(s.model, adamw_cfg.micro_batch, s.seq_len)
    assert 0 < matrices < s.parameters
    assert adamw["total"] - muon["total"] == matrices * 4  # one fp32 moment fewer each
    assert {k: adamw[k] - muon[k] for k in adamw if k not in ("optimizer", "total")} == {
        "weights": 0,
        "gradients": 0,
        "activations": 0,
    }


def test_a_lora_run_holds_gradients_and_states_for_its_adapters_alone() -> None:
    base = preset("tiny")
    adapters = lora.trainable_count(base, LoraSpec())
    cfg = TrainSettings(device="cpu", max_steps=100, warmup_steps=10)
    s = preflight.setup(cfg, base, seq_len=64)
    full, adapted = memory_of(cfg, s), memory_of(cfg, s, adapters)
    frozen = s.parameters
    # The frozen weights lose a gradient and two moments (12 bytes); each adapter brings its
    # weight, gradient and two moments (16).
    assert adapted["total"] == full["total"] - 12 * frozen + 16 * adapters
    assert adapted["weights"] == 4 * frozen and adapted["adapters"] == 4 * adapters
    assert adapted["gradients"] == 4 * adapters and adapted["optimizer"] == 8 * adapters
    p = Plan("finetune")
    preflight.check_device(p, cfg, s, adapters=adapters)
    assert p.estimates["memory_assumes"].startswith("LoRA: a gradient and AdamW's two fp32")
    assert f"the {format_count(frozen)} frozen base" in p.estimates["memory_assumes"]
    # A checkpoint holds the adapters and their states, not the base.
    assert p.estimates["checkpoints"]["size_each"] == format_bytes(adapters * 4 * 3)


def test_the_memory_figure_names_the_optimizer_it_assumed() -> None:
    _, adamw = plan()
    _, muon = plan(optimizer="muon")
    assert adamw["memory_assumes"].startswith("AdamW: a gradient and two fp32 moments for")
    assert muon["memory_assumes"].startswith("Muon: one fp32 momentum buffer for the ")
    assert muon["memory"]["total"] != adamw["memory"]["total"]


def test_a_model_config_is_planned_as_given() -> None:
    """A finetune's base: its own architecture and a window, no preset behind it."""
    base = preset("tiny").model_copy(update={"num_layers": 3})
    cfg = TrainSettings(device="cpu", max_steps=100, warmup_steps=10)
    p = Plan("finetune")
    s = preflight.check_run(p, cfg, base, seq_len=32, name="base")
    assert s is not None and s.model == base and s.seq_len == 32
    assert checks_of(p)["architecture"].startswith("ok: base: 3 layers, width ")
    settings = pretrain.Config(model="tiny", architecture={"num_layers": 3}, seq_len=32)
    assert s == preflight.setup(cfg, settings)  # the same run as a preset with overrides
