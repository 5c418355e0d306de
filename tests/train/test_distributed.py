"""Distributed training under torchrun (gloo, CPU): N ranks with micro_batch m train exactly
as one process with micro_batch N x m, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from albor.artifact import read_manifest
from albor.stage import load_stage, run_stage
from albor.stages import pretrain
from albor.train import distributed

WORLD = 2
BASE: dict[str, Any] = dict(
    model="tiny",
    max_steps=20,
    warmup_steps=3,
    lr=3e-3,
    grad_accum=2,
    seq_len=32,
    eval_every=10,
    eval_tokens=1024,
    checkpoint_every=10,
    log_every=1,
    threads=1,
)


def config(data: Path, out: Path, **kw: Any) -> pretrain.Config:
    return pretrain.Config.model_validate({**BASE, "data": data, "output": out, **kw})


def torchrun(cfg: pretrain.Config, path: Path) -> list[str]:
    path.write_text(json.dumps(cfg.model_dump(mode="json", exclude_none=True)))  # JSON is YAML
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return [*run, f"--nproc-per-node={WORLD}", "-m", "albor", "train", "apply", str(path)]


def steps(out: Path) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r or "val_loss" in r]


def assert_same_training(one: Path, many: Path) -> None:
    """Same steps, losses to float tolerance, the same validations, close final weights."""
    a, b = steps(one), steps(many)
    assert [r["step"] for r in a] == [r["step"] for r in b]  # one writer: no line twice
    for ra, rb in zip(a, b, strict=True):
        key = "loss" if "loss" in ra else "val_loss"
        assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)
        if "tokens" in ra:
            assert rb["tokens"] == ra["tokens"]  # global tokens per step
    wa, wb = load_file(one / "model.safetensors"), load_file(many / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.fixture(scope="module")
def single(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process whose micro-batch is the ranks' together: the run they must reproduce."""
    out = tmp_path_factory.mktemp("single") / "out"
    run_stage(load_stage("pretrain"), config(token_data, out, micro_batch=2 * WORLD))
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ranks_train_as_one_process_with_the_global_batch(
    token_data: Path, tmp_path: Path, single: Path, mode: str
) -> None:
    out = tmp_path / "runs" / "out"
    cfg = config(token_data, out, micro_batch=2, distributed=None if mode == "ddp" else mode)
    done = subprocess.run(
        torchrun(cfg, tmp_path / "cfg.yaml"), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert_same_training(single, out)
    # Only rank 0 wrote: the artifact holds what one process writes, nothing is left beside it.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in single.iterdir())
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "runs.db"]
    m = read_manifest(out)["metrics"]
    assert m["steps"] == 20 and m["tokens"] == 20 * 2 * WORLD * 2 * 32
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["data"]["world_size"] == WORLD and state["data"]["micro_batch"] == 2


@pytest.mark.slow
def test_a_stopped_fsdp_run_resumes_where_it_stopped(
    token_data: Path, tmp_path: Path, single: Path
) -> None:
    cfg = config(token_data, tmp_path / "out", micro_batch=2, distributed="fsdp")
    command = torchrun(cfg, tmp_path / "cfg.yaml")
    first = tmp_path / ".out.partial" / "checkpoints" / "step-0000010" / "checkpoint.json"
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun passes it on to every rank
    proc.communicate(timeout=120)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert read_manifest(tmp_path / "out")["metrics"]["resumed_from"] is not None
    assert_same_training(single, tmp_path / "out")


def test_plan_shows_the_world_and_the_global_batch(
    token_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alone = pretrain.plan(config(token_data, tmp_path / "o", micro_batch=2))
    assert alone.ok and "world_size" not in alone.estimates
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))
    p = pretrain.plan(config(token_data, tmp_path / "o", micro_batch=2))
    assert p.ok, p.summary()
    assert p.estimates["world_size"] == WORLD and p.estimates["distributed"] == "ddp"
    assert p.estimates["tokens_per_step"] == 2 * 2 * 32 * WORLD
    assert pretrain.plan(config(token_data, tmp_path / "o", distributed="fsdp")).ok
    refused = pretrain.plan(config(token_data, tmp_path / "o", distributed="none"))
    assert not refused.ok
    assert (
        "would train 2 unrelated copies"
        in {c.name: c.detail for c in refused.checks}["distributed"]
    )


def test_one_process_is_a_world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (1, 0, 0)
    assert distributed.is_rank0() and not distributed.launched() and not distributed.active()
    cpu = torch.device("cpu")
    assert distributed.init("cpu") == cpu and not distributed.active()
    assert distributed.all_reduce_sum(3, cpu) == 3.0
    assert distributed.any_rank(True, cpu) and not distributed.any_rank(False, cpu)
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    distributed.barrier()
