"""Models and their variants side by side: the figures of several artifacts as one table (`albor
eval compare DIR...`).

Each artifact gives one column or several:

- evaluate: one column, its metrics flattened to dotted keys (`humaneval.pass@1`,
  `perplexity.bits_per_byte`); an artifact of the flat form (perplexity only) reads as a
  `perplexity` task, so both forms line up;
- quantize: a column for the full model and one per variant, from the manifest's rows (val bits
  per byte and its increase, KL to the full model, top-1 agreement, bytes on disk and in memory,
  decode ms/token);
- prune: the model before and after (val bits/byte, sparsity, parameters);
- finetune: the base and the tuned model, scored alike (val loss, bits per completion byte);
- pretrain and distill: the trained model (its final val loss and bits/byte, parameters), so a
  distilled student lines up beside the base pretrained on the same tokens.

By default the table (a row per metric, a column per model) shows the headline figures: bits per
byte, perplexity, pass@k, infilling pass rate and exact match, contamination fractions, the
quantize rows' figures, sparsity and parameters; `patterns` (shell globs over the keys) pick
others. The best value of each metric is marked, lower or higher being better by the metric's
name. Figures scored on validation windows (`val_*`, KL, top-1) are compared only between
columns scored on the same windows (data, tokens, window length): a finetune's bits per
completion byte and a prune's bits per byte of the val split share a name, not a scale, so each
such group gets its own best.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from albor.artifact import read_manifest
from albor.errors import ArtifactError, ConfigError

_LOWER = re.compile(
    r"(^|\.)(loss|perplexity|bits_per_byte(_vs_unigram)?|\w+_fraction"
    r"|val_loss|val_bpb(_increase)?|kl_mean|bytes_disk|bytes_memory|decode_ms_per_token)$"
)
_HIGHER = re.compile(r"(^|\.)(pass@\d+|pass_rate|exact_match|top1_agreement)$")
_HIDDEN = re.compile(r"(^|\.)(unigram|statuses|sandbox|parity)\.")
# Headline figures with no better direction: what a prune did, beside what it cost.
_SHOWN = re.compile(r"^(sparsity|parameters)$")
# Figures that depend on the windows scored: comparable only between rows scored alike.
_SCORED = re.compile(r"^(val_\w+|kl_mean|top1_agreement)$")


@dataclass
class Comparison:
    columns: list[str]
    # {"label", "artifact", "stage", "variant", "model", "scored_on", "metrics": {column: value}}
    rows: list[dict[str, Any]]

    def best(self) -> dict[str, list[int]]:
        """Column -> indexes of the rows with its best value (each of them, on a tie) in every
        group of rows measured alike (a single group unless the column depends on the scored
        windows), where better has a direction and the group has two values or more."""
        out: dict[str, list[int]] = {}
        for col in self.columns:
            if not (_LOWER.search(col) or _HIGHER.search(col)):
                continue
            pick = min if _LOWER.search(col) else max
            groups: dict[str, list[tuple[float, int]]] = {}
            for i, r in enumerate(self.rows):
                v = r["metrics"].get(col)
                if isinstance(v, int | float):
                    basis = r["scored_on"] if _SCORED.match(col) else None
                    groups.setdefault(json.dumps(basis, sort_keys=True), []).append((v, i))
            found = []
            for group in (g for g in groups.values() if len(g) > 1):
                top = pick(v for v, _ in group)
                found += [i for v, i in group if v == top]  # ties are all best
            found.sort()
            if found:
                out[col] = found
        return out

    def to_json(self) -> dict[str, Any]:
        best = self.best()
        return {
            "columns": self.columns,
            "rows": self.rows,
            "best": {col: [self.rows[i]["label"] for i in found] for col, found in best.items()},
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


def _row(
    directory: Path,
    stage: str,
    variant: str | None,
    model: Any,
    metrics: dict[str, Any],
    scored_on: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "label": str(directory) if variant is None else f"{directory}:{variant}",
        "artifact": str(directory),
        "stage": stage,
        "variant": variant,
        "model": str(model or ""),
        "scored_on": scored_on,
        "metrics": flatten(metrics),
    }


def _context(directory: Path, config: dict[str, Any]) -> int | None:
    """The window length a stage scored with: its seq_len, else the context of the model it
    wrote (config.json in the artifact)."""
    if config.get("seq_len"):
        return int(config["seq_len"])
    try:
        written = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    context = written.get("max_position_embeddings")
    return int(context) if isinstance(context, int) else None


def _scored_on(directory: Path, config: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The validation windows a stage scored its model on: comparable figures share these."""
    return {
        "data": config.get("data"),
        "tokens": metrics.get("val_tokens"),
        "seq_len": _context(directory, config),
    }


