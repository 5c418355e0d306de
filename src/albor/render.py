"""Turn plans, pipeline plans and stage results into rich renderables for the terminal.

Only builds what to show; `cli.py` decides where and whether to print it.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from albor.pipeline import PipelinePlan
from albor.plan import Plan

ICON = {"ok": "[green]✓[/]", "warn": "[yellow]![/]", "fail": "[red]✗[/]"}


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt_value(v) for v in value)
    return str(value)


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(flatten(value, name + "."))
        else:
            rows.append((name, value))
    return rows


def plan_view(plan: Plan, title: str | None = None) -> RenderableType:
    parts: list[RenderableType] = []
    verdict = "[green]valid[/]" if plan.ok else "[red]invalid[/]"
    parts.append(Text.from_markup(f"[bold]{title or plan.stage}[/] plan: {verdict}"))
    if plan.checks:
        checks = Table(show_header=False, box=None, padding=(0, 1))
        for c in plan.checks:
            checks.add_row(ICON[c.status], c.name, c.detail)
        parts.append(checks)
    if plan.estimates:
        est = Table(
            title="estimates", title_justify="left", show_header=False, box=None, padding=(0, 1)
        )
        est.add_column(no_wrap=True)
        est.add_column(overflow="fold")
        for key, value in flatten(plan.estimates):
            est.add_row(f"  {key}", fmt_value(value))
        parts.append(est)
    if plan.actions:
        parts.append(Text("apply will:", style="bold"))
        for a in plan.actions:
            parts.append(Text(f"  - {a}"))
    return Group(*parts)


def pipeline_plan_view(pp: PipelinePlan, verbose: bool = False) -> RenderableType:
    m = pp.pipeline.manifest
    table = Table(
        title=f"pipeline {m.name}  ({pp.pipeline.source}, workdir {m.workdir})",
        title_justify="left",
    )
    table.add_column("stage")
    table.add_column("uses")
    table.add_column("will run")
    table.add_column("why")
    table.add_column("checks")
    for s in pp.stages:
        fails = [c for c in s.plan.checks if c.status == "fail"]
        warns = [c for c in s.plan.checks if c.status == "warn"]
        if fails and s.run:
            check = "[red]" + "; ".join(f"{c.name}: {c.detail}" for c in fails) + "[/]"
        elif warns:
            check = "[yellow]" + "; ".join(f"{c.name}: {c.detail}" for c in warns) + "[/]"
        else:
            check = "[green]ok[/]"
        run = "[bold]yes[/]" if s.run else "no"
        table.add_row(s.name, s.kind, run, s.reason, check)
    parts: list[RenderableType] = [table]
    for c in pp.checks:
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}[c.status]
        parts.append(Text.from_markup(f"[{colour}]{c.name}[/]: ") + Text(c.detail))
    totals = pp.totals()
    if totals:
        unknown = pp.unestimated("wall_time_s")
        parts.append(
            Text(
                "totals for the stages that will run: "
                + ", ".join(f"{k} {fmt_value(v)}" for k, v in totals.items())
                + (
                    f" (wall time not yet known for {', '.join(unknown)})"
                    if unknown and "wall_time_s" in totals
                    else ""
                )
            )
        )
    if verbose:
        for s in pp.stages:
            if s.run:
                parts.append(plan_view(s.plan, f"{s.name} ({s.kind})"))
    return Group(*parts)


def status_view(rows: list[dict[str, Any]], title: str) -> RenderableType:
    table = Table(title=title, title_justify="left")
    for col in ("stage", "uses", "state", "last run", "summary", "time"):
        table.add_column(col)
    for r in rows:
        state = "[green]up to date[/]" if r["up_to_date"] else f"[yellow]{r['reason']}[/]"
        last = r["last_status"]
        if r.get("error"):
            last = f"[red]failed: {r['error']}[/]"
        wall = f"{r['wall_time_s']:.1f}s" if r.get("wall_time_s") is not None else ""
        table.add_row(r["name"], r["uses"], state, last, r["summary"], wall)
    return table
