"""The `albor` command: the verb table; the only place that prints or exits.

    albor STAGE plan CONFIG [--set key=value ...] [--json]
    albor STAGE apply CONFIG [--set key=value ...] [--force] [--json]
    albor pipeline plan|apply|status [MANIFEST] [--only S] [--from S] [--force] [--json]
    albor complete CHECKPOINT "prefix"
    albor recipes

Exit codes: 0 valid / done, 1 invalid plan or failed apply, 2 usage or config error.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import click
from rich.console import Console

from albor import __version__, progress
from albor.config import load_config, read_yaml
from albor.errors import AlborError, ArtifactError, ConfigError, PlanFailed
from albor.plan import Plan
from albor.stage import DESCRIPTIONS, REGISTRY, PlanContext, StageConfig, load_stage, run_stage

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ALIASES = {"train": "pretrain"}
SET_HELP = (
    "Override a config value, KEY=VALUE with a dotted key (repeatable), e.g. --set max_steps=100."
)


class Exit(Exception):
    """Leave with this code after the message has been shown."""

    def __init__(self, code: int) -> None:
        self.code = code


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


# ----- stage commands -------------------------------------------------------------------------


def resolve_stage_config(
    kind: str, config: str, overrides: tuple[str, ...], stage_name: str | None
) -> tuple[ModuleType, StageConfig, str, PlanContext]:
    """A stage config from a stage YAML, or from a pipeline manifest (the stage of that type)."""
    from albor.pipeline import load_pipeline, resolve_path

    module = load_stage(kind)
    path = resolve_path(config)
    data = read_yaml(path)
    if "stages" not in data:
        if stage_name:
            raise ConfigError(f"--stage {stage_name}: {path} is a stage config, not a pipeline")
        return module, load_config(module.Config, path, overrides), kind, PlanContext()
    candidates = [
        n for n, s in data["stages"].items() if isinstance(s, dict) and s.get("uses") == kind
    ]
    if stage_name:
        if stage_name not in candidates:
            raise ConfigError(
                f"{path}: no stage '{stage_name}' of type {kind} (found: {candidates})"
            )
        name = stage_name
    elif len(candidates) == 1:
        name = candidates[0]
    else:
        found = ", ".join(candidates) or "none"
        raise ConfigError(
            f"{path}: pick the {kind} stage with --stage NAME (stages of that type: {found})"
        )
    pipe = load_pipeline(path, tuple(f"{name}.{o}" for o in overrides))
    node = pipe.nodes[name]
    from albor.stage import state_of

    pending = {}
    for field_name, ups in node.upstream.items():
        stale = [
            u for u in ups if not state_of(pipe.nodes[u].module, pipe.nodes[u].config).up_to_date
        ]
        if stale:
            pending[field_name] = ", ".join(stale)
    return module, node.config, name, PlanContext(pending=pending)


def stage_group(kind: str) -> click.Group:
    target = ALIASES.get(kind, kind)
    help_text = DESCRIPTIONS[target] + (f" (alias of `{target}`)" if target != kind else "")

    @click.group(name=kind, help=help_text, short_help=help_text)
    def group() -> None:
        pass

    config_arg = click.argument("config", metavar="CONFIG")
    common = [
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP),
        click.option(
            "--stage", "stage_name", help="With a pipeline manifest: which stage of this type."
        ),
        click.option(
            "--json", "as_json", is_flag=True, help="Print one JSON object instead of text."
        ),
    ]

    def decorate(f: Any) -> Any:
        for opt in reversed(common):
            f = opt(f)
        return config_arg(f)

    epilog = (
        "CONFIG is a YAML file of this stage's keys, a pipeline manifest (the stage of this "
        "type is "
        "used), or the name of a packaged recipe (`albor recipes`). "
        f"Keys: `albor {kind} keys`."
    )

    @group.command(name="plan", epilog=epilog)
    @decorate
    def plan_cmd(
        config: str, overrides: tuple[str, ...], stage_name: str | None, as_json: bool
    ) -> None:
        """Validate CONFIG and estimate what apply would do; writes nothing.

        Exit 0 when the plan is valid, 1 when a check fails, 2 on a config error."""
        module, cfg, name, ctx = resolve_stage_config(target, config, overrides, stage_name)
        plan: Plan = module.plan(cfg, ctx)
        if as_json:
            emit_json(plan.to_json())
        else:
            from albor.render import plan_view

            out.print(plan_view(plan, name if name == target else f"{name} ({target})"))
        if not plan.ok:
            raise Exit(1)

    @group.command(name="apply", epilog=epilog)
    @decorate
    @click.option("--force", is_flag=True, help="Run even when the output is up to date.")
    def apply_cmd(
        config: str, overrides: tuple[str, ...], stage_name: str | None, as_json: bool, force: bool
    ) -> None:
        """Run the stage: check its plan, do the work, write its artifact atomically.

        Does nothing and says "up to date" when the config and inputs are unchanged."""
        module, cfg, name, _ = resolve_stage_config(target, config, overrides, stage_name)
        if as_json:
            progress.quiet()
        result = run_stage(module, cfg, name=name, force=force)
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun, rank 0 reports for all
        if as_json:
            emit_json(
                {
                    "stage": name,
                    "status": result.status,
                    "output": str(result.output),
                    "manifest": result.manifest,
                }
            )
            return
        if result.status == "up to date":
            out.print(f"{name}: up to date ({result.output})")
        else:
            wall = result.manifest.get("wall_time_s", 0)
            out.print(f"{name}: done in {wall:.1f}s -> {result.output}")
            if result.manifest.get("summary"):
                out.print(f"  {result.manifest['summary']}")

    @group.command(name="keys")
    def keys_cmd() -> None:
        """List this stage's config keys with their defaults and descriptions."""
        module = load_stage(target)
        for key, field in module.Config.model_fields.items():
            default = (
                "required"
                if field.is_required()
                else repr(field.get_default(call_default_factory=True))
            )
            out.print(f"[bold]{key}[/] (default {default}): {field.description or ''}")

    if kind == "train":
        group.add_command(watch_command(target, epilog))
    return group


