"""Terminal views of training runs: the live dashboard of `albor monitor`, the tables of
`albor runs`.

`Monitor(run_dir).poll()` reads the run dir as it is now: the lines `metrics.jsonl` gained since
the last poll (so a long run costs nothing to watch), the `training_state.json` the tracker keeps
(status, pid, max_steps, facts for MFU), and `manifest.json` once the stage has finished. A run
being trained lives in `WORKDIR/.NAME.partial`, renamed to `WORKDIR/NAME` at the end; the monitor
follows the rename. Everything here builds rich renderables or JSON; `cli.py` prints them.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from albor.artifact import output_dir_for, partial_dir
from albor.errors import AlborError, ArtifactError
from albor.track.metrics import METRICS_FILE, MetricsTail
from albor.track.plot import Point, add_record, braille_chart, sparkline
from albor.track.runs import (
    DEFAULT_WORKDIR,
    effective_status,
    flatten,
    numeric,
    parse_time,
    read_state,
)

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
STYLES = {"loss": "cyan", "val_loss": "magenta"}


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
        self._throughput(snap, run_dir, config, info)
        if snap.pid is not None:
            snap.rss_bytes = process_rss(snap.pid)
        return snap

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


# ----- formatting ---------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    s = round(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_num(v: Any, digits: int = 4) -> str:
    """A number for a table cell: n/a when missing, compact for tiny or huge floats."""
    if v is None:
        return "n/a"
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int) or (float(v).is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
        return f"{v:.3g}"
    return f"{v:,.{digits}g}" if abs(v) < 1000 else f"{v:,.0f}"


def fmt_time(iso: str | None, pattern: str = "%Y-%m-%d %H:%M") -> str:
    """An ISO time stamp in local time."""
    t = parse_time(iso)
    return t.astimezone().strftime(pattern) if t else "n/a"


STATUS_STYLE = {
    "running": "bold green",
    "done": "green",
    "failed": "red",
    "interrupted": "red",
    "stopped": "yellow",
    "unknown": "dim",
}


def _status(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


# ----- the live dashboard -------------------------------------------------------------------------


def dashboard(snap: Snapshot, width: int = 100) -> RenderableType:
    """The monitor's frame for `snap`, `width` columns wide."""
    inner = max(width - 4, 30)
    title = Text.assemble(
        ("albor monitor", "bold"),
        f" · {snap.name or '?'}",
        f" ({snap.stage})" if snap.stage else "",
        f" · run {snap.run_id}" if snap.run_id else "",
        " · ",
        _status(snap.status),
    )
    head = Table.grid(padding=(0, 1))
    head.add_column()
    head.add_column()
    head.add_column()
    step = f"step {snap.step:,}" + (f"/{snap.max_steps:,}" if snap.max_steps else "")
    bar: RenderableType = Text("")
    if snap.max_steps:
        bar = ProgressBar(total=snap.max_steps, completed=snap.step, width=max(inner - 52, 10))
    eta = "done" if snap.status == "done" else f"ETA {fmt_duration(snap.eta_s)}"
    pct = f"{snap.progress:.0%}" if snap.progress is not None else ""
    head.add_row(
        Text(step, style="bold"), bar, f"{pct}  {eta}  elapsed {fmt_duration(snap.elapsed_s)}"
    )
    loss = snap.curves.get("loss", [])
    val = snap.curves.get("val_loss", [])
    legend = Text.assemble(
        ("━ loss ", STYLES["loss"]),
        (fmt_num(snap.loss), "bold"),
        "   ",
        ("━ val loss ", STYLES["val_loss"]),
        (fmt_num(snap.val_loss), "bold"),
        "   val bits/byte ",
        (fmt_num(snap.val_bpb), "bold"),
        "   val ppl ",
        (fmt_num(snap.val_ppl), "bold"),
    )
    chart = braille_chart([loss, val], inner, 10, styles=(STYLES["loss"], STYLES["val_loss"]))
    # Fixed label and value widths, so the sparklines get the rest of the line and never wrap.
    label_w, value_w = 14, 12
    spark_w = max(inner - label_w - value_w - 4, 10)
    stats = Table.grid(padding=(0, 2))
    stats.add_column(style="bold", width=label_w, no_wrap=True)
    stats.add_column(justify="right", width=value_w, no_wrap=True)
    stats.add_column(no_wrap=True)
    for label, key, value in (
        ("learning rate", "lr", fmt_num(snap.lr, 3)),
        ("grad norm", "grad_norm", fmt_num(snap.grad_norm, 3)),
        ("tokens/s", "tokens_per_s", fmt_num(snap.tokens_per_s)),
    ):
        values = [v for _, v in snap.curves.get(key, [])]
        stats.add_row(label, value, Text(sparkline(values, spark_w), style="blue"))
    stats.add_row("tokens", fmt_num(snap.tokens), "")
    stats.add_row("MFU", *_mfu_text(snap))
    if snap.rss_bytes:
        stats.add_row("memory", fmt_bytes(snap.rss_bytes), f"RSS of the trainer (pid {snap.pid})")
    else:
        stats.add_row("memory", "n/a", "")
    for other, number in sorted(snap.other.items()):
        stats.add_row(other, fmt_num(number), "")
    foot = Text(
        f"updated {fmt_duration(snap.updated_s_ago)} ago · {snap.run_dir} · q or Ctrl-C quits",
        style="dim",
    )
    return Panel(
        Group(head, Text(""), legend, *chart, Text(""), stats, Text(""), foot),
        title=title,
        title_align="left",
        width=width,
    )


