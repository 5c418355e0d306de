"""The run database: every training run, its config, its metrics by step and how it ended.

One SQLite file per workdir, `WORKDIR/runs.db` (a stage run on its own: beside its output dir,
i.e. `db_path_for(run_dir)`). The training loop writes to it through `RunTracker`; finished run
dirs made without tracking are added by `import_run_dir` (which `albor runs` does by itself for
the run dirs of the workdir it is given). `albor runs ls|show|diff` read it.

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

from albor.artifact import output_dir_for, read_manifest
from albor.errors import ArtifactError
from albor.track.metrics import METRICS_FILE
from albor.track.metrics import read as read_metrics

log = logging.getLogger(__name__)

DB_NAME = "runs.db"
STATE_FILE = "training_state.json"
DEFAULT_WORKDIR = Path("albor-run")
SCHEMA_VERSION = 1
FINAL_STATUSES = ("done", "failed", "stopped")
# training_state.json is rewritten at most this often while logging (and always at open/finish):
# it is for a human watching, and a write per logged step would cost a tiny CPU run real time.
STATE_INTERVAL_S = 1.0
# Metrics a run detail carries as curves (the others stay in the database).
CURVE_KEYS = ("loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_s")

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


# ----- writing: the tracker the training loop calls --------------------------------------------


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


# ----- importing finished run dirs --------------------------------------------------------------


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


# ----- reading ---------------------------------------------------------------------------------


def pid_alive(pid: int | None, host: str | None) -> bool | None:
    """Whether process `pid` on `host` still runs; None when that cannot be told from here."""
    if pid is None or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return None
    return True


def effective_status(status: str, pid: int | None, host: str | None) -> str:
    """The recorded status, except that a running run whose process is gone is 'interrupted'
    (killed without a chance to record it: SIGKILL, out of memory, a power cut)."""
    if status == "running" and pid_alive(pid, host) is False:
        return "interrupted"
    return status


def resolve_run(conn: sqlite3.Connection, ref: str) -> str:
    """The id of the run `ref` names: an id, a run name (its latest run), or a unique id prefix.

    A name is tried before prefixes so that a run named like hex digits ("cafe") stays
    reachable by its name."""
    row = conn.execute(
        "SELECT id FROM runs WHERE id = ? UNION ALL "
        "SELECT id FROM (SELECT id FROM runs WHERE name = ? ORDER BY started_at DESC LIMIT 1)",
        (ref, ref),
    ).fetchone()
    if row is not None:
        return str(row["id"])
    rows = conn.execute(
        "SELECT id FROM runs WHERE substr(id, 1, ?) = ? ORDER BY started_at",
        (len(ref), ref),
    ).fetchall()
    if len(rows) == 1:
        return str(rows[0]["id"])
    if len(rows) > 1:
        ids = ", ".join(r["id"] for r in rows[:8])
        raise ArtifactError(f"run id prefix '{ref}' is ambiguous ({ids}): give more digits")
    raise ArtifactError(
        f"no run '{ref}' (give a run id, a prefix of one, or a run name; see `albor runs ls`)"
    )


def _latest(conn: sqlite3.Connection, run_id: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The last recorded value of each of `keys` for a run."""
    marks = ", ".join("?" * len(keys))
    rows = conn.execute(
        f"SELECT m.key, m.value FROM metrics m WHERE m.run_id = ? AND m.key IN ({marks}) "
        "AND m.step = (SELECT MAX(step) FROM metrics WHERE run_id = m.run_id AND key = m.key)",
        (run_id, *keys),
    ).fetchall()
    return {r["key"]: float(r["value"]) for r in rows}


