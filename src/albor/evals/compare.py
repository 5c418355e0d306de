"""Models side by side: the metrics of several evaluate artifacts as one table (`albor eval
compare DIR...`).

Metrics are flattened to dotted keys (`humaneval.pass@1`, `perplexity.bits_per_byte`); an artifact
of the flat form (perplexity only) reads as a `perplexity` task, so both forms line up. By default
the table (a row per metric, a column per artifact) shows the headline figures: bits per byte,
perplexity, pass@k, infilling pass rate and exact match, contamination fractions; `patterns`
(shell globs over the keys) pick others. The best value of each metric is marked, lower or
higher being better by the metric's name.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from albor.artifact import read_manifest
from albor.errors import ArtifactError, ConfigError

_LOWER = re.compile(r"(^|\.)(loss|perplexity|bits_per_byte(_vs_unigram)?|\w+_fraction)$")
_HIGHER = re.compile(r"(^|\.)(pass@\d+|pass_rate|exact_match)$")
_HIDDEN = re.compile(r"(^|\.)(unigram|statuses|sandbox)\.")


@dataclass
class Comparison:
    columns: list[str]
    rows: list[dict[str, Any]]  # {"artifact", "model", "metrics": {column: value}}

    def best(self) -> dict[str, int]:
        """Column -> index of the row with its best value, where better has a direction."""
        out = {}
        for col in self.columns:
            values = [(r["metrics"].get(col), i) for i, r in enumerate(self.rows)]
            present = [(v, i) for v, i in values if isinstance(v, int | float)]
            if len(present) < 2 or not (_LOWER.search(col) or _HIGHER.search(col)):
                continue
            pick = min if _LOWER.search(col) else max
            out[col] = pick(present)[1]
        return out

    def to_json(self) -> dict[str, Any]:
        best = self.best()
        return {
            "columns": self.columns,
            "rows": self.rows,
            "best": {col: self.rows[i]["artifact"] for col, i in best.items()},
        }


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | int]:
    """Numeric leaves of a nested metrics dict under dotted keys (booleans and text dropped)."""
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = value
    return out


def load(directory: Path) -> dict[str, Any]:
    """One evaluate artifact as a row: where it is, which model it scored, its flat metrics."""
    manifest = read_manifest(directory)
    if manifest.get("stage") != "evaluate":
        raise ArtifactError(
            f"{directory}: an artifact of stage '{manifest.get('stage')}', not evaluate; "
            "give the output directories of evaluate"
        )
    config = manifest.get("config", {})
    metrics = manifest.get("metrics", {})
    if config.get("tasks") is None:
        metrics = {"perplexity": metrics}
    return {
        "artifact": str(directory),
        "model": str(config.get("model") or ""),
        "metrics": flatten(metrics),
    }


def compare(directories: Sequence[Path], patterns: Sequence[str] = ()) -> Comparison:
    """The table of `directories` x metrics (headline metrics, or those matching `patterns`)."""
    if not directories:
        raise ConfigError("give at least one evaluate artifact directory to compare")
    rows = [load(d) for d in directories]
    keys = list(dict.fromkeys(k for r in rows for k in r["metrics"]))
    if patterns:
        columns = [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
        if not columns:
            raise ConfigError(
                f"no metric matches {', '.join(patterns)} (metrics: {', '.join(keys[:12])}"
                f"{', ...' if len(keys) > 12 else ''})"
            )
    else:
        columns = [
            k for k in keys if (_LOWER.search(k) or _HIGHER.search(k)) and not _HIDDEN.search(k)
        ]
    for r in rows:
        r["metrics"] = {k: r["metrics"][k] for k in columns if k in r["metrics"]}
    return Comparison(columns, rows)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}"


def table(comparison: Comparison, title: str = "evaluate artifacts") -> Table:
    """A rich table with a row per metric and a column per artifact (models are few, metrics
    many, so this way it fits a terminal); the best value of each metric in bold, and an arrow
    saying whether lower or higher is better."""
    best = comparison.best()
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    for r in comparison.rows:
        model = Path(r["model"]).name if r["model"] else ""
        header = Path(r["artifact"]).name + (f"\n{model}" if model else "")
        t.add_column(header, justify="right", overflow="fold")
    for col in comparison.columns:
        arrow = " ↓" if _LOWER.search(col) else (" ↑" if _HIGHER.search(col) else "")
        cells = []
        for i, r in enumerate(comparison.rows):
            text = _cell(r["metrics"].get(col))
            cells.append(f"[bold green]{text}[/]" if best.get(col) == i else text)
        t.add_row(col + arrow, *cells)
    return t
