"""The run database and the tracker that writes it while a run trains.

One SQLite file per workdir, `WORKDIR/runs.db` (a stage run on its own: beside its output dir,
i.e. `db_path_for(run_dir)`). The training loop writes to it through `RunTracker`; finished run
dirs made without tracking are added by `track/importer.py` (which `albor runs` does by itself
for the run dirs of the workdir it is given). `albor runs ls|show|diff` read it through
`track/queries.py`.

Schema (`PRAGMA user_version` 1):

    runs(id TEXT PRIMARY KEY, name, stage, run_dir, output_dir, config JSON, info JSON,
         status running|done|failed|stopped, source tracked|imported, fingerprint, pid, host,
         started_at, ended_at, updated_at (ISO 8601 UTC), last_step, final_metrics JSON)
    metrics(run_id, key, step, value REAL)  PRIMARY KEY (run_id, key, step), INDEX (run_id, step)

Metrics are stored long (one row per step and key), so a new metric (e.g. `mfu`) needs no
migration. The database is in WAL mode and every write is one short transaction, so a monitor or
`albor runs ls` can read while a run writes. The tracker also keeps `training_state.json` in the
run dir (run id, pid, status, max_steps, the latest values) for `albor monitor`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from albor.artifact import output_dir_for
from albor.errors import ArtifactError

log = logging.getLogger(__name__)

DB_NAME = "runs.db"
STATE_FILE = "training_state.json"
DEFAULT_WORKDIR = Path("albor-run")
SCHEMA_VERSION = 1
FINAL_STATUSES = ("done", "failed", "stopped")
# training_state.json is rewritten at most this often while logging (and always at open/finish):
# it is for a human watching, and a write per logged step would cost a tiny CPU run real time.
STATE_INTERVAL_S = 1.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    stage TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    output_dir TEXT NOT NULL,
    config TEXT NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed', 'stopped')),
    source TEXT NOT NULL CHECK (source IN ('tracked', 'imported')),
    fingerprint TEXT,
    pid INTEGER,
    host TEXT,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    updated_at TEXT NOT NULL,
    last_step INTEGER NOT NULL DEFAULT 0,
    final_metrics TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS runs_output ON runs (output_dir);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    step INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (run_id, key, step)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS metrics_step ON metrics (run_id, step);
"""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    # albor writes UTC with an offset; a hand-written stamp without one is taken as UTC too, so
    # that durations never mix naive and aware times.
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def new_run_id() -> str:
    """12 hex digits: short enough to type a prefix of, random enough never to collide."""
    return secrets.token_hex(6)


def db_path_for(run_dir: Path) -> Path:
    """The database a run dir belongs to: `runs.db` in the directory holding it (the pipeline's
    workdir, or the parent of a standalone stage's output; the same for its `.NAME.partial`)."""
    return Path(run_dir).absolute().parent / DB_NAME


