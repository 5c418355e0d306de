"""The run database: the tracker the loop calls, importing finished run dirs, queries, diff."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from albor.errors import ArtifactError
from albor.track import importer, queries, runs
from albor.track.runs import RunTracker
from track.runmaker import make_run_dir, metric_lines, pretrain_config


def metric_rows(db: Path, run_id: str) -> list[tuple[int, str, float]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT step, key, value FROM metrics WHERE run_id = ? ORDER BY step, key", (run_id,)
        ).fetchall()


def test_import_run_dir_fills_the_database(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "pretrain")
    db = tmp_path / runs.DB_NAME
    run_id = importer.import_run_dir(db, run_dir)

    [row] = queries.list_runs(db)
    assert row["id"] == run_id
    assert (row["name"], row["stage"], row["status"], row["source"]) == (
        "pretrain",
        "pretrain",
        "done",
        "imported",
    )
    assert row["steps"] == 100
    assert row["final_loss"] == pytest.approx(2.0 + 4.0 * 2.718281828 ** (-100 / 30), abs=1e-4)
    assert row["val_bpb"] is not None and row["tokens_per_s"] == 1000.0
    assert row["duration_s"] == pytest.approx(204.8, abs=1)
    # Every numeric value of every metrics.jsonl line is a row: 10 train lines x 6 values and
    # 2 eval lines x 4 values.
    assert len(metric_rows(db, run_id)) == 10 * 6 + 2 * 4
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == runs.SCHEMA_VERSION

    # Importing again (or syncing the workdir) changes nothing.
    assert importer.import_run_dir(db, run_dir) == run_id
    assert importer.sync_workdir(db, tmp_path) == []
    assert len(queries.list_runs(db)) == 1


def test_import_refuses_what_is_not_a_finished_run(tmp_path: Path) -> None:
    partial = make_run_dir(tmp_path / ".pretrain.partial", manifest=False)
    with pytest.raises(ArtifactError, match=r"manifest\.json"):
        importer.import_run_dir(tmp_path / "runs.db", partial)
    finished = make_run_dir(tmp_path / "pretrain")
    (finished / "metrics.jsonl").unlink()
    with pytest.raises(ArtifactError, match="not a training run"):
        importer.import_run_dir(tmp_path / "runs.db", finished)


def test_tracker_records_a_run_and_its_dir_is_not_imported_twice(tmp_path: Path) -> None:
    partial = tmp_path / ".pretrain.partial"
    partial.mkdir()
    (partial / ".fingerprint").write_text("abc123")
    db = runs.db_path_for(partial)
    assert db == tmp_path / "runs.db"
    config = pretrain_config()
    with RunTracker.open(db, "pretrain", "pretrain", partial, config, info={"params": 5}) as t:
        state = json.loads((partial / runs.STATE_FILE).read_text())
        assert (state["status"], state["run_id"], state["max_steps"]) == ("running", t.run_id, 100)
        assert queries.list_runs(db)[0]["status"] == "running"  # readable while the run writes
        for rec in metric_lines(range(10, 101, 10)):
            t.log(**rec)
        t.log(100, note="text is not a metric", bad=float("nan"))
        t.finish("done", {"final_loss": 2.1, "steps": 100})
    [row] = queries.list_runs(db)
    assert (row["id"], row["status"], row["source"]) == (t.run_id, "done", "tracked")
    assert row["output_dir"] == str(tmp_path / "pretrain")
    assert row["final_loss"] == 2.1
    assert len(metric_rows(db, t.run_id)) == 10 * 6 + 2 * 4
    detail = queries.show_run(db, t.run_id)
    assert detail["config"] == config and detail["info"] == {"params": 5}
    assert detail["fingerprint"] == "abc123"
    assert [s for s, _ in detail["curves"]["val_loss"]] == [50, 100]
    state = json.loads((partial / runs.STATE_FILE).read_text())
    assert state["status"] == "done" and state["final_metrics"]["final_loss"] == 2.1

    # The stage runner writes the manifest and renames the dir; the workdir sync sees the same run.
    (partial / "manifest.json").write_text(
        json.dumps({"stage": "pretrain", "name": "pretrain", "outputs": [], "config": config})
    )
    partial.rename(tmp_path / "pretrain")
    assert importer.sync_workdir(db, tmp_path) == []


def test_tracker_context_records_failure_and_stop(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"

    class Stopped(Exception):
        exit_code = 0  # what TrainingStopped (a signal, checkpoint saved) carries

    for exc, status in ((ValueError("boom"), "failed"), (Stopped("SIGTERM"), "stopped")):
        run_dir = tmp_path / status
        run_dir.mkdir()
        with pytest.raises(type(exc)), RunTracker.open(db, status, "pretrain", run_dir, {}):
            raise exc
        detail = queries.show_run(db, status)
        assert detail["run"]["status"] == status
        assert "boom" in detail["final_metrics"].get("error", "") or status == "stopped"


def test_restarted_run_keeps_its_id_and_forgets_repeated_steps(tmp_path: Path) -> None:
    run_dir = tmp_path / ".pretrain.partial"
    run_dir.mkdir()
    db = tmp_path / "runs.db"
    first = RunTracker.open(db, "pretrain", "pretrain", run_dir, pretrain_config())
    for rec in metric_lines(range(10, 61, 10)):
        first.log(**rec)
    first._write_state(force=True)  # the process dies here: no finish
    second = RunTracker.open(db, "pretrain", "pretrain", run_dir, pretrain_config())
    assert second.run_id == first.run_id
    second.truncate(30)  # resumed from the step-30 checkpoint
    assert max(step for step, _, _ in metric_rows(db, second.run_id)) == 30
    second.finish("done")
    assert len(queries.list_runs(db)) == 1
    # A finished run's dir reused for a new run gets a new id.
    third = RunTracker.open(db, "pretrain", "pretrain", run_dir, pretrain_config())
    assert third.run_id != first.run_id


def test_tracking_never_stops_training(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    not_a_db = tmp_path / "runs.db"
    not_a_db.write_text("this is not SQLite " * 100)
    with caplog.at_level(logging.WARNING, logger="albor.track.runs"):
        t = RunTracker.open(not_a_db, "x", "pretrain", run_dir, {"max_steps": 10})
    assert not t.enabled and "run tracking off" in caplog.text
    t.log(5, loss=1.0)
    t.finish("done")
    assert json.loads((run_dir / runs.STATE_FILE).read_text())["status"] == "done"

    monkeypatch.setenv("ALBOR_TRACK", "0")
    off = RunTracker.open(tmp_path / "other.db", "x", "pretrain", run_dir, {})
    off.log(1, loss=1.0)
    off.finish("done")
    assert not off.enabled and not (tmp_path / "other.db").exists()


def test_a_run_whose_process_died_reads_as_interrupted(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    db = tmp_path / "runs.db"
    t = RunTracker.open(db, "x", "pretrain", run_dir, {})
    assert queries.list_runs(db)[0]["status"] == "running"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET pid = ?", (int(dead.stdout),))
    assert queries.list_runs(db)[0]["status"] == "interrupted"
    t.finish("failed")


def test_runs_are_named_by_id_prefix_or_name(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    ids = [
        importer.import_run_dir(
            db, make_run_dir(tmp_path / name, started_at=f"2025-01-0{i}T00:00:00")
        )
        for i, name in enumerate(("first", "second", "cafe"), start=1)
    ]
    with runs.reading(db) as conn:
        assert queries.resolve_run(conn, ids[1]) == ids[1]
        assert queries.resolve_run(conn, ids[2][:6]) == ids[2]
        assert queries.resolve_run(conn, "second") == ids[1]
        assert queries.resolve_run(conn, "cafe") == ids[2]  # a name before an id prefix
        with pytest.raises(ArtifactError, match="no run 'zzz'"):
            queries.resolve_run(conn, "zzz")
        conn.execute("PRAGMA foreign_keys=OFF")  # to rename ids without their metrics
        conn.execute("UPDATE runs SET id = '00' || id")  # force a shared prefix
        conn.commit()
        with pytest.raises(ArtifactError, match="ambiguous"):
            queries.resolve_run(conn, "00")
    # Stamps without a time zone (written by hand) are taken as UTC.
    assert queries.show_run(db, "second")["run"]["duration_s"] == pytest.approx(204.8, abs=1)


def test_diff_compares_config_curves_and_final_metrics(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    a = importer.import_run_dir(db, make_run_dir(tmp_path / "a"))
    b = importer.import_run_dir(
        db, make_run_dir(tmp_path / "b", scale=0.5, lr=1e-3, architecture={"num_layers": 4})
    )
    d = queries.diff_runs(db, a, b, points=4)
    assert [(r["key"], r["a"], r["b"]) for r in d["config_diff"]] == [
        ("architecture.hidden_size", 64, None),
        ("architecture.num_layers", 2, 4),
        ("lr", 3e-4, 1e-3),
    ]
    assert [r["step"] for r in d["loss_at_steps"]] == [10, 40, 70, 100]
    assert all(r["delta"] < 0 for r in d["loss_at_steps"])  # b learns faster
    assert [r["step"] for r in d["val_loss_at_steps"]] == [50, 100]
    final = {r["key"]: r for r in d["final"]}
    assert final["val_bpb"]["delta"] < 0 and final["steps"]["delta"] == 0
    assert d["verdict"]["metric"] == "val_bpb" and d["verdict"]["better"] == "b"
    assert b in d["verdict"]["summary"]


def test_locate_the_database(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "w" / "pretrain")
    assert importer.locate(tmp_path / "w") == (tmp_path / "w" / "runs.db", tmp_path / "w")
    assert importer.locate(run_dir) == (tmp_path / "w" / "runs.db", tmp_path / "w")
    with pytest.raises(ArtifactError, match="no runs recorded"):
        importer.prepare(tmp_path)  # a dir with no runs, and no database
    with pytest.raises(ArtifactError, match="no such workdir"):
        importer.locate(tmp_path / "missing")
    db = importer.prepare(tmp_path / "w")  # imports the run found there
    assert importer.locate(db) == (db, None)
    assert len(queries.list_runs(db)) == 1
