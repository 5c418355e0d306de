"""report: the ladder's report as a stage: one HTML page, a Markdown model card, PNG plots and
the collected data (report.json) of the pipeline's workdir (`albor.report`).

    report:
      uses: report
      needs: {stages: [eval-teacher, ..., quantize, export]}

`stages` are the artifacts the report waits for (and reruns when one changes); it reads the
whole workdir, the parent of its output unless `workdir` is set. A stage that failed or never ran
is listed on the page, which still shows everything else. Outside a pipeline, `albor report
WORKDIR` writes the same files without a manifest.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from albor.artifact import read_manifest
from albor.errors import AlborError, ArtifactError, ConfigError
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext

NAME = "report"
INPUTS = ("stages",)


class Config(OutputConfig):
    stages: list[Path] = Field(
        default_factory=list,
        description="Artifact directories the report waits for and is rerun after (the "
        "pipeline's `needs`); the report itself reads every stage of the workdir.",
    )
    workdir: Path | None = Field(
        None, description="Pipeline workdir to report on (default: the parent of `output`)."
    )


def workdir_of(cfg: Config) -> Path | None:
    if cfg.workdir is not None:
        return cfg.workdir
    return cfg.output.parent if cfg.output is not None else None


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    from albor.report.collect import collect
    from albor.report.write import CARD, DATA, PAGE

    ctx = ctx or PlanContext()
    p = Plan(NAME)
    workdir = workdir_of(cfg)
    if workdir is None:
        p.add("workdir", "fail", "no workdir: set `workdir:` or `output:` (its parent is used)")
        return p
    if ctx.is_pending("stages"):
        p.add("stages", "ok", ctx.pending_note("stages"))
    else:
        for path in cfg.stages:
            try:
                read_manifest(path)
                p.add(f"stages {path.name}", "ok", str(path))
            except ArtifactError as e:
                p.add(
                    f"stages {path.name}",
                    "fail",
                    f"{e}; `albor report {workdir}` reports on an incomplete workdir",
                )
    files = [PAGE, CARD, DATA]
    if workdir.is_dir() and not ctx.pending:
        try:
            report = collect(workdir, skip=output_name(cfg))
        except AlborError as e:
            p.add("workdir", "fail", str(e))
            return p
        p.add("workdir", "ok", f"{workdir}: {len(report.stages)} stages")
        for s in report.problems:
            p.add(f"stage {s.name}", "warn", f"{s.status}: {s.detail} (listed on the page)")
        from albor.report.plots import latency_points

        drawable = {
            "loss.png": bool(report.curves),
            "ladder.png": bool(report.variants),
            "quality-latency.png": bool(latency_points(report)),
            "funnel.png": bool(report.funnel),
        }
        files += [f for f, ok in drawable.items() if ok]
        skipped = [f for f, ok in drawable.items() if not ok]
        if skipped:
            p.add("plots", "warn", f"no data for {', '.join(skipped)}: not drawn (page says why)")
        p.estimates["variants"] = len(report.variants)
        p.estimates["training_curves"] = len(report.curves)
    elif not workdir.is_dir() and not ctx.pending:
        p.add("workdir", "fail", f"{workdir}: no such directory: point `workdir:` at a pipeline's")
    p.estimates["files"] = files
    p.actions.append(f"read every stage of {workdir} (manifests, metrics.jsonl)")
    p.actions.append(f"write {', '.join(files)} to {cfg.output}")
    return p


def output_name(cfg: Config) -> str | None:
    """The report's own node name when it writes into the workdir (the stages after it are not
    expected to have run); else None: every report stage of the workdir is left out."""
    workdir = workdir_of(cfg)
    if cfg.output is None or workdir is None:
        return None
    return cfg.output.name if cfg.output.parent.resolve() == workdir.resolve() else None


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    from albor.report.collect import collect
    from albor.report.write import write_report

    workdir = workdir_of(cfg)
    if workdir is None:
        raise ConfigError("report: no workdir: set `workdir:` or `output:`")
    report = collect(workdir, skip=output_name(cfg))
    drawn = write_report(report, ctx.out)
    best = report.best_variant()
    problems = report.problems
    summary = f"{len(report.stages)} stages, {len(report.variants)} variants"
    if best is not None:
        summary += f"; best val bits/byte {best.val_bpb:.4f} ({best.name})"
    if problems:
        summary += f"; {len(problems)} missing or failed ({', '.join(s.name for s in problems)})"
    return Outcome(
        summary=summary,
        metrics={
            "workdir": str(workdir),
            "stages": len(report.stages),
            "problems": {s.name: s.status for s in problems},
            "variants": [v.name for v in report.variants],
            "best_variant": best.name if best else None,
            "plots": {d.key: d.file or f"not drawn: {d.reason}" for d in drawn},
            "contracts": report.contracts_note,
        },
    )
