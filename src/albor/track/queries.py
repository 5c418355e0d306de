"""What `albor runs ls|show|diff` and the monitor ask of the run database.

A run named by id, id prefix or name (`resolve_run`); a summary of every run (`list_runs`); one
run in full with its curves (`show_run`); two runs compared, config key by key and metric by
metric, with a verdict (`diff_runs`); and the status a run really has when its process is gone
(`effective_status`). All of it only reads: `track/runs.py` owns the schema, and it and
`track/importer.py` write.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from albor.errors import ArtifactError
from albor.track.runs import numeric, parse_time, reading

# Metrics a run detail carries as curves (the others stay in the database).
CURVE_KEYS = ("loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_s")


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
