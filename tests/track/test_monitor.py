"""The live monitor: incremental reading, snapshots of finished and running runs, the frame."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from albor.errors import ArtifactError
from albor.track.monitor import Monitor, Snapshot, find_run_dir
from albor.track.runs import RunTracker
from albor.track.views import dashboard
from track.runmaker import (
    TOKENS_PER_STEP,
    make_run_dir,
    metric_lines,
    pretrain_config,
    write_metrics,
)


def render(snap: Snapshot, width: int = 100) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(dashboard(snap, width))
    return console.export_text()


def test_snapshot_of_a_finished_run(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "pretrain")
    snap = Monitor(run_dir).poll()
    assert (snap.status, snap.step, snap.max_steps, snap.progress, snap.eta_s) == (
        "done",
        100,
        100,
        1.0,
        0.0,
    )
    assert snap.loss == snap.final_metrics["final_loss"]
    assert snap.val_bpb == snap.final_metrics["val_bpb"]
    assert len(snap.curves["loss"]) == 10 and len(snap.curves["val_loss"]) == 2
    assert snap.mfu is None and snap.rss_bytes is None
    data = json.loads(json.dumps(snap.to_json()))
    assert data["curves"]["val_loss"][-1][0] == 100 and data["status"] == "done"

    text = render(snap)
    assert "albor monitor · pretrain (pretrain) · done" in text
    assert "step 100/100" in text and "val bits/byte" in text
    assert any("\u2801" <= ch <= "\u28ff" for ch in text)  # the braille loss chart
    assert "MFU" in text and "n/a" in text


def test_snapshot_of_a_partial_dir_while_training(tmp_path: Path) -> None:
    partial = tmp_path / ".pretrain.partial"
    partial.mkdir()
    tracker = RunTracker.open(
        tmp_path / "runs.db",
        "pretrain",
        "pretrain",
        partial,
        pretrain_config(max_steps=200),
        info={"flops_per_token": 1e6, "peak_flops": 1e10},
    )
    lines = metric_lines(range(10, 51, 10))
    write_metrics(partial, lines)
    monitor = Monitor(partial)
    snap = monitor.poll()
    assert (snap.status, snap.step, snap.max_steps, snap.run_id) == (
        "running",
        50,
        200,
        tracker.run_id,
    )
    assert snap.progress == pytest.approx(0.25)
    # 10 steps per 10 * 2048 / 1000 s at the last two lines: 150 steps left.
    assert snap.eta_s == pytest.approx(150 * TOKENS_PER_STEP / 1000.0, rel=0.01)
    assert snap.pid == os.getpid() and snap.rss_bytes and snap.rss_bytes > 1_000_000
    assert snap.model_flops_per_s == pytest.approx(1e6 * 1000.0)
    assert snap.mfu == pytest.approx(0.1)
    assert "ETA 5m07s" in render(snap)

    # More lines arrive (the loop may log extra metrics, such as its own mfu).
    more = metric_lines(range(60, 201, 10))
    more[-1]["mfu"] = 0.42
    more[-1]["gpu_mem_bytes"] = 123
    write_metrics(partial, more, mode="a")
    snap = monitor.poll()
    assert snap.step == 200 and len(snap.curves["loss"]) == 20 and snap.mfu == 0.42
    assert snap.other == {"gpu_mem_bytes": 123.0}

    # The stage finishes: the manifest is written and the partial dir renamed to the output.
    tracker.finish("done", {"final_loss": 2.0})
    make_run_dir(partial, max_steps=200)
    partial.rename(tmp_path / "pretrain")
    snap = monitor.poll()
    assert snap.status == "done" and snap.run_dir == str(tmp_path / "pretrain")
    assert snap.pid is None and snap.eta_s == 0.0


def test_a_time_budget_sets_progress_and_eta(tmp_path: Path) -> None:
    # max_steps out of reach and a 60 s budget: at step 20 (40.96 s in) the run is as far along as
    # its budget, and ends when the budget does, whatever the pace of steps says.
    partial = tmp_path / ".pretrain.partial"
    partial.mkdir()
    RunTracker.open(
        tmp_path / "runs.db",
        "pretrain",
        "pretrain",
        partial,
        pretrain_config(max_steps=10**9, max_time=60.0),
        info={},
    )
    write_metrics(partial, metric_lines(range(10, 21, 10)))
    snap = Monitor(partial).poll()
    assert snap.status == "running"
    assert snap.progress == pytest.approx(40.96 / 60)
    assert snap.eta_s == pytest.approx(60 - 40.96, abs=0.1)


def test_snapshot_without_tracker_state(tmp_path: Path) -> None:
    partial = make_run_dir(tmp_path / ".pretrain.partial", manifest=False)
    # What the loop writes on resume, and a skipped step's loss: neither is a point on a curve.
    resume = {"step": 100, "event": "resume", "checkpoint": "step-0000100", "warnings": []}
    write_metrics(partial, [resume, {"step": 100, "loss": float("nan")}], mode="a")
    snap = Monitor(partial).poll()
    assert len(snap.curves["loss"]) == 10 and snap.other == {}
    assert snap.loss == snap.curves["loss"][-1][1]  # the last finite loss stays on show
    json.dumps(snap.to_json(), allow_nan=False)
    assert snap.status == "unknown" and snap.step == 100
    assert snap.max_steps is None and snap.eta_s is None and snap.name == "pretrain"
    assert "step 100 " in render(snap)


def test_mfu_from_the_model_config(tmp_path: Path) -> None:
    from albor.model.estimate import flops_per_token
    from albor.model.hf import to_hf_config
    from albor.model.presets import preset

    run_dir = make_run_dir(tmp_path / "pretrain", seq_len=32)
    mc = preset("tiny")
    (run_dir / "config.json").write_text(json.dumps(to_hf_config(mc, eos_token_id=0)))
    snap = Monitor(run_dir, peak_flops=1e12).poll()
    assert snap.model_flops_per_s == pytest.approx(flops_per_token(mc, 32) * 1000.0)
    assert snap.mfu == pytest.approx(snap.model_flops_per_s / 1e12, abs=1e-4)


def test_find_run_dir(tmp_path: Path) -> None:
    work = tmp_path / "albor-run"
    done = make_run_dir(work / "pretrain")
    assert find_run_dir(work) == done
    assert find_run_dir(done) == done
    partial = make_run_dir(work / ".pretrain.partial", manifest=False)
    os.utime(partial / "metrics.jsonl", (1e10, 1e10))  # written after the finished run's
    assert find_run_dir(work) == partial
    assert find_run_dir(done) == partial  # a re-run of that output is training
    with pytest.raises(ArtifactError, match="no training run here"):
        find_run_dir(tmp_path)
    with pytest.raises(ArtifactError, match="no such run dir"):
        find_run_dir(tmp_path / "nothing")
