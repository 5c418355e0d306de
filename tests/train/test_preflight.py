"""Planning for the machine one will rent: a `target` GPU's datasheet judges memory and sizes the
wall time, `nproc` x `nodes` size the global batch, and apply refuses another world."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from albor.errors import ConfigError
from albor.model.estimate import format_bytes
from albor.stages import pretrain
from albor.train import hardware, preflight

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
