"""`albor runs ls|show|diff|import` and `albor monitor`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from albor.cli.common import emit_json, out

# ----- run tracking: runs, monitor -------------------------------------------------------------

WHERE_HELP = "Pipeline workdir, run dir or runs.db file (default: ./albor-run)."


@click.group(name="runs")
def runs_group() -> None:
    """List, show and compare the training runs recorded in a workdir's run database (runs.db).

    RUN is a run id, a unique prefix of one, or a run name (its latest run). Finished run dirs
    of the workdir that the database lacks (trained before tracking, or with ALBOR_TRACK=0) are
    imported first."""


def runs_where_option(f: Any) -> Any:
    return click.option(
        "--workdir",
        "-w",
        "where",
        type=click.Path(path_type=Path),
        metavar="WORKDIR_OR_DB",
        help=WHERE_HELP,
    )(f)


@runs_group.command(name="ls")
@click.argument("where", required=False, type=click.Path(path_type=Path), metavar="[WORKDIR_OR_DB]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def runs_ls_cmd(where: Path | None, as_json: bool) -> None:
    """List the runs, newest first: id, name, status, steps, final loss, val bits/byte, tok/s,
    duration, start time."""
    from albor.track.importer import prepare
    from albor.track.queries import list_runs

    db = prepare(where)
    rows = list_runs(db)
    if as_json:
        emit_json({"db": str(db), "runs": rows})
        return
    from albor.track.views import runs_table

    out.print(runs_table(rows, f"runs in {db}"))


@runs_group.command(name="show")
@click.argument("run")
@runs_where_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def runs_show_cmd(run: str, where: Path | None, as_json: bool) -> None:
    """Show one run: its summary, loss curve, final metrics and config."""
    from albor.track.importer import prepare
    from albor.track.queries import show_run

    detail = show_run(prepare(where), run)
    if as_json:
        emit_json(detail)
        return
    from albor.track.views import run_view

    out.print(run_view(detail, out.width))


@runs_group.command(name="diff")
@click.argument("run_a")
@click.argument("run_b")
@runs_where_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def runs_diff_cmd(run_a: str, run_b: str, where: Path | None, as_json: bool) -> None:
    """Compare two runs: config key by key, loss curves on one scale and at common steps, final
    metrics, and which is better (val bits/byte, else val loss, else loss)."""
    from albor.track.importer import prepare
    from albor.track.queries import diff_runs

    diff = diff_runs(prepare(where), run_a, run_b)
    if as_json:
        emit_json(diff)
        return
    from albor.track.views import diff_view

    out.print(diff_view(diff, out.width))


@runs_group.command(name="import")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--db",
    type=click.Path(path_type=Path),
    help="Run database to add them to (default: runs.db beside each run dir).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def runs_import_cmd(run_dirs: tuple[Path, ...], db: Path | None, as_json: bool) -> None:
    """Add finished run dirs (manifest.json + metrics.jsonl) to a run database; importing one
    twice changes nothing."""
    from albor.track.importer import import_run_dir
    from albor.track.runs import db_path_for

    done = []
    for run_dir in run_dirs:
        target = db or db_path_for(run_dir)
        done.append(
            {"run_dir": str(run_dir), "id": import_run_dir(target, run_dir), "db": str(target)}
        )
    if as_json:
        emit_json({"imported": done})
        return
    for d in done:
        out.print(f"{d['run_dir']}: run {d['id']} in {d['db']}")


@click.command(name="monitor")
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--once", is_flag=True, help="Show the current state once and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as a JSON object.")
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds between refreshes.",
)
@click.option(
    "--peak-tflops",
    type=click.FloatRange(0, min_open=True),
    help="The device's peak TFLOP/s (e.g. 989 for an H100 in bf16), to show MFU.",
)
def monitor_cmd(
    run_dir: Path | None, once: bool, as_json: bool, interval: float, peak_tflops: float | None
) -> None:
    """Watch a training run live: loss and val loss curves, learning rate, grad norm, tokens/s,
    MFU, ETA and memory; q or Ctrl-C quits.

    RUN_DIR is a pretrain output, its .NAME.partial dir while it trains, or a workdir (its most
    recently written run); default ./albor-run. A finished run shows its final state."""
    from albor.track.monitor import Keys, Monitor, find_run_dir
    from albor.track.views import dashboard

    monitor = Monitor(find_run_dir(run_dir), peak_flops=peak_tflops * 1e12 if peak_tflops else None)
    if as_json:
        emit_json(monitor.poll().to_json())
        return
    if once or not out.is_terminal:
        out.print(dashboard(monitor.poll(), out.width))
        return
    from rich.live import Live

    try:
        with (
            Keys() as keys,
            Live(dashboard(monitor.poll(), out.width), console=out, auto_refresh=False) as live,
        ):
            while keys.wait(interval) not in ("q", "Q"):
                live.update(dashboard(monitor.poll(), out.width), refresh=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is the way out of a live view, not an error
