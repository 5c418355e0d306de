from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from albor.artifact import read_manifest
from albor.errors import StageFailed
from albor.stage import PlanContext, load_stage, run_stage
from albor.stages import pretrain


def tiny(data: Path, out: Path, **kw: Any) -> pretrain.Config:
    base: dict[str, Any] = dict(
        data=data,
        output=out,
        model="tiny",
        micro_batch=4,
        max_steps=30,
        warmup_steps=3,
        lr=3e-3,
        eval_every=10,
        eval_tokens=1024,
        checkpoint_every=10,
        log_every=5,
        seq_len=64,
    )
    base.update(kw)
    return pretrain.Config.model_validate(base)


def test_plan_estimates(token_data: Path, tmp_path: Path) -> None:
    p = pretrain.plan(tiny(token_data, tmp_path / "out"))
    assert p.ok, p.summary()
    e = p.estimates
    assert e["parameters"]["total"] == 125_248
    assert e["tokens_per_step"] == 4 * 64
    assert e["total_tokens"] == 4 * 64 * 30
    assert e["warmup_fraction"] == 0.1
    assert 0 < e["data_repeats"] < 1
    assert set(e["memory"]) == {"weights", "gradients", "optimizer", "activations", "total"}
    assert e["checkpoints"]["written"] == 4 and e["wall_time_s"] > 0
    assert not (tmp_path / "out").exists()
    pending = pretrain.plan(tiny(tmp_path / "later", tmp_path / "o"), PlanContext({"data": "tok"}))
    assert pending.ok
    assert {c.name: c.detail for c in pending.checks}["data"] == "will be produced by stage 'tok'"


@pytest.mark.parametrize(
    ("overrides", "check", "fix"),
    [
        ({"warmup_steps": 30}, "warmup", "use a warmup of about"),
        ({"architecture": {"vocab_size": 1000}}, "vocab", "architecture.vocab_size: 512"),
        ({"architecture": {"num_heads": 3}}, "architecture", "not divisible by num_heads 3"),
        ({"architecture": {"num_kv_heads": 3}}, "architecture", "num_kv_heads"),
        ({"seq_len": 256}, "sequence length", "exceeds the context 128"),
        ({"micro_batch": 10**7}, "memory", "lower micro_batch"),
    ],
)
def test_plan_rejects_with_fix(
    token_data: Path, tmp_path: Path, overrides: dict[str, Any], check: str, fix: str
) -> None:
    p = pretrain.plan(tiny(token_data, tmp_path / "out", **overrides))
    assert not p.ok
    failing = {c.name: c.detail for c in p.failures}
    assert check in failing and fix in failing[check], failing


def test_plan_rejects_missing_data(tmp_path: Path) -> None:
    p = pretrain.plan(tiny(tmp_path / "nothing", tmp_path / "out"))
    assert [c.name for c in p.failures] == ["data"]
    assert "run the tokenize stage first" in p.failures[0].detail


def test_grad_clip_cannot_be_disabled(token_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grad_clip"):
        tiny(token_data, tmp_path, grad_clip=0)


def test_apply_trains_and_writes_an_hf_checkpoint(token_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run_stage(load_stage("pretrain"), tiny(token_data, out))
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "checkpoints",
            "config.json",
            "manifest.json",
            "metrics.jsonl",
            "model.safetensors",
            "optimizer.pt",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "trainer_state.json",
        ]
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-0000010",
        "step-0000020",
    ]
    m = res.manifest["metrics"]
    assert m["steps"] == 30 and m["final_loss"] < m["first_loss"] - 0.5
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == [10, 20, 30]
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 30
    # The checkpoint is a transformers model dir as it stands.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def add(a, b):\n    return a + b\n", return_tensors="pt").input_ids
    assert hf(ids).logits.shape == (1, ids.shape[1], 512)
    assert run_stage(load_stage("pretrain"), tiny(token_data, out)).status == "up to date"


def test_interrupted_run_resumes_from_its_last_checkpoint(
    token_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = run_stage(load_stage("pretrain"), tiny(token_data, tmp_path / "a"))
    from albor.train import loop

    real = loop.checkpoint.save
    calls = {"n": 0}

    def crash_after_second_checkpoint(*args: Any, **kw: Any) -> Path:
        path = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise StageFailed("simulated crash")
        return path

    monkeypatch.setattr(loop.checkpoint, "save", crash_after_second_checkpoint)
    with pytest.raises(StageFailed, match="simulated crash"):
        run_stage(load_stage("pretrain"), tiny(token_data, tmp_path / "b"))
    assert not (tmp_path / "b").exists()  # nothing half-written in place
    monkeypatch.setattr(loop.checkpoint, "save", real)
    resumed = run_stage(load_stage("pretrain"), tiny(token_data, tmp_path / "b"))
    assert resumed.manifest["metrics"]["resumed_from"] == 20
    # Batches are a function of the step and the optimizer state is restored: same trajectory.
    a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in a] == pytest.approx([r.get("loss") for r in b], rel=1e-4)
    from safetensors.torch import load_file

    ta, tb = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-4)
    assert straight.manifest["metrics"]["steps"] == resumed.manifest["metrics"]["steps"] == 30
    assert read_manifest(tmp_path / "b")["stage"] == "pretrain"


def test_sigterm_saves_a_checkpoint_exits_0_and_resumes(token_data: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = tmp_path / "pretrain.yaml"
    cfg.write_text(
        f"data: {token_data}\noutput: {tmp_path / 'out'}\nmodel: tiny\nseq_len: 64\n"
        "micro_batch: 4\nmax_steps: 800\nwarmup_steps: 10\nlog_every: 1\n"
        "checkpoint_every: 50000\neval_tokens: 0\nthreads: 1\n"
    )
    command = [sys.executable, "-m", "albor", "train", "apply", str(cfg)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / ".out.partial" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by SIGTERM at step" in err and "run the same command again" in err
    ckpts = list((tmp_path / ".out.partial" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and not (tmp_path / "out").exists()
    step = int(ckpts[0].name.split("-")[1])
    # The same command again resumes at that step and finishes.
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from"] == step and manifest["metrics"]["steps"] == 800