def _mfu_text(snap: Snapshot) -> tuple[str, str]:
    """(MFU, a note on the model FLOP/s behind it)."""
    flops = f"model {snap.model_flops_per_s / 1e12:.3g} TFLOP/s" if snap.model_flops_per_s else ""
    if snap.mfu is not None:
        return f"{snap.mfu:.1%}", flops
    if flops:
        return "n/a", f"{flops}; give --peak-tflops for MFU"
    return "n/a", ""


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


# ----- views of recorded runs (albor runs) --------------------------------------------------------


def runs_table(rows: Sequence[Mapping[str, Any]], title: str) -> Table:
    """`albor runs ls`: one line per run."""
    # A light box and unwrapped cells: the nine columns fit an 80-column terminal.
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0
    )
    for col in ("id", "name", "status"):
        table.add_column(col, no_wrap=True)
    for col in ("steps", "loss", "val bpb", "tok/s", "duration"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("started", no_wrap=True)
    for r in rows:
        table.add_row(
            r["id"],
            r["name"],
            _status(r["status"]),
            fmt_num(r["steps"]),
            fmt_num(r["final_loss"]),
            fmt_num(r["val_bpb"]),
            fmt_num(round(r["tokens_per_s"]) if r["tokens_per_s"] is not None else None),
            fmt_duration(r["duration_s"]),
            fmt_time(r["started_at"], "%m-%d %H:%M"),
        )
    return table


def _kv_table(rows: Sequence[tuple[str, Any]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value if isinstance(value, Text) else fmt_num(value))
    return table


def _flat(data: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return list(flatten(data).items())


def run_view(detail: Mapping[str, Any], width: int = 100) -> RenderableType:
    """`albor runs show`: the run's summary, loss curve, final metrics and config."""
    r = detail["run"]
    spark_w = max(min(width - 30, 80), 10)
    head = Text.assemble(
        ("run ", "bold"),
        (r["id"], "bold"),
        f"  {r['name']} ({r['stage']})  ",
        _status(r["status"]),
        f"  started {fmt_time(r['started_at'])}, {fmt_duration(r['duration_s'])}",
    )
    where = Text(f"output {r['output_dir']}  ({r['source']})", style="dim")
    summary = _kv_table(
        [
            ("steps", r["steps"]),
            ("final loss", r["final_loss"]),
            ("val loss", r["val_loss"]),
            ("val bits/byte", r["val_bpb"]),
            ("tokens", r["tokens"]),
            ("tokens/s", r["tokens_per_s"]),
        ]
    )
    parts: list[RenderableType] = [head, where, Text(""), summary, Text("")]
    for key in ("loss", "val_loss"):
        values = [v for _, v in detail["curves"].get(key, [])]
        if values:
            label = f"{key:<9}{fmt_num(values[0]):>8} "
            parts.append(
                Text.assemble(
                    label,
                    (sparkline(values, spark_w), STYLES[key]),
                    f" {fmt_num(values[-1])}",
                )
            )
    final = [(k, v) for k, v in _flat(detail["final_metrics"]) if not isinstance(v, list)]
    if final:
        parts += [Text(""), Text("final metrics", style="bold underline"), _kv_table(final)]
    parts += [Text(""), Text("config", style="bold underline"), _kv_table(_flat(detail["config"]))]
    return Group(*parts)


def diff_view(diff: Mapping[str, Any], width: int = 100) -> RenderableType:
    """`albor runs diff`: config differences, both loss curves on one scale, final metrics,
    losses at common steps, and the verdict."""
    a, b = diff["a"], diff["b"]
    parts: list[RenderableType] = [
        Text.assemble(("A ", "bold"), f"{a['id']}  {a['name']}  ", _status(a["status"])),
        Text.assemble(("B ", "bold"), f"{b['id']}  {b['name']}  ", _status(b["status"])),
        Text(""),
    ]
    if diff["config_diff"]:
        cfg = Table(title="config: what differs", title_justify="left")
        for col in ("key", "A", "B"):
            cfg.add_column(col)
        for row in diff["config_diff"]:
            cfg.add_row(row["key"], fmt_num(row["a"]), fmt_num(row["b"]))
        parts.append(cfg)
    else:
        parts.append(Text("config: identical"))
    spark_w = max(min(width - 20, 80), 10)
    for key in ("loss", "val_loss"):
        sa = [v for _, v in diff["curves"]["a"].get(key, [])]
        sb = [v for _, v in diff["curves"]["b"].get(key, [])]
        both = sa + sb
        if not both:
            continue
        lo, hi = min(both), max(both)  # one scale, so the two lines compare by eye
        parts.append(Text(f"\n{key} ({fmt_num(lo)} .. {fmt_num(hi)}, same scale)", style="bold"))
        for label, values in (("A", sa), ("B", sb)):
            parts.append(
                Text.assemble(f"{label} ", (sparkline(values, spark_w, lo, hi), STYLES[key]))
            )
    for key, title in (("loss_at_steps", "loss"), ("val_loss_at_steps", "val loss")):
        if diff[key]:
            t = Table(title=f"{title} at common steps", title_justify="left")
            for col in ("step", "A", "B", "B - A"):
                t.add_column(col, justify="right")
            for row in diff[key]:
                t.add_row(
                    fmt_num(row["step"]),
                    fmt_num(row["a"]),
                    fmt_num(row["b"]),
                    f"{row['delta']:+.4f}",
                )
            parts += [Text(""), t]
    final = Table(title="final metrics", title_justify="left")
    for col in ("metric", "A", "B", "B - A"):
        final.add_column(col, justify="left" if col == "metric" else "right")
    for row in diff["final"]:
        delta = row["delta"]
        final.add_row(
            row["key"],
            fmt_num(row["a"]),
            fmt_num(row["b"]),
            _delta_text(delta, row["better"]) if delta is not None else Text("n/a"),
        )
    parts += [Text(""), final, Text(""), Text(diff["verdict"]["summary"], style="bold")]
    return Group(*parts)


def _delta_text(delta: float, better: int) -> Text:
    """B - A, green where B is better, red where worse (by the metric's direction)."""
    style = ""
    if better and delta:
        style = "green" if (delta > 0) == (better > 0) else "red"
    return Text(f"{delta:+,.4g}", style=style)
