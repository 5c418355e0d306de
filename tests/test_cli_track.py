"""`albor runs ls|show|diff|import` and `albor monitor`, run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from albor.cli import cli
from albor.track.runs import RunTracker
from helpers import run
from track.runmaker import make_run_dir, metric_lines, pretrain_config, write_metrics


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A pipeline workdir with two finished pretrain runs made without tracking."""
    work = tmp_path / "albor-run"
    make_run_dir(work / "pretrain", started_at="2025-01-01T00:00:00+00:00")
    make_run_dir(work / "pretrain-fast", scale=0.5, lr=1e-3, started_at="2025-01-02T00:00:00+00:00")
    return work


def test_verbs_are_registered() -> None:
    assert set(cli.commands["runs"].commands) == {"ls", "show", "diff", "import"}  # type: ignore[attr-defined]
    assert "monitor" in cli.commands


def test_runs_ls_imports_and_lists(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(["runs", "ls", str(workdir), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["db"] == str(workdir / "runs.db")
    assert [r["name"] for r in data["runs"]] == ["pretrain-fast", "pretrain"]  # newest first
    assert all(r["status"] == "done" and r["steps"] == 100 for r in data["runs"])
    monkeypatch.chdir(workdir.parent)  # the default WORKDIR_OR_DB is ./albor-run
    code, out, _ = run(["runs", "ls"], capsys)
    assert code == 0
    for r in data["runs"]:
        assert r["id"] in out
    assert "val bpb" in out and "3m24s" in out
    code, out, _ = run(["runs", "ls", str(workdir / "runs.db"), "--json"], capsys)
    assert len(json.loads(out)["runs"]) == 2  # not imported twice


def test_runs_show(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(["runs", "ls", str(workdir)], capsys)
    code, out, _ = run(["runs", "show", "pretrain", "-w", str(workdir), "--json"], capsys)
    assert code == 0
    detail = json.loads(out)
    assert detail["config"]["lr"] == 3e-4 and detail["final_metrics"]["steps"] == 100
    assert len(detail["curves"]["loss"]) == 10
    prefix = detail["run"]["id"][:5]
    code, out, _ = run(["runs", "show", prefix, "--workdir", str(workdir)], capsys)
    assert code == 0
    assert detail["run"]["id"] in out and "▁" in out and "config" in out


def test_runs_diff(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        ["runs", "diff", "pretrain", "pretrain-fast", "-w", str(workdir), "--json"], capsys
    )
    assert code == 0
    diff = json.loads(out)
    assert diff["config_diff"] == [{"key": "lr", "a": 3e-4, "b": 1e-3}]
    assert len(diff["loss_at_steps"]) == 10 and diff["verdict"]["better"] == "b"
    code, out, _ = run(["runs", "diff", "pretrain", "pretrain-fast", "-w", str(workdir)], capsys)
    assert code == 0
    assert "same scale" in out and "loss at common steps" in out and "is better on" in out


def test_runs_errors_are_one_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["runs", "show", "nope", "-w", str(workdir)], capsys)
    assert code == 1 and "no run 'nope'" in err and "Traceback" not in err
    code, _, err = run(["runs", "ls", str(workdir / "missing")], capsys)
    assert code == 1 and "no such workdir" in err


def test_runs_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = make_run_dir(tmp_path / "elsewhere" / "pretrain")
    db = tmp_path / "my.db"
    code, out, _ = run(["runs", "import", str(run_dir), "--db", str(db), "--json"], capsys)
    assert code == 0
    [imported] = json.loads(out)["imported"]
    code, out, _ = run(["runs", "ls", str(db), "--json"], capsys)
    assert [r["id"] for r in json.loads(out)["runs"]] == [imported["id"]]


def test_monitor_json_and_once_on_a_finished_run(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["monitor", str(workdir / "pretrain"), "--json"], capsys)
    assert code == 0
    snap = json.loads(out)
    assert (snap["status"], snap["step"], snap["max_steps"], snap["eta_s"]) == ("done", 100, 100, 0)
    code, out, _ = run(["monitor", str(workdir / "pretrain"), "--once"], capsys)
    assert code == 0
    assert "albor monitor" in out and "step 100/100" in out


def test_monitor_finds_the_training_run(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = workdir / ".pretrain.partial"
    partial.mkdir()
    tracker = RunTracker.open(
        workdir / "runs.db", "pretrain", "pretrain", partial, pretrain_config(max_steps=400)
    )
    write_metrics(partial, metric_lines(range(10, 101, 10)))
    monkeypatch.chdir(workdir.parent)
    code, out, _ = run(["monitor", "--json"], capsys)  # no RUN_DIR: the newest run in ./albor-run
    assert code == 0
    snap = json.loads(out)
    assert snap["run_dir"] == str(partial) and snap["status"] == "running"
    assert snap["run_id"] == tracker.run_id and snap["step"] == 100 and snap["eta_s"] > 0
    code, out, _ = run(["runs", "ls", "--json"], capsys)  # tracked while it trains
    rows = {r["id"]: r for r in json.loads(out)["runs"]}
    assert rows[tracker.run_id]["status"] == "running"
    tracker.finish("done")
