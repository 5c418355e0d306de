"""The report's PNG plots, drawn with matplotlib's object API on the Agg backend.

Each `draw_*` function takes the collected `Report` and a path, and returns either the path it
wrote or the reason it drew nothing (no data); the page shows that reason in the plot's place.
Figures are made with `matplotlib.figure.Figure`, never through pyplot, so no state is shared
between plots or with a caller that uses pyplot itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: a report is drawn on servers and in CI

from matplotlib.figure import Figure

from albor.report.collect import Report

DPI = 110
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


@dataclass
class Drawn:
    """One plot: the file written (relative to the report dir), or why none was."""

    key: str
    title: str
    file: str | None
    reason: str = ""
    caption: str = ""


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """`a` is at least as good as `b` on both axes and better on one (lower is better)."""
    return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates: lower is better), in
    order of the first coordinate. Equal points are all on the frontier (none beats another)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    frontier: list[int] = []
    best_y = float("inf")
    for i in order:
        x, y = points[i]
        if y < best_y or (frontier and points[frontier[-1]] == (x, y)):
            frontier.append(i)
            best_y = min(best_y, y)
    return frontier


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    # No date in the metadata: the same workdir draws the same bytes.
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    fig.clear()


def draw_loss(report: Report, path: Path) -> Drawn:
    title = "Loss curves of the training stages"
    curves = report.curves
    if not curves:
        return Drawn("loss", title, None, "no training stage with a metrics.jsonl in this workdir")
    cols = min(3, len(curves))
    rows = -(-len(curves) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    for k, c in enumerate(curves):
        ax = fig.add_subplot(rows, cols, k + 1)
        if c.train:
            # distill's train loss is its blended KL / cross-entropy objective, not the val CE
            label = "train objective (KL + CE)" if c.kind == "distill" else "train loss"
            ax.plot(*zip(*c.train, strict=True), color=COLORS[0], label=label)
        if c.val_loss:
            ax.plot(
                *zip(*c.val_loss, strict=True),
                color=COLORS[1],
                marker="o",
                linestyle="--",
                label="val loss",
            )
        ax.set_title(f"{c.stage} ({c.kind})", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    return Drawn(
        "loss",
        title,
        path.name,
        caption="Train loss per logged step; val loss where the stage evaluated (lower is better).",
    )


LADDER_METRICS = (
    ("val_bpb", "val bits/byte (lower is better)"),
    ("pairs_bpb", "pairs bits/byte (lower is better)"),
    ("pass_at_1", "HumanEval pass@1 (higher is better)"),
    ("infill_em", "infill exact match (higher is better)"),
)


def draw_ladder(report: Report, path: Path) -> Drawn:
    title = "The ladder: quality of every variant"
    variants = report.variants
    shown = [
        (k, label)
        for k, label in LADDER_METRICS
        if any(getattr(v, k) is not None for v in variants)
    ]
    if not shown:
        return Drawn("ladder", title, None, "no evaluate stage with quality figures")
    names = [v.name for v in variants]
    fig = Figure(figsize=(max(6.0, 0.9 * len(names) + 2) * 2, 3.4 * (-(-len(shown) // 2))))
    for k, (key, label) in enumerate(shown):
        ax = fig.add_subplot(-(-len(shown) // 2), 2 if len(shown) > 1 else 1, k + 1)
        values = [getattr(v, key) for v in variants]
        xs = range(len(names))
        bars = ax.bar(
            xs,
            [v if v is not None else 0.0 for v in values],
            color=[COLORS[i % len(COLORS)] for i in xs],
        )
        for bar, v in zip(bars, values, strict=True):
            text = "n/a" if v is None else f"{v:.3f}"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.15)
        top = max((v for v in values if v is not None), default=0.0)
        # Bars start at zero; an all-zero panel (pass@1 of a toy model) still gets a scale.
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return Drawn(
        "ladder",
        title,
        path.name,
        caption="One bar per evaluated variant; n/a: the variant was not measured on that task.",
    )


def latency_points(report: Report) -> list[tuple[str, float, float, str]]:
    """(label, decode ms/token, val bits/byte, source) of every variant measured on both."""
    points = [
        (v.name, v.decode_ms, v.val_bpb, "evaluate")
        for v in report.variants
        if v.decode_ms is not None and v.val_bpb is not None
    ]
    points += [
        (f"{report.quantize_stage}:{q.name}", q.decode_ms, q.val_bpb, "quantize")
        for q in report.quantize
        if q.decode_ms is not None and q.val_bpb is not None
    ]
    return [(label, float(x or 0), float(y or 0), src) for label, x, y, src in points]


def label_offsets(xy: list[tuple[float, float]], log_x: bool) -> list[tuple[int, int]]:
    """Text offsets (points) for the labels of `xy`: a label whose point lies close to one
    already labelled (within 8% of the x range and 4% of the y range) goes a line lower, so that
    variants that score alike (int8 beside its full model) stay readable."""
    xs = [math.log10(max(x, 1e-9)) if log_x else x for x, _ in xy]
    ys = [y for _, y in xy]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float, int]] = []
    offsets: list[tuple[int, int]] = []
    for x, y in zip(xs, ys, strict=True):
        line = 0
        while any(
            abs(x - px) < 0.08 * span_x and abs(y - py) < 0.04 * span_y and line == pl
            for px, py, pl in placed
        ):
            line += 1
        placed.append((x, y, line))
        offsets.append((5, 5 - 10 * line))
    return offsets


def draw_latency(report: Report, path: Path) -> Drawn:
    title = "Quality against CPU latency"
    points = latency_points(report)
    if not points:
        return Drawn(
            "latency",
            title,
            None,
            "no variant has both val bits/byte and decode ms/token (evaluate's `speed` task, "
            "or the quantize stage)",
        )
    xy = [(x, y) for _, x, y, _ in points]
    front = pareto_frontier(xy)
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    for src, marker, color in (("evaluate", "o", COLORS[0]), ("quantize", "s", COLORS[2])):
        xs = [x for _, x, _, s in points if s == src]
        ys = [y for _, _, y, s in points if s == src]
        if xs:
            ax.scatter(
                xs,
                ys,
                marker=marker,
                color=color,
                s=40,
                label=f"{src} stage",
                zorder=3,
            )
    fx = [xy[i][0] for i in front]
    fy = [xy[i][1] for i in front]
    ax.step(fx, fy, where="post", color=COLORS[3], linewidth=1.5, label="Pareto frontier", zorder=2)
    ax.scatter(fx, fy, s=160, facecolors="none", edgecolors=COLORS[3], zorder=4)
    on_front = set(front)
    log_x = max(x for x, _ in xy) > 20 * max(min(x for x, _ in xy), 1e-9)
    for i, ((label, x, y, _), offset) in enumerate(
        zip(points, label_offsets(xy, log_x), strict=True)
    ):
        ax.annotate(
            label + (" *" if i in on_front else ""),
            (x, y),
            textcoords="offset points",
            xytext=offset,
            fontsize=8,
            fontweight="bold" if i in on_front else "normal",
        )
    if log_x:
        ax.set_xscale("log")  # llama.cpp and albor's engine differ by orders of magnitude
    ax.set_xlabel("decode ms/token on CPU (lower is better)")
    ax.set_ylabel("val bits/byte (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.margins(0.12)
    _save(fig, path)
    names = ", ".join(points[i][0] for i in front)
    return Drawn(
        "latency",
        title,
        path.name,
        caption=f"Lower left is better. On the Pareto "
        f"frontier (*: no other variant is both faster and better): {names}. Quantize "
        "points are the quantize stage's own measurement.",
    )


def _reason_colors(reasons: list[str]) -> dict[str, object]:
    """A distinct colour per rejection reason; none of them the green of `kept`."""
    import matplotlib as mpl

    cmap = mpl.colormaps["tab20"]
    palette = [cmap(i) for i in range(20) if i not in (4, 5)]  # tab20's greens
    return {r: palette[i % len(palette)] for i, r in enumerate(reasons)}


def draw_funnel(report: Report, path: Path) -> Drawn:
    title = "Data funnel"
    steps = report.funnel
    if not steps:
        return Drawn("funnel", title, None, "no data stage with counts in this workdir")
    with_bytes = [s for s in steps if s.bytes_kept is not None and s.bytes_in]
    panels = [("count", steps)] + ([("bytes", with_bytes)] if with_bytes else [])
    reasons = sorted({r for s in steps for r in s.rejected})
    colors = _reason_colors(reasons)
    fig = Figure(figsize=(12, 0.6 * len(steps) + 2.6))
    legend: dict[str, Any] = {}
    for k, (unit, rows) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ys = list(range(len(rows)))
        # Shares of each stage's input: pairs count functions by the ten thousand, the other
        # stages documents by the thousand, and a shared axis would hide every rejection.
        if unit == "count":
            totals = [max(s.docs_in, 1) for s in rows]
            kept = [100 * s.kept / t for s, t in zip(rows, totals, strict=True)]
            notes = [f"{s.kept:,} of {s.docs_in:,} {s.unit} kept" for s in rows]
        else:
            totals = [max(s.bytes_in or 0, 1) for s in rows]
            kept = [100 * (s.bytes_kept or 0) / t for s, t in zip(rows, totals, strict=True)]
            notes = [
                f"{(s.bytes_kept or 0) / 1e6:,.1f} of {(s.bytes_in or 0) / 1e6:,.1f} MB kept"
                for s in rows
            ]
        legend["kept"] = ax.barh(ys, kept, color="#4c9a2a")
        left = list(kept)
        for r in reasons:
            raw = [
                s.rejected.get(r, 0) if unit == "count" else s.rejected_bytes.get(r, 0)
                for s in rows
            ]
            widths = [100 * v / t for v, t in zip(raw, totals, strict=True)]
            if any(widths):
                legend[f"rejected: {r}"] = ax.barh(ys, widths, left=left, color=colors[r])
                left = [a + b for a, b in zip(left, widths, strict=True)]
        for y, note in zip(ys, notes, strict=True):
            ax.text(
                2,
                y,
                note,
                va="center",
                fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.75, "edgecolor": "none", "pad": 1.5},
            )
        ax.set_yticks(ys, [s.stage for s in rows], fontsize=9)
        ax.invert_yaxis()  # the funnel reads top down, in pipeline order
        ax.set_xlim(0, 100)
        ax.set_xlabel(f"% of the stage's input ({'documents' if unit == 'count' else 'bytes'})")
        ax.set_title(f"kept and rejected by reason: {unit}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.legend(
        list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize=8, frameon=False
    )
    fig.tight_layout(rect=(0, 0.05 + 0.035 * (-(-len(legend) // 4)), 1, 1))
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    fig.clear()
    return Drawn(
        "funnel",
        title,
        path.name,
        caption="Each data stage's input as its kept share "
        "and its rejections by reason (pairs counts functions, ingest files).",
    )


PLOTS = (
    ("loss", "loss.png", draw_loss),
    ("ladder", "ladder.png", draw_ladder),
    ("latency", "quality-latency.png", draw_latency),
    ("funnel", "funnel.png", draw_funnel),
)


def draw_all(report: Report, out: Path) -> list[Drawn]:
    """Every plot into `out`, in page order."""
    return [draw(report, out / name) for _, name, draw in PLOTS]