def _summary(conn: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
    final = json.loads(row["final_metrics"] or "{}")
    latest = _latest(conn, row["id"], ("loss", "val_loss", "val_bpb", "tokens_per_s", "tokens"))
    status = effective_status(row["status"], row["pid"], row["host"])
    began, ended = parse_time(row["started_at"]), parse_time(row["ended_at"])
    if ended is None:
        ended = datetime.now(UTC) if status == "running" else parse_time(row["updated_at"])
    duration = (ended - began).total_seconds() if began and ended else None

    def pick(key: str, final_key: str | None = None) -> float | None:
        value = numeric(final.get(final_key or key))
        return value if value is not None else latest.get(key)

    return {
        "id": row["id"],
        "name": row["name"],
        "stage": row["stage"],
        "status": status,
        "steps": int(final.get("steps") or row["last_step"] or 0),
        "final_loss": pick("loss", "final_loss"),
        "val_loss": pick("val_loss"),
        "val_bpb": pick("val_bpb"),
        "tokens_per_s": pick("tokens_per_s"),
        "tokens": pick("tokens"),
        "duration_s": round(duration, 1) if duration is not None else None,
        "started_at": row["started_at"],
        "ended_at": row["ended_at"],
        "source": row["source"],
        "output_dir": row["output_dir"],
        "run_dir": row["run_dir"],
    }


def list_runs(db_path: Path) -> list[dict[str, Any]]:
    """A summary of every run, newest first."""
    with reading(db_path) as conn:
        rows = conn.execute("SELECT * FROM runs ORDER BY started_at DESC, id").fetchall()
        return [_summary(conn, r) for r in rows]


def curves(
    conn: sqlite3.Connection, run_id: str, keys: tuple[str, ...] = CURVE_KEYS
) -> dict[str, list[list[float]]]:
    """The (step, value) series of each of `keys` recorded for a run, by step."""
    marks = ", ".join("?" * len(keys))
    found: dict[str, list[list[float]]] = {}
    for r in conn.execute(
        f"SELECT key, step, value FROM metrics WHERE run_id = ? AND key IN ({marks}) "
        "ORDER BY key, step",
        (run_id, *keys),
    ):
        found.setdefault(r["key"], []).append([r["step"], r["value"]])
    return found


def show_run(db_path: Path, ref: str) -> dict[str, Any]:
    """Everything about one run: summary, config, final metrics, info and its curves."""
    with reading(db_path) as conn:
        run_id = resolve_run(conn, ref)
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        return {
            "run": _summary(conn, row),
            "config": json.loads(row["config"]),
            "final_metrics": json.loads(row["final_metrics"] or "{}"),
            "info": json.loads(row["info"] or "{}"),
            "fingerprint": row["fingerprint"],
            "curves": curves(conn, run_id),
        }


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config as dotted keys, e.g. {"architecture.num_layers": 4}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Final metrics compared by `diff`, and which direction is better (-1: lower is better).
COMPARED = (
    ("final_loss", -1),
    ("val_loss", -1),
    ("val_bpb", -1),
    ("tokens_per_s", 1),
    ("steps", 0),
    ("tokens", 0),
    ("duration_s", -1),
)
# The metric the verdict rests on: the first of these both runs have.
VERDICT_KEYS = (("val_bpb", "val bits/byte"), ("val_loss", "val loss"), ("final_loss", "loss"))


def _at_common_steps(
    a: list[list[float]], b: list[list[float]], most: int
) -> list[dict[str, float]]:
    """Up to `most` evenly spaced steps both series have (always the last), with both values."""
    va, vb = dict((int(s), v) for s, v in a), dict((int(s), v) for s, v in b)
    common = sorted(set(va) & set(vb))
    if len(common) > most:
        common = [common[round(i * (len(common) - 1) / (most - 1))] for i in range(most)]
    return [{"step": s, "a": va[s], "b": vb[s], "delta": vb[s] - va[s]} for s in common]


def diff_runs(db_path: Path, ref_a: str, ref_b: str, points: int = 10) -> dict[str, Any]:
    """Two runs compared: config key by key, final metrics, loss curves at common steps, and a
    verdict on the first of val bits/byte, val loss, loss that both have (lower is better)."""
    a, b = show_run(db_path, ref_a), show_run(db_path, ref_b)
    fa, fb = flatten(a["config"]), flatten(b["config"])
    config_diff = [
        {"key": k, "a": fa.get(k), "b": fb.get(k)}
        for k in sorted(set(fa) | set(fb))
        if fa.get(k) != fb.get(k)
    ]
    final = []
    for key, direction in COMPARED:
        va, vb = a["run"].get(key), b["run"].get(key)
        delta = vb - va if va is not None and vb is not None else None
        final.append({"key": key, "a": va, "b": vb, "delta": delta, "better": direction})
    verdict: dict[str, Any] = {"metric": None, "better": None, "summary": "nothing to compare"}
    for key, label in VERDICT_KEYS:
        va, vb = a["run"].get(key), b["run"].get(key)
        if va is None or vb is None:
            continue
        rel = (vb - va) / abs(va) if va else 0.0
        better = None if vb == va else "b" if vb < va else "a"
        who = {"a": a["run"]["id"], "b": b["run"]["id"]}.get(better or "", "")
        verdict = {
            "metric": key,
            "a": va,
            "b": vb,
            "relative": round(rel, 5),
            "better": better,
            "summary": (
                f"same {label} ({va:.4g})"
                if better is None
                else f"{'B' if better == 'b' else 'A'} ({who}) is better on {label}: "
                f"{vb:.4g} vs {va:.4g} ({rel:+.1%})"
            ),
        }
        break
    ca, cb = a["curves"], b["curves"]
    return {
        "a": a["run"],
        "b": b["run"],
        "config_diff": config_diff,
        "final": final,
        "loss_at_steps": _at_common_steps(ca.get("loss", []), cb.get("loss", []), points),
        "val_loss_at_steps": _at_common_steps(
            ca.get("val_loss", []), cb.get("val_loss", []), points
        ),
        "curves": {
            "a": {k: ca.get(k, []) for k in ("loss", "val_loss")},
            "b": {k: cb.get(k, []) for k in ("loss", "val_loss")},
        },
        "verdict": verdict,
    }
