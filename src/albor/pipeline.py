"""The pipeline engine: a YAML manifest of stages -> a DAG -> plan / apply / status.

A manifest names stages; each `uses:` a stage type, configures it `with:` and `needs:` the stages
whose outputs are its inputs (a list, matched to the stage type's inputs in order, or a mapping
input -> stage). Every stage writes to WORKDIR/NAME. `apply` runs the stages in topological order,
skips those whose fingerprint matches their output, stops at the first failure leaving finished
stages intact, and so the next `apply` starts again at the failed stage.
"""

from __future__ import annotations

import graphlib
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from albor.artifact import atomic_write_json, read_manifest
from albor.config import apply_overrides, read_yaml, validate
from albor.errors import AlborError, ArtifactError, ConfigError, PreflightFailed
from albor.plan import Check, Plan
from albor.stage import (
    PlanContext,
    RunResult,
    StageConfig,
    input_fields,
    load_stage,
    run_stage,
    state_of,
)

STATE_FILE = ".albor-pipeline.json"
# The DAG as applied (name, description, each stage's type and upstream stages in order), so that
# a report over the workdir knows which stages were expected, including those that never ran.
LAYOUT_FILE = "pipeline.json"
DEFAULT_MANIFEST = "default"


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    uses: str = Field(description="Stage type (see `albor --help` for the list).")
    with_: dict[str, Any] = Field(default_factory=dict, alias="with", description="Stage config.")
    needs: list[str] | dict[str, str | list[str]] = Field(
        default_factory=list,
        description="Upstream stages: a list matched to the inputs in order (all of them for a "
        "stage whose one input takes a list), or input: stage (or input: [stages]).",
    )


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("pipeline", description="Name of the pipeline, shown in plans.")
    description: str = Field("", description="What the pipeline builds.")
    workdir: Path = Field(Path("albor-run"), description="Directory holding every stage's output.")
    stages: dict[str, StageSpec] = Field(description="Stages by name.")


@dataclass
class Node:
    name: str
    kind: str
    module: ModuleType
    config: StageConfig
    upstream: dict[str, list[str]]  # input field -> stage name(s)

    def needs(self) -> set[str]:
        return {up for ups in self.upstream.values() for up in ups}


@dataclass
class Pipeline:
    manifest: Manifest
    source: str
    nodes: dict[str, Node]
    order: list[str]

    @property
    def workdir(self) -> Path:
        return self.manifest.workdir

    def downstream(self, name: str) -> set[str]:
        found = {name}
        for n in self.order:
            if self.nodes[n].needs() & found:
                found.add(n)
        return found


def recipes_dir() -> Path:
    return Path(str(resources.files("albor") / "recipes"))


def list_recipes() -> list[dict[str, str]]:
    """The packaged recipes: name, path and the first line of their description."""
    found = []
    for path in sorted(recipes_dir().glob("*.yaml")):
        data = read_yaml(path)
        found.append(
            {
                "name": path.stem,
                "path": str(path),
                "kind": "pipeline" if "stages" in data else "stage config",
                "description": str(data.get("description", "")).strip().splitlines()[0:1][0]
                if data.get("description")
                else "",
            }
        )
    return found


def resolve_path(arg: str | Path | None) -> Path:
    """A manifest or config argument: an existing file, or the name of a packaged recipe."""
    if arg is None:
        arg = DEFAULT_MANIFEST
    path = Path(arg)
    if path.exists():
        return path
    candidate = recipes_dir() / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and candidate.exists():
        return candidate
    names = ", ".join(r["name"] for r in list_recipes())
    raise ConfigError(
        f"{arg}: no such file, and no packaged recipe of that name (recipes: {names})"
    )


