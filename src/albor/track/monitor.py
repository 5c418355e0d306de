"""The live state of a training run, read from its run dir for `albor monitor`.

`Monitor(run_dir).poll()` reads the run dir as it is now: the lines `metrics.jsonl` gained since
the last poll (so a long run costs nothing to watch), the `training_state.json` the tracker keeps
(status, pid, max_steps, facts for MFU), and `manifest.json` once the stage has finished. A run
being trained lives in `WORKDIR/.NAME.partial`, renamed to `WORKDIR/NAME` at the end; the monitor
follows the rename. `find_run_dir` picks the run to watch; `Keys` reads key presses between
polls. The dashboard that draws a `Snapshot` is `track/views.py`.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from albor.artifact import output_dir_for, partial_dir
from albor.errors import AlborError, ArtifactError
from albor.track.metrics import METRICS_FILE, MetricsTail
from albor.track.plot import Point, add_record
from albor.track.queries import effective_status
from albor.track.runs import DEFAULT_WORKDIR, numeric, read_state

# Keys of a metrics.jsonl line the dashboard shows in their own rows; others go under "other".
KNOWN_KEYS = {
    "step",
    "loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
    "val_loss",
    "val_bpb",
    "val_ppl",
    "val_tokens",
    "mfu",
}


# ----- reading a run dir as it grows -------------------------------------------------------------


@dataclass
class Snapshot:
    """What a run looks like now; `to_json` is `albor monitor --json`."""

    run_dir: str
    output_dir: str
    status: str
    run_id: str | None = None
    name: str | None = None
    stage: str | None = None
    pid: int | None = None
    step: int = 0
    max_steps: int | None = None
    progress: float | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    updated_s_ago: float | None = None
    loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    val_ppl: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    model_flops_per_s: float | None = None
    rss_bytes: int | None = None
    other: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[Point]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["curves"] = {k: [[int(s), v] for s, v in pts] for k, pts in self.curves.items()}
        return data


def process_rss(pid: int) -> int | None:
    """Resident memory of process `pid` in bytes (Linux /proc), or None if unknown here."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def config_flops_per_token(run_dir: Path, config: Mapping[str, Any]) -> float | None:
    """Training FLOPs per token estimated from the model's `config.json` (the run dir's, else
    its newest checkpoint's) at the run's `seq_len`; None if there is none yet."""
    found = [run_dir / "config.json"]
    found += sorted((run_dir / "checkpoints").glob("step-*/config.json"), reverse=True)
    path = next((p for p in found if p.is_file()), None)
    if path is None:
        return None
    # Imported here: it pulls in torch, which the rest of the monitor does without.
    from albor.model.estimate import flops_per_token
    from albor.model.hf import from_hf_config

    try:
        mc = from_hf_config(json.loads(path.read_text(encoding="utf-8")))
    except (AlborError, OSError, ValueError):
        return None
    seq = numeric(config.get("seq_len")) or mc.max_seq_len
    return float(flops_per_token(mc, int(seq)))


