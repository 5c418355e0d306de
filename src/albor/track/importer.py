"""Finished run dirs into the run database, and the database an `albor runs` argument names.

A run dir made without tracking (an older albor, `ALBOR_TRACK=0`, a run copied from another
machine) holds everything the database needs in its `manifest.json` and `metrics.jsonl`:
`import_run_dir` adds it, and `prepare` (what `albor runs` calls first) imports every such dir
of the workdir it is given, so `albor runs ls` shows the runs a workdir holds.
"""

from __future__ import annotations

import json
import logging
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

from albor.artifact import read_manifest
from albor.errors import ArtifactError
from albor.track.metrics import METRICS_FILE
from albor.track.metrics import read as read_metrics
from albor.track.runs import (
    DB_NAME,
    DEFAULT_WORKDIR,
    connect,
    db_path_for,
    new_run_id,
    now_iso,
    numeric,
    parse_time,
    read_state,
    reading,
)

log = logging.getLogger(__name__)


def import_run_dir(db_path: Path, run_dir: Path) -> str:
    """Add a finished run (its `manifest.json` and `metrics.jsonl`) to the database; its id.

    Importing the same run again changes nothing. A run that was tracked keeps its id (read from
    its `training_state.json`) and is completed from the manifest if the tracker never finished.
    """
    run_dir = Path(run_dir).absolute()
    manifest = read_manifest(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise ArtifactError(
            f"{run_dir}: no {METRICS_FILE}, so this is not a training run (runs are made by "
            "pretrain)"
        )
    state = read_state(run_dir)
    started = str(manifest.get("started_at") or state.get("started_at") or now_iso())
    began = parse_time(started)
    wall = numeric(manifest.get("wall_time_s"))
    ended = (
        datetime.fromtimestamp(began.timestamp() + wall, UTC).isoformat(timespec="seconds")
        if began is not None and wall is not None
        else started
    )
    records = [r for r in read_metrics(metrics_path) if isinstance(r.get("step"), int)]
    last_step = max((r["step"] for r in records), default=0)
    with closing(connect(db_path)) as conn, conn:
        run_id = str(state.get("run_id") or "")
        row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None and not run_id:
            found = conn.execute(
                "SELECT id FROM runs WHERE output_dir = ? AND started_at = ?",
                (str(run_dir), started),
            ).fetchone()
            if found is not None:
                return str(found["id"])
            run_id = new_run_id()
        if row is not None and row["status"] == "done":
            return run_id
        conn.execute(
            "INSERT INTO runs (id, name, stage, run_dir, output_dir, config, info, status, "
            "source, fingerprint, started_at, ended_at, updated_at, last_step, final_metrics) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'done', ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = 'done', ended_at = excluded.ended_at, "
            "last_step = excluded.last_step, final_metrics = excluded.final_metrics, "
            "output_dir = excluded.output_dir, updated_at = excluded.updated_at",
            (
                run_id,
                str(manifest.get("name") or run_dir.name),
                str(manifest["stage"]),
                str(run_dir),
                str(run_dir),
                json.dumps(manifest.get("config", {}), sort_keys=True, default=str),
                json.dumps(state.get("info", {}), sort_keys=True, default=str),
                "tracked" if row is not None else "imported",
                manifest.get("fingerprint"),
                started,
                ended,
                now_iso(),
                last_step,
                json.dumps(manifest.get("metrics", {}), default=str),
            ),
        )
        conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
        conn.executemany(
            "INSERT OR REPLACE INTO metrics (run_id, key, step, value) VALUES (?, ?, ?, ?)",
            [
                (run_id, k, rec["step"], v)
                for rec in records
                for k, v in ((k, numeric(v)) for k, v in rec.items() if k != "step")
                if v is not None
            ],
        )
    return run_id


def untracked_run_dirs(db_path: Path, workdir: Path) -> list[Path]:
    """Finished run dirs directly under `workdir` that the database does not hold yet."""
    candidates = [
        d
        for d in sorted(Path(workdir).iterdir())
        if d.is_dir() and (d / "manifest.json").is_file() and (d / METRICS_FILE).is_file()
    ]
    if not candidates or not Path(db_path).exists():
        return candidates
    with reading(db_path) as conn:
        done = {
            (r["id"], r["output_dir"], r["started_at"])
            for r in conn.execute("SELECT id, output_dir, started_at FROM runs WHERE status='done'")
        }
    ids = {d[0] for d in done}
    places = {(d[1], d[2]) for d in done}
    found = []
    for d in candidates:
        run_id = read_state(d).get("run_id")
        if run_id in ids:
            continue
        try:
            started = read_manifest(d).get("started_at")
        except ArtifactError:
            continue
        if run_id is None and (str(d.absolute()), started) in places:
            continue
        found.append(d)
    return found


def sync_workdir(db_path: Path, workdir: Path) -> list[str]:
    """Import the finished run dirs of `workdir` missing from the database; their ids.

    A run dir that cannot be read is skipped with a warning: one damaged dir must not hide the
    others from `albor runs ls`.
    """
    ids = []
    for d in untracked_run_dirs(db_path, workdir):
        try:
            ids.append(import_run_dir(db_path, d))
        except ArtifactError as e:
            log.warning("not imported: %s", e)
    return ids


def locate(where: Path | None) -> tuple[Path, Path | None]:
    """(database, workdir to import from) for a WORKDIR_OR_DB argument (default ./albor-run)."""
    where = DEFAULT_WORKDIR if where is None else Path(where)
    if where.is_file():
        return where, None
    if where.is_dir():
        if (where / METRICS_FILE).is_file():  # a run dir: its workdir is the parent
            return db_path_for(where), where.absolute().parent
        return where / DB_NAME, where
    raise ArtifactError(
        f"{where}: no such workdir or run database (give a pipeline workdir such as albor-run, "
        "a run dir, or a runs.db file)"
    )


def prepare(where: Path | None) -> Path:
    """The database for WORKDIR_OR_DB, with the workdir's untracked finished runs imported."""
    db_path, workdir = locate(where)
    if workdir is not None:
        sync_workdir(db_path, workdir)
    if not db_path.exists():
        raise ArtifactError(
            f"{workdir or db_path}: no runs recorded here yet ({DB_NAME} is written by "
            "`albor pretrain apply` / `albor pipeline apply`; `albor runs import RUN_DIR` adds "
            "an older run)"
        )
    return db_path