def _evaluate(directory: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    config = manifest.get("config", {})
    metrics = manifest.get("metrics", {})
    if config.get("tasks") is None:
        metrics = {"perplexity": metrics}
    return [_row(directory, "evaluate", None, config.get("model"), metrics)]


def _quantize(directory: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    config, metrics = manifest.get("config", {}), manifest.get("metrics", {})
    variants = metrics.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise ArtifactError(
            f"{directory}/manifest.json: a quantize artifact without metrics.variants rows: "
            "it was written by an older albor; run quantize again"
        )
    basis = {
        "data": config.get("data"),
        "tokens": metrics.get("val_tokens"),
        "seq_len": metrics.get("seq_len"),
    }
    rows = []
    for name, figures in variants.items():
        # The full model is the input; each variant is a file or directory of the artifact.
        model = config.get("model") if name == "full" else directory / str(figures.get("path"))
        rows.append(_row(directory, "quantize", name, model, figures, basis))
    return rows


def _prune(directory: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    config, m = manifest.get("config", {}), manifest.get("metrics", {})
    basis = _scored_on(directory, config, m)
    params = m.get("parameters", {})
    before = {"val_bpb": m.get("val_bpb_before"), "parameters": params.get("before")}
    after = {
        "val_bpb": m.get("val_bpb_after"),
        "sparsity": m.get("sparsity"),
        "model_sparsity": m.get("model_sparsity"),
        "parameters": params.get("after"),
    }
    return [
        _row(directory, "prune", "before", config.get("model"), before, basis),
        _row(directory, "prune", "after", directory, after, basis),
    ]


def _finetune(directory: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    config, m = manifest.get("config", {}), manifest.get("metrics", {})
    basis = _scored_on(directory, config, m)
    # The base was scored on the same pairs by the same scorer (finetune's `base_*` figures).
    base = {k: m.get(f"base_{k}") for k in ("val_loss", "val_bpb")}
    tuned = {k: m.get(k) for k in ("val_loss", "val_bpb")}
    return [
        _row(directory, "finetune", "base", config.get("base"), base, basis),
        _row(directory, "finetune", "tuned", directory, tuned, basis),
    ]


def _trained(directory: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    config, m = manifest.get("config", {}), manifest.get("metrics", {})
    basis = _scored_on(directory, config, m)
    figures = {k: m.get(k) for k in ("val_loss", "val_bpb", "parameters")}
    return [_row(directory, str(manifest.get("stage")), None, directory, figures, basis)]


_READERS: dict[str, Callable[[Path, dict[str, Any]], list[dict[str, Any]]]] = {
    "evaluate": _evaluate,
    "pretrain": _trained,
    "distill": _trained,
    "quantize": _quantize,
    "prune": _prune,
    "finetune": _finetune,
}


def load(directory: Path) -> list[dict[str, Any]]:
    """The columns of one artifact: where it is, which model (or variant) each scores, their
    flat metrics."""
    manifest = read_manifest(directory)
    stage = manifest.get("stage")
    reader = _READERS.get(str(stage))
    if reader is None:
        raise ArtifactError(
            f"{directory}: an artifact of stage '{stage}'; compare reads the outputs of "
            f"{', '.join(_READERS)}: give their directories"
        )
    return reader(directory, manifest)


def compare(directories: Sequence[Path], patterns: Sequence[str] = ()) -> Comparison:
    """The table of the artifacts' models x metrics (headline metrics, or those matching
    `patterns`)."""
    if not directories:
        raise ConfigError(f"give at least one artifact directory ({', '.join(_READERS)})")
    rows = [row for d in directories for row in load(d)]
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
            k
            for k in keys
            if (_LOWER.search(k) or _HIGHER.search(k) or _SHOWN.match(k)) and not _HIDDEN.search(k)
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


def table(comparison: Comparison, title: str = "albor eval compare") -> Table:
    """A rich table with a row per metric and a column per model or variant (models are few,
    metrics many, so this way it fits a terminal); the best value of each metric in bold, and
    an arrow saying whether lower or higher is better."""
    best = comparison.best()
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    for r in comparison.rows:
        below = r["variant"] or (Path(r["model"]).name if r["model"] else "")
        name = Path(r["artifact"]).name
        header = name + (f"\n{below}" if below and below != name else "")
        t.add_column(header, justify="right", overflow="fold")
    for col in comparison.columns:
        arrow = " ↓" if _LOWER.search(col) else (" ↑" if _HIGHER.search(col) else "")
        cells = []
        for i, r in enumerate(comparison.rows):
            text = _cell(r["metrics"].get(col))
            cells.append(f"[bold green]{text}[/]" if i in best.get(col, ()) else text)
        t.add_row(col + arrow, *cells)
    return t
