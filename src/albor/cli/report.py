"""`albor report WORKDIR [--out DIR] [--json]`, beside the stage commands `albor report
plan|apply|keys`: one click group whose first word is either a stage subcommand or the workdir.

Exit 0 when the report was written, even over missing or failed stages (stderr names them);
exit 2 when WORKDIR does not exist or holds no stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from albor.cli.common import emit_json, err, out
from albor.cli.stages import stage_group

# The first word given to the group when it was not a subcommand: a name no subcommand or
# workdir has, so that `albor report plan` still means the stage's plan.
_WORKDIR = "\0workdir"

HELP = """Write the ladder's report of WORKDIR: index.html, model-card.md, PNG plots and
report.json (into WORKDIR/report unless --out is given).

\b
  albor report WORKDIR [--out DIR] [--json]
  albor report plan|apply|keys CONFIG ...   (the pipeline's `report` stage)

Missing or failed stages are listed on the page (and on stderr); the rest is still drawn."""


@click.command(name="report")
@click.argument("workdir", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Directory to write the report into (default: WORKDIR/report).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the collected data as JSON.")
def report_cmd(workdir: Path, out_dir: Path | None, as_json: bool) -> None:
    from albor.report import collect, write_report
    from albor.report.write import CARD, DATA, PAGE

    target = out_dir if out_dir is not None else workdir / "report"
    report = collect(workdir)
    drawn = write_report(report, target)
    files = [PAGE, CARD, DATA, *(d.file for d in drawn if d.file)]
    if report.problems:
        listed = ", ".join(f"{s.name} ({s.status})" for s in report.problems)
        err.print(
            f"report: {len(report.problems)} stage(s) missing or failed: {listed}; the page "
            "lists them and shows the rest",
            style="yellow",
            markup=False,
        )
    if as_json:
        emit_json(
            {
                "out": str(target),
                "files": files,
                "problems": {s.name: s.status for s in report.problems},
                "report": report.to_json(),
            }
        )
        return
    out.print(f"report: {len(report.stages)} stages, {len(report.variants)} variants -> {target}")
    for d in drawn:
        out.print(f"  {d.file}" if d.file else f"  {d.title}: not drawn ({d.reason})", markup=False)
    out.print(f"  open {target / PAGE}", markup=False)


class ReportGroup(click.Group):
    """The stage group of `report` that also takes a workdir as its first word."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [_WORKDIR, *args]
        return super().parse_args(ctx, args)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] == _WORKDIR:
            return "report", report_cmd, args[1:]
        return super().resolve_command(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: Any) -> None:
        formatter.write_usage(ctx.command_path, "WORKDIR [--out DIR] [--json] | COMMAND ...")


def report_group() -> click.Group:
    """`albor report`: the stage commands of `stage_group("report")` plus WORKDIR."""
    stage = stage_group("report")
    return ReportGroup(
        name="report",
        commands=stage.commands,
        help=HELP,
        short_help=stage.short_help,
    )
