"""`albor data verify` (provenance drift) and `albor recipes`."""

from __future__ import annotations

from pathlib import Path

import click

from albor.cli.common import Exit, emit_json, out
from albor.errors import ArtifactError, ConfigError

# ----- other verbs ---------------------------------------------------------------------------


@click.group(name="data")
def data_group() -> None:
    """Check data artifacts: provenance and integrity."""


DRIFT_KINDS = ("missing", "modified", "extra", "inputs", "sources")


@data_group.command(name="verify")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def data_verify_cmd(directory: Path, as_json: bool) -> None:
    """Re-hash every output of the artifact in DIRECTORY (or of every artifact below it, e.g. a
    pipeline workdir) against its manifest, and check its inputs and sources are unchanged;
    exit 1 on any drift."""
    from albor.artifact import find_artifacts
    from albor.stage import verify_artifact

    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory (give an artifact dir or a workdir)")
    found = find_artifacts(directory)
    if not found:
        raise ArtifactError(f"{directory}: no manifest.json here or below: nothing to verify")
    report = [verify_artifact(art) for art in found]
    ok = all(r["ok"] for r in report)
    if as_json:
        emit_json({"ok": ok, "artifacts": report})
    else:
        for r in report:
            if r["ok"]:
                out.print(f"[green]✓[/] {r['artifact']} ({r['stage']}): {r['files']} files match")
            else:
                problems = "; ".join(f"{k}: {', '.join(r[k])}" for k in DRIFT_KINDS if r[k])
                out.print(f"[red]✗[/] {r['artifact']} ({r['stage']}): {problems}")
    if not ok:
        raise Exit(1)


@click.command(name="recipes")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def recipes_cmd(as_json: bool) -> None:
    """List the packaged recipes (pipeline manifests and stage configs) with their paths."""
    from albor.pipeline import list_recipes

    found = list_recipes()
    if as_json:
        emit_json({"recipes": found})
        return
    from rich.table import Table

    table = Table(title="packaged recipes (pass the name or the path)", title_justify="left")
    for col in ("name", "kind", "description", "path"):
        table.add_column(col)
    for r in found:
        table.add_row(r["name"], r["kind"], r["description"], r["path"])
    out.print(table)