class Monitor:
    """Follows one run dir; `poll()` returns a fresh `Snapshot`."""

    def __init__(self, run_dir: Path, peak_flops: float | None = None) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.peak_flops = peak_flops
        self._tail = MetricsTail(self.run_dir / METRICS_FILE)
        self.curves: dict[str, list[Point]] = {}
        self.last: dict[str, Any] = {}
        self._prev_train: dict[str, Any] | None = None
        self._last_train: dict[str, Any] | None = None
        self._flops_per_token: float | None = None

    def _follow_rename(self) -> None:
        """At the end of training `.NAME.partial` becomes `NAME`: keep watching it there."""
        if self.run_dir.exists():
            return
        final = output_dir_for(self.run_dir)
        if final != self.run_dir and final.exists():
            self.run_dir = final
            self._tail.path = final / METRICS_FILE

    def _ingest(self) -> None:
        records, restarted = self._tail.read()
        if restarted:
            self.curves, self.last = {}, {}
            self._prev_train = self._last_train = None
        for rec in records:
            add_record(self.curves, rec)
            # A skipped step's loss (null) keeps the last finite value on show.
            self.last.update({k: v for k, v in rec.items() if k != "step" and v is not None})
            if "loss" in rec:
                self._prev_train, self._last_train = self._last_train, rec

    def poll(self) -> Snapshot:
        self._follow_rename()
        self._ingest()
        run_dir = self.run_dir
        state = read_state(run_dir)
        manifest = _read_json(run_dir / "manifest.json")
        config: dict[str, Any] = dict(state.get("config") or manifest.get("config") or {})
        info: dict[str, Any] = dict(state.get("info") or {})
        pid = state.get("pid") if isinstance(state.get("pid"), int) else None
        if manifest:
            status = "done"
        elif state:
            status = effective_status(str(state.get("status")), pid, state.get("host"))
        else:
            status = "unknown"  # no tracker state (tracking predates the run, or was off)
        last = self.last
        step = max((int(s) for s, _ in self.curves.get("loss", [])), default=0)
        step = max(step, int(numeric(state.get("step")) or 0))
        max_steps = numeric(state.get("max_steps")) or numeric(config.get("max_steps"))
        snap = Snapshot(
            run_dir=str(run_dir),
            output_dir=str(output_dir_for(run_dir)),
            status=status,
            run_id=state.get("run_id"),
            name=state.get("name") or manifest.get("name") or output_dir_for(run_dir).name,
            stage=state.get("stage") or manifest.get("stage"),
            pid=pid if status == "running" else None,
            step=step,
            max_steps=int(max_steps) if max_steps else None,
            elapsed_s=numeric(last.get("elapsed_s")),
            loss=numeric(last.get("loss")),
            val_loss=numeric(last.get("val_loss")),
            val_bpb=numeric(last.get("val_bpb")),
            val_ppl=numeric(last.get("val_ppl")),
            lr=numeric(last.get("lr")),
            grad_norm=numeric(last.get("grad_norm")),
            tokens=numeric(last.get("tokens")),
            tokens_per_s=numeric(last.get("tokens_per_s")),
            final_metrics=dict(manifest.get("metrics") or state.get("final_metrics") or {}),
            curves={k: list(v) for k, v in self.curves.items()},
        )
        snap.other = {
            k: v
            for k, v in ((k, numeric(v)) for k, v in last.items() if k not in KNOWN_KEYS)
            if v is not None
        }
        try:
            mtime = os.stat(self._tail.path).st_mtime
            snap.updated_s_ago = round(max(time.time() - mtime, 0.0), 1)
        except OSError:
            pass
        if snap.max_steps:
            snap.progress = min(step / snap.max_steps, 1.0)
            snap.eta_s = 0.0 if status == "done" else self._eta(step, snap.max_steps, status)
        self._time_budget(snap, numeric(config.get("max_time")))
        self._throughput(snap, run_dir, config, info)
        if snap.pid is not None:
            snap.rss_bytes = process_rss(snap.pid)
        return snap

    @staticmethod
    def _time_budget(snap: Snapshot, max_time: float | None) -> None:
        """A run with `max_time` ends when its budget is spent or at max_steps, whichever comes
        first: progress is the larger of the two and the ETA the sooner. The budget counts
        training steps only; the run's elapsed time (validation and checkpoints included) stands
        in for it, so the time figures lean early by what those took."""
        if not max_time or snap.elapsed_s is None:
            return
        snap.progress = max(snap.progress or 0.0, min(snap.elapsed_s / max_time, 1.0))
        if snap.status in ("running", "unknown"):
            left = max(max_time - snap.elapsed_s, 0.0)
            snap.eta_s = round(left if snap.eta_s is None else min(snap.eta_s, left), 1)

    def _eta(self, step: int, max_steps: int, status: str) -> float | None:
        """Seconds left at the recent pace: the last two metrics lines of this process, else
        the process's average tokens/s; None when the run is not going on."""
        if status not in ("running", "unknown") or step >= max_steps:
            return None
        a, b = self._prev_train, self._last_train
        if a and b:
            ds, dt = b["step"] - a["step"], (b.get("elapsed_s") or 0) - (a.get("elapsed_s") or 0)
            if ds > 0 and dt > 0:
                return round((max_steps - step) * dt / ds, 1)
        tokens, rate = numeric(self.last.get("tokens")), numeric(self.last.get("tokens_per_s"))
        if tokens and rate and step:
            return round((max_steps - step) * (tokens / step) / rate, 1)
        return None

    def _throughput(
        self, snap: Snapshot, run_dir: Path, config: Mapping[str, Any], info: Mapping[str, Any]
    ) -> None:
        """Model FLOP/s and MFU: the loop's own `mfu` if it logs one, else FLOPs per token
        (recorded by the tracker, or estimated from config.json) x tokens/s over the peak
        (`--peak-tflops`, or `peak_flops` recorded by the tracker)."""
        snap.mfu = numeric(self.last.get("mfu"))
        fpt = numeric(info.get("flops_per_token")) or self._flops_per_token
        if fpt is None:
            fpt = self._flops_per_token = config_flops_per_token(run_dir, config)
        if fpt is None or not snap.tokens_per_s:
            return
        snap.model_flops_per_s = fpt * snap.tokens_per_s
        peak = self.peak_flops or numeric(info.get("peak_flops"))
        if snap.mfu is None and peak:
            snap.mfu = round(snap.model_flops_per_s / peak, 4)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mtime(path: Path) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def find_run_dir(path: Path | None = None) -> Path:
    """The run dir to watch for a RUN_DIR argument.

    A run dir (it holds metrics.jsonl) is watched, unless its `.NAME.partial` sibling is being
    written more recently (a re-run in progress). A path that does not exist yet is looked for
    as `.NAME.partial` (the first training of NAME). A workdir (default `./albor-run`): its run
    dir, partial ones included, whose metrics changed last.
    """
    base = Path(path) if path is not None else DEFAULT_WORKDIR
    partial = partial_dir(base)
    if (base / METRICS_FILE).is_file():
        if (partial / METRICS_FILE).is_file() and _mtime(partial / METRICS_FILE) >= _mtime(
            base / METRICS_FILE
        ):
            return partial
        return base
    if not base.exists():
        if (partial / METRICS_FILE).is_file():
            return partial
        raise ArtifactError(
            f"{base}: no such run dir or workdir (give a pretrain output, its .NAME.partial "
            "dir while it trains, or a pipeline workdir such as albor-run)"
        )
    found = [d for d in base.iterdir() if d.is_dir() and (d / METRICS_FILE).is_file()]
    if not found:
        raise ArtifactError(
            f"{base}: no training run here ({METRICS_FILE} is written by pretrain; start one "
            "with `albor pipeline apply` or `albor pretrain apply CONFIG`)"
        )
    return max(found, key=lambda d: _mtime(d / METRICS_FILE))


class Keys:
    """Single key presses from the terminal without Enter (cbreak mode, so Ctrl-C still
    interrupts), the terminal restored on exit. Off a terminal, `wait` only sleeps."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._saved: Any = None

    def __enter__(self) -> Keys:
        if sys.platform != "win32" and sys.stdin.isatty():
            import termios
            import tty

            self._fd = sys.stdin.fileno()
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def wait(self, timeout: float) -> str | None:
        """The key pressed within `timeout` seconds, or None."""
        if self._fd is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self._fd], [], [], timeout)
        return os.read(self._fd, 1).decode(errors="replace") if ready else None
