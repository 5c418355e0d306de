"""Terminal views of training runs: the live dashboard of `albor monitor`, the tables of
`albor runs ls|show|diff`.

Everything here builds rich renderables from a `Snapshot` (`track/monitor.py`) or from what
`track/queries.py` returns; `cli/track.py` prints them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from albor.track.monitor import Snapshot
from albor.track.plot import braille_chart, sparkline
from albor.track.queries import flatten
from albor.track.runs import parse_time

STYLES = {"loss": "cyan", "val_loss": "magenta"}


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