def load_pipeline(
    arg: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    workdir: Path | None = None,
) -> Pipeline:
    """Load and resolve a manifest: stage types, inputs, configs and the order, all validated."""
    path = resolve_path(arg)
    data = read_yaml(path)
    if "stages" not in data:
        raise ConfigError(f"{path}: not a pipeline manifest (no 'stages:' key)")
    manifest = validate(Manifest, data, str(path))
    if workdir is not None:
        manifest.workdir = workdir
    stage_overrides: dict[str, list[str]] = {}
    for item in overrides:
        key = item.partition("=")[0]
        stage, dot, _ = key.partition(".")
        if not dot or stage not in manifest.stages:
            names = ", ".join(manifest.stages)
            raise ConfigError(
                f"--set {item!r}: expected STAGE.KEY=VALUE with STAGE one of: {names}"
            )
        stage_overrides.setdefault(stage, []).append(item.split(".", 1)[1])
    nodes: dict[str, Node] = {}
    for name, spec in manifest.stages.items():
        where = f"{path}: stages.{name}"
        try:
            module = load_stage(spec.uses)
        except ConfigError as e:
            raise ConfigError(f"{where}.uses: {e}") from None
        upstream = _upstream(spec, module, name, manifest, where)
        cfg_data = apply_overrides(spec.with_, stage_overrides.get(name, ()))
        for fld in upstream:
            if fld in cfg_data:
                raise ConfigError(f"{where}.with.{fld}: set both here and by needs (keep one)")
        for fld, ups in upstream.items():
            paths = [str(manifest.workdir / up) for up in ups]
            cfg_data[fld] = paths if _is_list_field(module, fld) else paths[0]
        cfg_data.setdefault("output", str(manifest.workdir / name))
        config = validate(module.Config, cfg_data, f"{where}.with")
        nodes[name] = Node(name, spec.uses, module, config, upstream)
    sorter = graphlib.TopologicalSorter({n: node.needs() for n, node in nodes.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as e:
        cycle = " -> ".join(e.args[1])
        raise ConfigError(
            f"{path}: stages form a cycle: {cycle} (remove one of the needs)"
        ) from None
    return Pipeline(manifest, str(path), nodes, _declared_order(nodes))


def _declared_order(nodes: dict[str, Node]) -> list[str]:
    """A topological order that keeps the manifest's order wherever the needs allow: each
    time, the first declared stage whose upstream stages have all been placed (so plans and
    runs read as the manifest is written)."""
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(nodes):
        name = next(n for n in nodes if n not in placed and nodes[n].needs() <= placed)
        order.append(name)
        placed.add(name)
    return order


def _is_list_field(module: ModuleType, field: str) -> bool:
    annotation = module.Config.model_fields[field].annotation
    return getattr(annotation, "__origin__", None) is list or "list[" in str(annotation)


def _upstream(
    spec: StageSpec, module: ModuleType, name: str, manifest: Manifest, where: str
) -> dict[str, list[str]]:
    inputs = input_fields(module)
    upstream: dict[str, list[str]]
    if isinstance(spec.needs, list):
        if len(inputs) == 1 and _is_list_field(module, inputs[0]) and spec.needs:
            upstream = {inputs[0]: list(spec.needs)}
        elif len(spec.needs) > len(inputs):
            raise ConfigError(
                f"{where}.needs: {len(spec.needs)} stages given but '{spec.uses}' takes "
                f"{len(inputs)} input(s) ({', '.join(inputs) or 'none'})"
            )
        else:
            upstream = {f: [up] for f, up in zip(inputs, spec.needs, strict=False)}
    else:
        unknown = [k for k in spec.needs if k not in inputs]
        if unknown:
            raise ConfigError(
                f"{where}.needs: '{unknown[0]}' is not an input of '{spec.uses}' "
                f"(inputs: {', '.join(inputs) or 'none'})"
            )
        upstream = {
            f: [ups] if isinstance(ups, str) else list(ups) for f, ups in spec.needs.items()
        }
        for f, ups in upstream.items():
            if len(ups) != 1 and not _is_list_field(module, f):
                raise ConfigError(f"{where}.needs.{f}: '{spec.uses}' takes one stage here")
    for ups in upstream.values():
        for up in ups:
            if up not in manifest.stages:
                raise ConfigError(
                    f"{where}.needs: unknown stage '{up}' (stages: {', '.join(manifest.stages)})"
                )
            if up == name:
                raise ConfigError(f"{where}.needs: a stage cannot need itself")
    return upstream


@dataclass
class StagePlan:
    name: str
    kind: str
    run: bool
    reason: str
    plan: Plan
    selected: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uses": self.kind,
            "will_run": self.run,
            "reason": self.reason,
            **{k: v for k, v in self.plan.to_json().items() if k != "stage"},
        }


@dataclass
class PipelinePlan:
    pipeline: Pipeline
    stages: list[StagePlan] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)  # of the whole run: the free disk

    @property
    def ok(self) -> bool:
        return all(s.plan.ok for s in self.stages if s.run) and all(
            c.status != "fail" for c in self.checks
        )

    def failures(self) -> list[str]:
        """Every failing check of a stage that will run, and of the run, as `where: what`."""
        found = [
            f"{s.name}: {c.name}: {c.detail}" for s in self.stages if s.run for c in s.plan.failures
        ]
        return found + [f"{c.name}: {c.detail}" for c in self.checks if c.status == "fail"]

    def totals(self) -> dict[str, float]:
        """Estimates summed over the stages that will run (keys all stages share)."""
        sums: dict[str, float] = {}
        for s in self.stages:
            if not s.run:
                continue
            for key in ("wall_time_s", "disk_bytes"):
                value = s.plan.estimates.get(key)
                if isinstance(value, (int, float)):
                    sums[key] = sums.get(key, 0) + value
        return sums

    def unestimated(self, key: str) -> list[str]:
        """The stages that will run whose plan could not estimate `key` (their inputs do not
        exist yet, or the stage does not estimate it)."""
        return [
            s.name
            for s in self.stages
            if s.run and not isinstance(s.plan.estimates.get(key), (int, float))
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline.manifest.name,
            "manifest": self.pipeline.source,
            "workdir": str(self.pipeline.workdir),
            "ok": self.ok,
            "order": self.pipeline.order,
            "stages": [s.to_json() for s in self.stages],
            "checks": [c.to_json() for c in self.checks],
            "totals": self.totals(),
            "wall_time_unknown_for": self.unestimated("wall_time_s"),
        }