def watch_command(target: str, epilog: str) -> click.Command:
    """`albor train watch`: run `train apply` under the crash-restarting supervisor."""

    @click.command(name="watch", epilog=epilog)
    @click.argument("config", metavar="CONFIG")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
    @click.option(
        "--stage", "stage_name", help="With a pipeline manifest: which stage of this type."
    )
    @click.option("--max-restarts", default=10, show_default=True, help="Give up after this many.")
    @click.option(
        "--stall-timeout",
        default=600.0,
        show_default=True,
        help="Seconds without a new step (or metrics line) before the run counts as hung.",
    )
    @click.option(
        "--backoff-base", default=30.0, show_default=True, help="First wait before a restart (s)."
    )
    @click.option(
        "--backoff-cap", default=600.0, show_default=True, help="Longest wait before a restart (s)."
    )
    @click.option(
        "--stable-after",
        default=3600.0,
        show_default=True,
        help="A run this long (s) before its crash resets the backoff.",
    )
    @click.option(
        "--kill-grace",
        default=30.0,
        show_default=True,
        help="Seconds between SIGTERM and SIGKILL when stopping a hung run.",
    )
    def watch_cmd(
        config: str,
        overrides: tuple[str, ...],
        stage_name: str | None,
        max_restarts: int,
        stall_timeout: float,
        backoff_base: float,
        backoff_cap: float,
        stable_after: float,
        kill_grace: float,
    ) -> None:
        """Run `train apply CONFIG` and keep it running: restart it after a crash or a hang.

        Each crash is written up in the run dir's crash-reports/ (exit code or signal, what it
        likely means, last step and loss, the tail of stderr); the run resumes from its newest
        checkpoint after an exponential backoff. Ctrl-C / SIGTERM stop the run cleanly (it saves
        a checkpoint). Exit 0 when the run is done or stopped, 1 when the restarts ran out."""
        from albor.stage import require_output
        from albor.train.supervisor import Supervisor, WatchSettings, stage_run_dir

        _, cfg, _, _ = resolve_stage_config(target, config, overrides, stage_name)
        try:
            settings = WatchSettings(
                max_restarts=max_restarts,
                stall_timeout=stall_timeout,
                backoff_base=backoff_base,
                backoff_cap=backoff_cap,
                stable_after=stable_after,
                kill_grace=kill_grace,
            )
        except ValueError as e:
            raise click.UsageError(str(e)) from e
        command = [sys.executable, "-m", "albor", "train", "apply", config]
        for o in overrides:
            command += ["--set", o]
        if stage_name:
            command += ["--stage", stage_name]
        supervisor = Supervisor(
            command,
            stage_run_dir(require_output(cfg).absolute()),
            settings,
            notify=lambda line: err.print(f"watch: {line}", style="yellow", markup=False),
        )
        result = supervisor.run()
        (err if result.exit_code else out).print(f"watch: {result.message}", markup=False)
        if result.exit_code:
            raise Exit(result.exit_code)

    return watch_cmd


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
        if not as_json and e.exit_code != 0:
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


@click.command(name="complete")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("prefix")
@click.option(
    "--max-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Most tokens to generate.",
)
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0.0, 10.0),
    help="0 is greedy; higher samples more freely.",
)
@click.option("--top-k", type=click.IntRange(1), help="Sample only from the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus sampling.")
@click.option("--seed", type=int, help="Seed for sampling, for reproducible output.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def complete_cmd(
    checkpoint: Path,
    prefix: str,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    as_json: bool,
) -> None:
    """Complete PREFIX with the model in CHECKPOINT (a pretrain output or checkpoint dir)."""
    from albor.data.bpe import load_tokenizer
    from albor.infer.engine import complete
    from albor.model.hf import load_pretrained

    model, _ = load_pretrained(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    t0 = time.perf_counter()
    text = complete(
        model,
        tokenizer,
        prefix,
        max_new_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    wall = time.perf_counter() - t0
    if as_json:
        emit_json({"prefix": prefix, "completion": text, "seconds": round(wall, 3)})
    else:
        out.print(prefix, end="", markup=False)
        out.print(text, style="bold", markup=False)


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
    from albor.track.runs import list_runs, prepare

    db = prepare(where)
    rows = list_runs(db)
    if as_json:
        emit_json({"db": str(db), "runs": rows})
        return
    from albor.track.monitor import runs_table

    out.print(runs_table(rows, f"runs in {db}"))


@runs_group.command(name="show")
@click.argument("run")
@runs_where_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def runs_show_cmd(run: str, where: Path | None, as_json: bool) -> None:
    """Show one run: its summary, loss curve, final metrics and config."""
    from albor.track.runs import prepare, show_run

    detail = show_run(prepare(where), run)
    if as_json:
        emit_json(detail)
        return
    from albor.track.monitor import run_view

    out.print(run_view(detail, out.width))


@runs_group.command(name="diff")
@click.argument("run_a")
@click.argument("run_b")
@runs_where_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def runs_diff_cmd(run_a: str, run_b: str, where: Path | None, as_json: bool) -> None:
    """Compare two runs: config key by key, loss curves on one scale and at common steps, final
    metrics, and which is better (val bits/byte, else val loss, else loss)."""
    from albor.track.runs import diff_runs, prepare

    diff = diff_runs(prepare(where), run_a, run_b)
    if as_json:
        emit_json(diff)
        return
    from albor.track.monitor import diff_view

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
    from albor.track.runs import db_path_for, import_run_dir

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
    from albor.track.monitor import Keys, Monitor, dashboard, find_run_dir

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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="albor")
@click.option("--verbose", "-v", is_flag=True, help="Log details (INFO) to stderr.")
def cli(verbose: bool) -> None:
    """albor: build a small, fast, local Python code-completion model end to end.

    Every stage has `plan` (validate and estimate; writes nothing) and `apply` (do it; skipped when
    up to date). `albor pipeline apply` runs the packaged default ladder on the Python standard
    library: ingest -> clean -> split -> tokenizer -> tokenize -> pretrain -> evaluate.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


for _kind in [*REGISTRY, *ALIASES]:
    cli.add_command(stage_group(_kind))
cli.add_command(pipeline_group)
cli.add_command(recipes_cmd)
cli.add_command(data_group)
cli.add_command(complete_cmd)
cli.add_command(runs_group)
cli.add_command(monitor_cmd)


def _fail(message: str, code: int) -> NoReturn:
    err.print("error: " + message, style="red", markup=False)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map errors to exit codes; no traceback for user mistakes.

    A process that torchrun started and that joined a process group leaves it and exits
    without interpreter finalization (see `distributed.leave`).
    """
    try:
        _main(argv)
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    if "torch.distributed" in sys.modules:
        from albor.train import distributed

        distributed.leave(code)
    sys.exit(code)


def _main(argv: list[str] | None) -> None:
    debug = os.environ.get("ALBOR_DEBUG") == "1"
    try:
        cli.main(args=argv, prog_name="albor", standalone_mode=False)
    except Exit as e:
        sys.exit(e.code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except PlanFailed as e:
        _fail(str(e), 1)
    except AlborError as e:
        if e.exit_code == 0:  # a clean stop (e.g. training stopped by a signal, checkpoint saved)
            err.print(str(e), markup=False)
            sys.exit(0)
        if debug:
            raise
        _fail(str(e), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:
        if debug:
            raise
        _fail(
            f"internal error: {type(e).__name__}: {e} (set ALBOR_DEBUG=1 for the traceback, "
            "and please report it)",
            1,
        )
