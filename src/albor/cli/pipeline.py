"""`albor pipeline plan|apply|status`: a manifest's stages as one DAG."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from albor import progress
from albor.cli.common import Exit, emit_json, err, out
from albor.errors import AlborError, PreflightFailed

# ----- pipeline ------------------------------------------------------------------------------

MANIFEST_HELP = (
    "Pipeline manifest (a file or a recipe name); default: the packaged `default` recipe."
)


def pipeline_options(f: Any) -> Any:
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(f)
    f = click.option("--workdir", type=click.Path(path_type=Path), help="Override the workdir.")(f)
    f = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="STAGE.KEY=VALUE",
        help="Override a stage's config value (repeatable).",
    )(f)
    return click.argument("manifest", required=False)(f)


def selection_options(f: Any) -> Any:
    f = click.option("--force", is_flag=True, help="Run the selected stages even if up to date.")(f)
    f = click.option(
        "--from",
        "start",
        metavar="STAGE",
        help="Run this stage and everything downstream of it, even if up to date.",
    )(f)
    return click.option(
        "--only", multiple=True, metavar="STAGE", help="Run only this stage (repeatable)."
    )(f)


@click.group(name="pipeline")
def pipeline_group() -> None:
    """Run a manifest of stages as a DAG: plan, apply, status."""


@pipeline_group.command(name="plan")
@pipeline_options
@selection_options
@click.option("--verbose", "-v", is_flag=True, help="Show every stage's full plan.")
def pipeline_plan_cmd(
    manifest: str | None,
    overrides: tuple[str, ...],
    workdir: Path | None,
    as_json: bool,
    only: tuple[str, ...],
    start: str | None,
    force: bool,
    verbose: bool,
) -> None:
    """Show for every stage whether apply will run it and why, with its checks and estimates."""
    from albor.pipeline import load_pipeline, plan_pipeline

    pipe = load_pipeline(manifest, overrides, workdir)
    pp = plan_pipeline(pipe, only=only, start=start, force=force)
    if as_json:
        emit_json(pp.to_json())
    else:
        from albor.render import pipeline_plan_view

        out.print(pipeline_plan_view(pp, verbose))
    if not pp.ok:
        raise Exit(1)


@pipeline_group.command(name="apply")
@pipeline_options
@selection_options
def pipeline_apply_cmd(
    manifest: str | None,
    overrides: tuple[str, ...],
    workdir: Path | None,
    as_json: bool,
    only: tuple[str, ...],
    start: str | None,
    force: bool,
) -> None:
    """Run the stages in order, skipping those up to date; after a failure, re-run resumes there."""
    from albor.pipeline import StageEvent, apply_pipeline, load_pipeline

    pipe = load_pipeline(manifest, overrides, workdir)
    if as_json:
        progress.quiet()
    t0 = time.perf_counter()

    def show(ev: StageEvent) -> None:
        if as_json:
            return
        if ev.status == "start":
            err.print(f"[bold]→ {ev.name}[/] ({ev.kind})")
        elif ev.status == "ran":
            out.print(f"[green]✓[/] {ev.name}: done in {ev.wall_time_s:.1f}s  {ev.detail}")
        elif ev.status == "up to date":
            out.print(f"[green]✓[/] {ev.name}: up to date  {ev.detail}")
        elif ev.status == "failed":
            out.print(f"[red]✗[/] {ev.name}: failed after {ev.wall_time_s:.1f}s")
        elif ev.status == "stopped":
            out.print(f"[yellow]■[/] {ev.name}: stopped after {ev.wall_time_s:.1f}s")

    try:
        events = apply_pipeline(pipe, only=only, start=start, force=force, on_event=show)
    except AlborError as e:
        if not as_json and e.exit_code != 0 and not isinstance(e, PreflightFailed):
            err.print(
                f"re-run `albor pipeline apply{' ' + manifest if manifest else ''}` to resume "
                "at the failed stage once it is fixed"
            )
        raise
    if as_json:
        emit_json(
            {
                "pipeline": pipe.manifest.name,
                "workdir": str(pipe.workdir),
                "stages": [
                    {
                        "name": e.name,
                        "status": e.status,
                        "summary": e.detail,
                        "wall_time_s": round(e.wall_time_s, 3),
                    }
                    for e in events
                    if e.status != "start"
                ],
            }
        )
    else:
        out.print(
            f"pipeline {pipe.manifest.name}: finished in {time.perf_counter() - t0:.1f}s, "
            f"outputs in {pipe.workdir}"
        )


@pipeline_group.command(name="status")
@pipeline_options
def pipeline_status_cmd(
    manifest: str | None, overrides: tuple[str, ...], workdir: Path | None, as_json: bool
) -> None:
    """Show each stage's state: up to date or why not, the last run, its summary."""
    from albor.pipeline import load_pipeline, status_pipeline

    pipe = load_pipeline(manifest, overrides, workdir)
    rows = status_pipeline(pipe)
    if as_json:
        emit_json({"pipeline": pipe.manifest.name, "workdir": str(pipe.workdir), "stages": rows})
    else:
        from albor.render import status_view

        out.print(status_view(rows, f"pipeline {pipe.manifest.name} (workdir {pipe.workdir})"))