# Room kept free beyond the estimates: they leave out logs, temp files and partial outputs.
DISK_MARGIN = 0.1


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would, once created)."""
    for candidate in (path, *path.resolve().parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(Path.cwd()).free


def disk_check(pp: PipelinePlan) -> Check:
    """The disk the stages that will run estimate, against what the workdir's filesystem has."""
    need = pp.totals().get("disk_bytes", 0.0)
    free = free_disk(pp.pipeline.workdir)
    estimated = [s.name for s in pp.stages if s.run and "disk_bytes" in s.plan.estimates]
    unknown = [s.name for s in pp.stages if s.run and "disk_bytes" not in s.plan.estimates]
    gib = 1 << 30
    known = f"{need / gib:.2f} GiB estimated by {', '.join(estimated) or 'no stage'}"
    if unknown:
        known += f" (not yet known for {', '.join(unknown)}: their inputs do not exist yet)"
    if need * (1 + DISK_MARGIN) > free:
        return Check(
            "disk",
            "fail",
            f"{known}, but {pp.pipeline.workdir} has {free / gib:.2f} GiB free: free some space "
            "or set --workdir on a larger disk",
        )
    return Check("disk", "ok", f"{known}; {free / gib:.1f} GiB free")


def _selection(
    pipe: Pipeline, only: tuple[str, ...], start: str | None
) -> tuple[set[str], set[str]]:
    """(selected stages, stages forced to run) for --only / --from."""
    for name in (*only, *([start] if start else [])):
        if name not in pipe.nodes:
            raise ConfigError(f"unknown stage '{name}' (stages: {', '.join(pipe.order)})")
    selected = set(only) if only else set(pipe.order)
    forced: set[str] = set()
    if start:
        forced = pipe.downstream(start)
        selected &= forced
    return selected, forced


def plan_pipeline(
    pipe: Pipeline, *, only: tuple[str, ...] = (), start: str | None = None, force: bool = False
) -> PipelinePlan:
    """For every stage: will it run and why, and its plan (upstream inputs pending)."""
    selected, forced = _selection(pipe, only, start)
    history = read_state(pipe.workdir)
    result = PipelinePlan(pipe)
    will_run: dict[str, bool] = {}
    for name in pipe.order:
        node = pipe.nodes[name]
        pending = {
            f: ", ".join(u for u in ups if will_run.get(u))
            for f, ups in node.upstream.items()
            if any(will_run.get(u) for u in ups)
        }
        if name not in selected:
            run, reason = False, "not selected"
        elif force or name in forced:
            run, reason = True, "forced"
        elif pending:
            run, reason = True, f"upstream {', '.join(sorted(set(pending.values())))} will run"
        else:
            state = state_of(node.module, node.config)
            run, reason = not state.up_to_date, state.reason
            last = history.get(name, {})
            if run and last.get("status") in ("failed", "stopped"):
                reason = f"{last['status']} last time: {last.get('error', '?')}"
        will_run[name] = run
        plan = node.module.plan(node.config, PlanContext(pending=pending))
        result.stages.append(StagePlan(name, node.kind, run, reason, plan, name in selected))
    result.checks.append(disk_check(result))
    return result