def numeric(value: Any) -> float | None:
    """`value` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def connect(db_path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the run database in WAL mode with the current schema."""
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(db_path), timeout=10.0)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit does not fsync; a power cut may lose the last metrics, never the
        # database, and logging stays cheap next to a training step.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ArtifactError(
                f"{db_path}: run database schema {version} is newer than this albor knows "
                f"({SCHEMA_VERSION}): upgrade albor"
            )
        if version < SCHEMA_VERSION:
            with conn:
                conn.executescript(_SCHEMA)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise ArtifactError(f"{db_path}: not a usable run database: {e}") from e
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def reading(db_path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for a read-only command, closed afterwards."""
    with closing(connect(db_path)) as conn:
        yield conn


def _write_json(path: Path, data: Any) -> None:
    """Replace `path` atomically (readers see the old or the new file); no fsync, the file is a
    live view that the next write supersedes."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run dir's `training_state.json`, or {} if it has none (or it is unreadable)."""
    try:
        data = json.loads((Path(run_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class RunTracker:
    """Records one training run: `open` at the start, `log` per metrics line, `finish` at the end.

    Tracking never stops training: if the database cannot be written (locked past the timeout,
    disk full, read-only), one warning is logged and the run goes on with `training_state.json`
    only. `ALBOR_TRACK=0` in the environment turns the database off the same way. Used as a
    context manager it finishes the run as failed (an error) or stopped (Ctrl-C, or an
    AlborError with exit code 0 such as a signal that saved a checkpoint) if the block leaves
    early, and as done if the block ends without `finish` having been called.
    """

    def __init__(
        self,
        run_id: str,
        run_dir: Path,
        db_path: Path,
        conn: sqlite3.Connection | None,
        state: dict[str, Any],
    ) -> None:
        self.run_id = run_id
        self.run_dir = run_dir
        self.db_path = db_path
        self._conn = conn
        self._state = state
        self._state_written = 0.0
        self._finished = False

    @property
    def enabled(self) -> bool:
        """Whether the database is being written (False when off or after a write failed)."""
        return self._conn is not None

    @classmethod
    def open(
        cls,
        db_path: Path,
        name: str,
        stage: str,
        run_dir: Path,
        config: Mapping[str, Any],
        *,
        info: Mapping[str, Any] | None = None,
    ) -> RunTracker:
        """Start recording the run writing into `run_dir`, or resume recording it.

        A run dir that still holds the `training_state.json` of an unfinished run is the same
        run restarted (a stage wipes its partial dir when the config or inputs change), so its
        run id is kept. `info` is free-form facts for the monitor (e.g. `flops_per_token`,
        `peak_flops`, `parameters`, `device`).
        """
        run_dir = Path(run_dir).absolute()
        db_path = Path(db_path).absolute()
        prior = read_state(run_dir)
        resumed = bool(prior.get("run_id")) and prior.get("status") != "done"
        run_id = str(prior["run_id"]) if resumed else new_run_id()
        marker = run_dir / ".fingerprint"  # written by the stage runner before apply
        fingerprint = marker.read_text().strip() if marker.is_file() else None
        started = str(prior.get("started_at")) if resumed else now_iso()
        config_json = json.dumps(dict(config), sort_keys=True, default=str)
        info_json = json.dumps(dict(info or {}), sort_keys=True, default=str)
        state: dict[str, Any] = {
            "run_id": run_id,
            "name": name,
            "stage": stage,
            "status": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": started,
            "updated_at": now_iso(),
            "ended_at": None,
            "db": str(db_path),
            "output_dir": str(output_dir_for(run_dir)),
            "max_steps": config.get("max_steps"),
            "step": int(prior.get("step", 0)) if resumed else 0,
            "last": dict(prior.get("last", {})) if resumed else {},
            "config": dict(config),
            "info": dict(info or {}),
            "final_metrics": {},
        }
        conn: sqlite3.Connection | None = None
        if os.environ.get("ALBOR_TRACK", "1") == "0":
            log.info("run tracking is off (ALBOR_TRACK=0): %s is not written", db_path)
        else:
            try:
                conn = connect(db_path)
                with conn:
                    conn.execute(
                        "INSERT INTO runs (id, name, stage, run_dir, output_dir, config, info, "
                        "status, source, fingerprint, pid, host, started_at, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', 'tracked', ?, ?, ?, ?, ?) "
                        "ON CONFLICT (id) DO UPDATE SET status = 'running', ended_at = NULL, "
                        "pid = excluded.pid, host = excluded.host, info = excluded.info, "
                        "updated_at = excluded.updated_at",
                        (
                            run_id,
                            name,
                            stage,
                            str(run_dir),
                            state["output_dir"],
                            config_json,
                            info_json,
                            fingerprint,
                            state["pid"],
                            state["host"],
                            started,
                            state["updated_at"],
                        ),
                    )
            except (sqlite3.Error, ArtifactError, OSError) as e:
                log.warning("run tracking off for this run: cannot write %s: %s", db_path, e)
                if conn is not None:
                    conn.close()
                conn = None
        tracker = cls(run_id, run_dir, db_path, conn, state)
        tracker._write_state(force=True)
        return tracker

    def log(self, step: int, **metrics: Any) -> None:
        """Record the metrics of `step` (numbers only; NaN, None and text are left out)."""
        values = {k: v for k, v in ((k, numeric(v)) for k, v in metrics.items()) if v is not None}
        self._state["step"] = max(int(self._state["step"]), step)
        self._state["last"].update(values)
        self._state["updated_at"] = now_iso()
        if self._conn is not None and values:
            try:
                with self._conn:
                    self._conn.executemany(
                        "INSERT OR REPLACE INTO metrics (run_id, key, step, value) "
                        "VALUES (?, ?, ?, ?)",
                        [(self.run_id, k, step, v) for k, v in values.items()],
                    )
                    self._conn.execute(
                        "UPDATE runs SET last_step = MAX(last_step, ?), updated_at = ? "
                        "WHERE id = ?",
                        (step, self._state["updated_at"], self.run_id),
                    )
            except sqlite3.Error as e:
                self._disable(e)
        self._write_state()

    def truncate(self, step: int) -> None:
        """Forget metrics after `step`: a resumed run repeats the steps after its checkpoint."""
        self._state["step"] = step
        if self._conn is None:
            return
        try:
            with self._conn:
                self._conn.execute(
                    "DELETE FROM metrics WHERE run_id = ? AND step > ?", (self.run_id, step)
                )
                self._conn.execute(
                    "UPDATE runs SET last_step = ? WHERE id = ?", (step, self.run_id)
                )
        except sqlite3.Error as e:
            self._disable(e)

    def finish(self, status: str, metrics: Mapping[str, Any] | None = None) -> None:
        """Mark the run done, failed or stopped, with its final metrics; later calls do nothing."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES}, not {status!r}")
        if self._finished:
            return
        self._finished = True
        final = dict(metrics or {})
        ended = now_iso()
        self._state.update(status=status, ended_at=ended, updated_at=ended, final_metrics=final)
        if self._conn is not None:
            try:
                with self._conn:
                    self._conn.execute(
                        "UPDATE runs SET status = ?, ended_at = ?, updated_at = ?, "
                        "final_metrics = ? WHERE id = ?",
                        (status, ended, ended, json.dumps(final, default=str), self.run_id),
                    )
            except sqlite3.Error as e:
                self._disable(e)
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        self._write_state(force=True)

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.finish("done")
        elif isinstance(exc, KeyboardInterrupt) or getattr(exc, "exit_code", None) == 0:
            self.finish("stopped", {"reason": str(exc) or type(exc).__name__})
        else:
            self.finish("failed", {"error": f"{type(exc).__name__}: {exc}"})

    def _disable(self, e: sqlite3.Error) -> None:
        log.warning("run tracking off for the rest of this run: %s: %s", self.db_path, e)
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _write_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._state_written < STATE_INTERVAL_S:
            return
        self._state_written = now
        try:
            _write_json(self.run_dir / STATE_FILE, self._state)
        except OSError as e:
            log.warning("cannot write %s: %s", self.run_dir / STATE_FILE, e)
