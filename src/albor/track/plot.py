"""Training curves as pictures: block sparklines and braille charts for the terminal, `loss.png`.

The text plots are plain functions of numbers (used by `albor monitor` and `albor runs`); the PNG
is written by `write_loss_plot(run_dir)`, which the training loop calls at each checkpoint.
matplotlib is optional (the `plot` extra): without it the PNG is skipped with one logged note,
and no plotting problem ever stops a training run.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.text import Text

from albor.artifact import output_dir_for
from albor.track.metrics import METRICS_FILE
from albor.track.metrics import read as read_metrics
from albor.track.runs import numeric

log = logging.getLogger(__name__)

BLOCKS = "▁▂▃▄▅▆▇█"
PLOT_FILE = "loss.png"
SMOOTH_FROM = 30  # fewer loss points than this are drawn as they are, without an EMA

Point = tuple[float, float]

# Bit of each dot in a braille cell (2 columns x 4 rows), Unicode's numbering.
_BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
_warned_missing = False


def finite(values: Sequence[float | None]) -> list[float]:
    """The values that are real numbers (a skipped step's loss is None, or NaN in old logs)."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def bucket(values: Sequence[float], width: int) -> list[float]:
    """`values` squeezed (mean per bucket) or kept as they are to at most `width` points."""
    if width <= 0 or not values:
        return []
    if len(values) <= width:
        return list(values)
    out = []
    for i in range(width):
        lo = i * len(values) // width
        hi = max((i + 1) * len(values) // width, lo + 1)
        chunk = values[lo:hi]
        out.append(sum(chunk) / len(chunk))
    return out


def sparkline(
    values: Sequence[float | None],
    width: int = 40,
    lo: float | None = None,
    hi: float | None = None,
) -> str:
    """A one-line block chart of `values` over at most `width` characters.

    `lo`/`hi` fix the scale, so two runs drawn with the same bounds can be compared by eye.
    """
    points = bucket(finite(values), width)
    if not points:
        return ""
    lo = min(points) if lo is None else lo
    hi = max(points) if hi is None else hi
    span = hi - lo
    if span <= 0:
        return BLOCKS[len(BLOCKS) // 2] * len(points)
    top = len(BLOCKS) - 1
    return "".join(BLOCKS[min(max(round((v - lo) / span * top), 0), top)] for v in points)


def braille_chart(
    series: Sequence[Sequence[Point]],
    width: int,
    height: int,
    styles: Sequence[str] = ("cyan", "magenta", "yellow"),
) -> list[Text]:
    """Line charts of several (x, y) series on one braille canvas of `width` x `height` cells,
    with the y range labelled at the left and the x range under it.

    Each cell holds 2 x 4 dots, so the canvas resolves 2*width x 4*height points; a cell any
    later series touches takes that series' style (later series are drawn on top).
    """
    points = [(x, y) for s in series for x, y in s if math.isfinite(y)]
    if not points or width < 12 or height < 2:
        return [Text("(no data yet)", style="dim")]
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    label_w = max(len(_num(y0)), len(_num(y1)))
    cols = max(width - label_w - 1, 4)
    dots_w, dots_h = cols * 2, height * 4
    cells = [[0] * cols for _ in range(height)]
    owner = [[-1] * cols for _ in range(height)]

    def put(dx: int, dy: int, k: int) -> None:
        row, col = dy // 4, dx // 2
        cells[row][col] |= _BRAILLE_BITS[dy % 4][dx % 2]
        owner[row][col] = k

    for k, s in enumerate(series):
        good = [(x, y) for x, y in s if math.isfinite(y)]
        prev: tuple[int, int] | None = None
        for x, y in good:
            dx = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (dots_w - 1))
            dy = round((y1 - y) / (y1 - y0) * (dots_h - 1))
            if prev is not None:
                # Join consecutive points so a sparse series (validation) still reads as a line.
                steps = max(abs(dx - prev[0]), abs(dy - prev[1]), 1)
                for i in range(1, steps):
                    put(
                        prev[0] + round((dx - prev[0]) * i / steps),
                        prev[1] + round((dy - prev[1]) * i / steps),
                        k,
                    )
            put(dx, dy, k)
            prev = (dx, dy)
    lines = []
    for row in range(height):
        label = _num(y1) if row == 0 else _num(y0) if row == height - 1 else ""
        line = Text(label.rjust(label_w) + "┤", style="dim")
        for col in range(cols):
            bits = cells[row][col]
            k = owner[row][col]
            style = styles[k % len(styles)] if k >= 0 else ""
            line.append(chr(0x2800 + bits) if bits else " ", style=style)
        lines.append(line)
    left, right = f"step {_num(x0)}", _num(x1)
    axis = " " * (label_w + 1) + left + " " * max(cols - len(left) - len(right), 1) + right
    lines.append(Text(axis, style="dim"))
    return lines


def _num(v: float) -> str:
    """A short label for an axis value."""
    if v == int(v) and abs(v) < 1e7:
        return str(int(v))
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def read_curves(run_dir: Path) -> dict[str, list[Point]]:
    """Every metric of `run_dir/metrics.jsonl` as a (step, value) series, by key."""
    curves: dict[str, list[Point]] = {}
    for rec in read_metrics(run_dir / METRICS_FILE):
        add_record(curves, rec)
    return curves


def add_record(curves: dict[str, list[Point]], rec: Any) -> None:
    """Append one metrics.jsonl record's finite numeric values to `curves` (keyed by metric).

    Text fields (a `"event": "resume"` line) are no curve, and a skipped step's loss (null) is a
    gap, not a point."""
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
        return
    step = rec["step"]
    for key, value in rec.items():
        number = numeric(value)
        if key != "step" and number is not None:
            curves.setdefault(key, []).append((float(step), number))


def ema(values: Sequence[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average, to show the trend through the per-step noise of the loss."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * v + (1 - alpha) * out[-1])
    return out


def write_loss_plot(run_dir: Path, path: Path | None = None) -> Path | None:
    """Draw the training loss (raw and smoothed), the validation loss and the learning rate of
    `run_dir/metrics.jsonl` into `run_dir/loss.png` (or `path`); the path, or None if skipped.

    Safe to call from the training loop: a missing matplotlib (a broken install: albor depends on
    it) is noted once in the log and any plotting problem is logged as a warning, never raised.
    """
    global _warned_missing
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _warned_missing:
            log.warning(
                "loss plot skipped: matplotlib is not installed, though albor depends on it "
                "(pip install matplotlib)"
            )
            _warned_missing = True
        return None
    target = path or run_dir / PLOT_FILE
    # The plot is a by-product: a full disk or an odd metrics file must not cost the run.
    try:
        curves = read_curves(run_dir)
        loss = [(x, y) for x, y in curves.get("loss", []) if math.isfinite(y)]
        val = [(x, y) for x, y in curves.get("val_loss", []) if math.isfinite(y)]
        lr = curves.get("lr", [])
        if not loss and not val:
            return None
        fig = Figure(figsize=(8, 5.5), dpi=110, layout="constrained")
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
        if loss:
            steps = [x for x, _ in loss]
            raw = [y for _, y in loss]
            if len(raw) >= SMOOTH_FROM:
                top.plot(steps, raw, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
                # About 20 points of memory whatever the length: the trend without much lag.
                smooth = ema(raw, alpha=min(max(20 / len(raw), 0.02), 0.3))
                top.plot(steps, smooth, color="tab:blue", linewidth=2, label="train loss (EMA)")
            else:
                top.plot(steps, raw, color="tab:blue", linewidth=2, label="train loss")
        if val:
            top.plot(
                [x for x, _ in val],
                [y for _, y in val],
                color="tab:red",
                marker="o",
                linewidth=2,
                label="val loss",
            )
        top.set_ylabel("loss (nats/token)")
        latest = [f"step {int((loss or val)[-1][0])}"]
        latest += [f"loss {loss[-1][1]:.4g}"] if loss else []
        latest += [f"val loss {val[-1][1]:.4g}"] if val else []
        top.set_title(f"{output_dir_for(run_dir).name}: {', '.join(latest)}", loc="left")
        top.grid(alpha=0.3)
        top.legend(loc="upper right")
        if lr:
            bottom.plot([x for x, _ in lr], [y for _, y in lr], color="tab:green")
        bottom.set_ylabel("learning rate")
        bottom.set_xlabel("step")
        bottom.grid(alpha=0.3)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, format="png")
        os.replace(tmp, target)  # a reader (the monitor, a browser) never sees half a PNG
        return target
    except Exception as e:  # deliberately broad: see the comment above the try
        log.warning("loss plot not written to %s: %s: %s", target, type(e).__name__, e)
        return None