def preflight(
    pipe: Pipeline, *, only: tuple[str, ...] = (), start: str | None = None, force: bool = False
) -> PipelinePlan:
    """Every check that needs no upstream output, for every stage that will run, before any runs.

    Each stage's plan runs with its pending inputs marked, so a package, a tool, a config value or
    the disk that the last stage lacks stops the run in its first second, not after the stages
    before it have worked for minutes.
    """
    pp = plan_pipeline(pipe, only=only, start=start, force=force)
    if not pp.ok:
        problems = pp.failures()
        raise PreflightFailed(
            f"pipeline {pipe.manifest.name}: nothing ran: {len(problems)} problem(s) found "
            "before the first stage:" + "".join(f"\n  - {p}" for p in problems),
            pp,
        )
    return pp


def write_layout(pipe: Pipeline) -> None:
    atomic_write_json(
        pipe.workdir / LAYOUT_FILE,
        {
            "name": pipe.manifest.name,
            "description": pipe.manifest.description,
            "source": pipe.source,
            "stages": [
                {
                    "name": n,
                    "uses": pipe.nodes[n].kind,
                    "needs": sorted(pipe.nodes[n].needs(), key=pipe.order.index),
                }
                for n in pipe.order
            ],
        },
    )


def read_state(workdir: Path) -> dict[str, dict[str, Any]]:
    path = workdir / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _record(workdir: Path, name: str, entry: dict[str, Any]) -> None:
    state = read_state(workdir)
    state[name] = entry
    atomic_write_json(workdir / STATE_FILE, state)


@dataclass
class StageEvent:
    """What happened to one stage during apply; handed to the caller's callback as it goes."""

    name: str
    kind: str
    status: str  # "start" | "ran" | "up to date" | "skipped" | "failed" | "stopped"
    detail: str = ""
    result: RunResult | None = None
    wall_time_s: float = 0.0


def apply_pipeline(
    pipe: Pipeline,
    *,
    only: tuple[str, ...] = (),
    start: str | None = None,
    force: bool = False,
    on_event: Any = None,
) -> list[StageEvent]:
    """Check every stage that will run (`preflight`), then run the selected stages in order;
    raise the first failure after recording it."""
    selected, forced = _selection(pipe, only, start)
    preflight(pipe, only=only, start=start, force=force)
    pipe.workdir.mkdir(parents=True, exist_ok=True)
    write_layout(pipe)
    events: list[StageEvent] = []

    def emit(ev: StageEvent) -> None:
        events.append(ev)
        if on_event is not None:
            on_event(ev)

    for name in pipe.order:
        node = pipe.nodes[name]
        if name not in selected:
            emit(StageEvent(name, node.kind, "skipped", "not selected"))
            continue
        emit(StageEvent(name, node.kind, "start"))
        t0 = time.perf_counter()
        started = datetime.now(UTC).isoformat(timespec="seconds")
        _record(pipe.workdir, name, {"status": "running", "started_at": started})
        try:
            res = run_stage(node.module, node.config, name=name, force=force or name in forced)
        except (AlborError, KeyboardInterrupt) as e:
            msg = str(e) if isinstance(e, AlborError) else "interrupted"
            status = "stopped" if isinstance(e, AlborError) and e.exit_code == 0 else "failed"
            _record(pipe.workdir, name, {"status": status, "error": msg, "started_at": started})
            emit(StageEvent(name, node.kind, status, msg, wall_time_s=time.perf_counter() - t0))
            raise
        wall = time.perf_counter() - t0
        _record(
            pipe.workdir,
            name,
            {"status": "done", "started_at": started, "wall_time_s": round(wall, 3)},
        )
        emit(StageEvent(name, node.kind, res.status, res.manifest.get("summary", ""), res, wall))
    return events


def status_pipeline(pipe: Pipeline) -> list[dict[str, Any]]:
    """Each stage: up to date or not (and why), the last run, its summary and wall time."""
    history = read_state(pipe.workdir)
    rows = []
    for name in pipe.order:
        node = pipe.nodes[name]
        state = state_of(node.module, node.config)
        last = history.get(name, {})
        try:
            manifest = read_manifest(Path(str(node.config.output)))  # type: ignore[attr-defined]
        except ArtifactError:
            manifest = {}
        rows.append(
            {
                "name": name,
                "uses": node.kind,
                "up_to_date": state.up_to_date,
                "reason": state.reason,
                "last_status": last.get("status", "never ran"),
                "error": last.get("error"),
                "summary": manifest.get("summary", ""),
                "wall_time_s": manifest.get("wall_time_s"),
                "output": str(node.config.output),  # type: ignore[attr-defined]
            }
        )
    return rows
