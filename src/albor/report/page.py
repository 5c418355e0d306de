"""The report's HTML page: one self-contained `index.html` beside its PNGs.

No JavaScript, no external URL (fonts, CSS and images are local or inline), and every string
that came from a workdir (stage names, configs, errors) goes through `html.escape`: a manifest is
data, never markup.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from albor.report.collect import Report, Variant
from albor.report.plots import Drawn

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
  max-width: 1200px; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem;
  margin-top: 2.2rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #d0d0d0; padding: 0.3rem 0.6rem; text-align: left;
  vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.problems { background: #fff4f2; border: 1px solid #e0a59c; padding: 0.6rem 1rem; }
.ok { color: #1a7f37; } .fails, .failed { color: #b42318; font-weight: bold; }
.missing, .partial, .not-run { color: #9a6700; }
img { max-width: 100%; border: 1px solid #eee; }
figure { margin: 1rem 0; } figcaption { color: #555; font-size: 0.9rem; }
pre { background: #f7f7f7; padding: 0.5rem; overflow-x: auto; font-size: 0.82rem; }
details { margin: 0.3rem 0; } summary { cursor: pointer; }
.muted { color: #666; }
"""


def e(value: Any) -> str:
    return escape(str(value), quote=True)


def fmt(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{n} B"


def human_count(n: int | None) -> str:
    if n is None:
        return "–"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def table(headers: list[str], rows: list[list[str]], numeric: set[int] | None = None) -> str:
    """A table of already-escaped cells; `numeric` columns align right."""
    numeric = numeric or set()
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def variant_rows(variants: list[Variant]) -> list[list[str]]:
    return [
        [
            e(v.name),
            e(v.eval_stage),
            e(v.model_stage or "–"),
            fmt(v.val_bpb),
            fmt(v.pairs_bpb),
            fmt(v.pass_at_1),
            fmt(v.infill_em),
            fmt(v.decode_ms, 2),
            human_count(v.parameters),
            human_bytes(v.size_bytes),
        ]
        for v in variants
    ]


VARIANT_HEADERS = [
    "variant",
    "evaluate stage",
    "model",
    "val bits/byte",
    "pairs bits/byte",
    "HumanEval pass@1",
    "infill exact match",
    "decode ms/token",
    "parameters",
    "weights on disk",
]


def _problems(report: Report) -> str:
    if not report.problems:
        return ""
    items = "".join(
        f'<li><b>{e(s.name)}</b> ({e(s.kind or "?")}): <span class="{e(s.status)}">'
        f"{e(s.status)}</span>: {e(s.detail)}</li>"
        for s in report.problems
    )
    return (
        f'<section class="problems"><h2 id="problems">Missing or failed stages '
        f"({len(report.problems)})</h2><p>The report shows what exists; these stages did not "
        f"finish, so their figures are absent.</p><ul>{items}</ul></section>"
    )


def _summary(report: Report) -> str:
    done = sum(s.status == "done" for s in report.stages)
    best = report.best_variant()
    lines = [f"<li>{done} of {len(report.stages)} stages done</li>"]
    if best is not None:
        lines.append(
            f"<li>best variant by val bits/byte: <b>{e(best.name)}</b> ({fmt(best.val_bpb)} "
            f"bits/byte, {human_count(best.parameters)} parameters, "
            f"{human_bytes(best.size_bytes)} of weights"
            + (f", {fmt(best.decode_ms, 2)} ms/token" if best.decode_ms is not None else "")
            + ")</li>"
        )
    if report.final_model:
        lines.append(f"<li>the ladder's final model: <b>{e(report.final_model)}</b></li>")
    if report.quantize:
        smallest = min(report.quantize, key=lambda q: q.bytes_disk or 2**63)
        lines.append(
            f"<li>smallest quantized file: {e(smallest.name)} "
            f"({human_bytes(smallest.bytes_disk)}, val bits/byte {fmt(smallest.val_bpb)})</li>"
        )
    lines.append(f"<li>contracts: {e(report.contracts_note)}</li>")
    ladder = " → ".join(e(s.name) for s in report.stages)
    return (
        f'<h2 id="summary">Summary</h2><ul>{"".join(lines)}</ul>'
        f'<p class="muted">The ladder: {ladder}</p>'
    )


def _ladder(report: Report) -> str:
    """The summary's compact table: each variant's headline figures and size."""
    if not report.variants:
        return '<p class="muted">No evaluate stage has run.</p>'
    rows = [
        [
            e(v.name),
            fmt(v.val_bpb),
            fmt(v.pass_at_1),
            human_count(v.parameters),
            human_bytes(v.size_bytes),
            fmt(v.decode_ms, 2),
        ]
        for v in report.variants
    ]
    return "<h3>The ladder</h3>" + table(
        ["variant", "val bits/byte", "pass@1", "parameters", "weights", "ms/token"],
        rows,
        {1, 2, 3, 4, 5},
    )


def _plots(drawn: list[Drawn]) -> str:
    parts = ['<h2 id="plots">Plots</h2>']
    for d in drawn:
        if d.file is None:
            parts.append(f'<h3>{e(d.title)}</h3><p class="muted">Not drawn: {e(d.reason)}.</p>')
        else:
            parts.append(
                f'<figure><h3>{e(d.title)}</h3><img src="{e(d.file)}" alt="{e(d.title)}">'
                f"<figcaption>{e(d.caption)}</figcaption></figure>"
            )
    return "".join(parts)


def _quantize(report: Report) -> str:
    if not report.quantize:
        return ""
    rows = [
        [
            e(q.name),
            fmt(q.val_bpb, 4),
            fmt(q.kl_mean, 5),
            fmt(q.top1),
            fmt(q.decode_ms, 3),
            human_bytes(q.bytes_disk),
        ]
        for q in report.quantize
    ]
    return f"<h3>Quantized variants (stage {e(report.quantize_stage)})</h3>" + table(
        [
            "variant",
            "val bits/byte",
            "KL mean",
            "top-1 agreement",
            "decode ms/token",
            "bytes on disk",
        ],
        rows,
        {1, 2, 3, 4, 5},
    )


def _contracts(report: Report) -> str:
    head = '<h2 id="contracts">Falsification contracts</h2>'
    if report.contracts is None:
        return head + f'<p class="muted">{e(report.contracts_note)}</p>'
    rows = [
        [
            e(c.id),
            e(c.title),
            f'<span class="{e(c.status.replace(" ", "-"))}">{e(c.status)}</span>',
            e(c.figure),
            e(c.evidence),
        ]
        for c in report.contracts
    ]
    return head + table(["id", "title", "status", "figure", "evidence"], rows)


def _funnel(report: Report) -> str:
    head = '<h2 id="funnel">Data funnel</h2>'
    if not report.funnel:
        return head + '<p class="muted">No data stage with counts.</p>'
    rows = []
    for f in report.funnel:
        rejected = ", ".join(f"{e(k)}: {v:,}" for k, v in f.rejected.items()) or "none"
        check = "in = kept + rejected" if f.balanced else f'<b class="fails">{e(f.note)}</b>'
        rows.append(
            [
                e(f.stage),
                e(f.unit),
                fmt(f.docs_in),
                fmt(f.kept),
                rejected,
                human_bytes(f.bytes_in),
                human_bytes(f.bytes_kept),
                check,
            ]
        )
    return head + table(
        ["stage", "unit", "in", "kept", "rejected by reason", "bytes in", "bytes kept", "check"],
        rows,
        {2, 3, 5, 6},
    )


def _provenance(report: Report) -> str:
    parts = [
        '<h2 id="provenance">Provenance</h2><p class="muted">The sha256 digest of every '
        "artifact, the digests of its inputs and the config that made it.</p>"
    ]
    for p in report.provenance:
        inputs = "".join(
            f"<li>{e(i.get('name'))}: {e(i.get('path'))} <code>{e(i.get('digest'))}</code></li>"
            for i in p.inputs
        )
        config = json.dumps(p.config, indent=2, sort_keys=True, default=str)
        parts.append(
            f"<details><summary><b>{e(p.name)}</b> ({e(p.kind)}) <code>{e(p.digest[:16])}"
            f"</code></summary><p>digest <code>{e(p.digest)}</code>; started "
            f"{e(p.started_at or '–')}; wall time {fmt(p.wall_time_s, 1)} s</p>"
            f"<p>inputs:</p><ul>{inputs or '<li>none</li>'}</ul>"
            f"<p>config:</p><pre>{e(config)}</pre></details>"
        )
    return "".join(parts)


def _timings(report: Report) -> str:
    timed = [p for p in report.provenance if p.wall_time_s is not None]
    if not timed:
        return ""
    total = sum(p.wall_time_s or 0.0 for p in timed)
    rows = [
        [
            e(p.name),
            e(p.kind),
            fmt(p.wall_time_s, 1),
            fmt(100 * (p.wall_time_s or 0) / total, 1) if total else "–",
        ]
        for p in timed
    ]
    rows.append(["<b>total</b>", "", f"<b>{fmt(total, 1)}</b>", "100.0"])
    return '<h2 id="timings">Timings</h2>' + table(
        ["stage", "kind", "wall time (s)", "share (%)"], rows, {2, 3}
    )


def _stages(report: Report) -> str:
    rows = [
        [
            e(s.name),
            e(s.kind or "?"),
            f'<span class="{e(s.status)}">{e(s.status)}</span>',
            e(", ".join(s.needs)),
            e(s.detail),
        ]
        for s in report.stages
    ]
    return '<h2 id="stages">Stages</h2>' + table(
        ["stage", "kind", "status", "needs", "summary or error"], rows
    )


def render_page(report: Report, drawn: list[Drawn]) -> str:
    """The whole page as one HTML string."""
    title = f"albor report: {report.name}"
    desc = f"<p>{e(report.description)}</p>" if report.description else ""
    body = "".join(
        [
            f"<h1>{e(title)}</h1>",
            f'<p class="muted">workdir <code>{e(report.workdir)}</code></p>',
            desc,
            _problems(report),
            _summary(report),
            _ladder(report),
            _plots(drawn),
            '<h2 id="variants">Variants</h2>'
            + (
                table(VARIANT_HEADERS, variant_rows(report.variants), {3, 4, 5, 6, 7, 8, 9})
                if report.variants
                else '<p class="muted">No evaluate stage has run.</p>'
            ),
            _quantize(report),
            _contracts(report),
            _funnel(report),
            _stages(report),
            _provenance(report),
            _timings(report),
            '<p class="muted">Written by <code>albor report</code>. Model card: '
            '<a href="model-card.md">model-card.md</a>; data: <a href="report.json">'
            "report.json</a>.</p>",
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )
