"""`albor STAGE plan|apply|keys` for every stage type, and `albor STAGE watch` for the training
stages."""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import click
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from albor import progress
from albor.cli.common import ALIASES, SET_HELP, Exit, emit_json, err, out
from albor.config import load_config, read_yaml
from albor.errors import ConfigError
from albor.plan import Plan
from albor.stage import (
    DESCRIPTIONS,
    TRAINING_STAGES,
    PlanContext,
    StageConfig,
    load_stage,
    run_stage,
)

# ----- stage commands -------------------------------------------------------------------------


def resolve_stage_config(
    kind: str, config: str, overrides: tuple[str, ...], stage_name: str | None
) -> tuple[ModuleType, StageConfig, str, PlanContext]:
    """A stage config from a stage YAML, or from a pipeline manifest (the stage of that type)."""
    from albor.pipeline import load_pipeline, resolve_path

    module = load_stage(kind)
    path = resolve_path(config)
    data = read_yaml(path)
    if not isinstance(data.get("stages"), dict):
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
        for line in config_key_lines(module.Config.model_fields):
            out.print(line)

    if target in TRAINING_STAGES:
        group.add_command(watch_command(kind, target, epilog))
    return group


def watch_command(kind: str, target: str, epilog: str) -> click.Command:
    """`albor KIND watch` (train, distill, ...): `KIND apply` under the crash-restarting
    supervisor."""

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
        """Run `apply CONFIG` and keep it running: restart it after a crash or a hang.

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
        command = [sys.executable, "-m", "albor", kind, "apply", config]
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


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds (`X`, `X | None`, `list[A | B]`, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _models_in(a)]


def config_key_lines(
    fields: Mapping[str, FieldInfo], prefix: str = "", depth: int = 0
) -> list[str]:
    """One line per key of a config's `model_fields` (default and description), with the keys
    of the nested settings under their parent (`architecture.hidden_size`; the keys of each kind
    of `tasks` entry under `tasks entries with task: humaneval`), two levels deep."""
    lines = []
    indent = "  " * depth
    for key, field in fields.items():
        default = (
            "required"
            if field.is_required()
            else repr(field.get_default(call_default_factory=True))
        )
        lines.append(
            f"{indent}[bold]{prefix}{key}[/] (default {default}): {field.description or ''}"
        )
        if depth >= 2:
            continue
        for sub in _models_in(field.annotation):
            tag = sub.model_fields.get("task")
            kinds = typing.get_args(tag.annotation) if tag is not None else ()
            if kinds:  # one kind of tagged entry, e.g. {task: humaneval, ...}
                lines.append(f"{indent}  {key} entries with task: {kinds[0]}")
                rest = {k: f for k, f in sub.model_fields.items() if k != "task"}
                lines += config_key_lines(rest, "", depth + 2)
            else:
                lines += config_key_lines(sub.model_fields, f"{prefix}{key}.", depth + 1)
    return lines
