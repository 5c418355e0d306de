"""A ladder workdir's run evidence as the falsification contracts read it
(`albor.evals.contracts`): the stages pipeline.json expects and every artifact directory found,
each with its manifest or the reason it has none, and readers of a stage's metrics, config and
step lines that never raise on a malformed file.

    w = Workdir(Path("albor-run"))
    stages, problems = usable(w.of_kind("distill"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from albor.errors import AlborError


@dataclass(frozen=True)
class Stage:
    name: str
    directory: Path
    kind: str | None  # the stage kind, from the manifest or pipeline.json
    manifest: dict[str, Any] | None
    problem: str | None  # why there is no usable manifest


class Workdir:
    """The stages of a workdir: those pipeline.json expects (when it exists) and every
    subdirectory with a manifest, each with its manifest or the reason it has none."""

    def __init__(self, root: Path) -> None:
        from albor.artifact import read_manifest

        self.root = root
        self.notes: list[str] = []
        status = read_json(root / ".albor-pipeline.json")
        self.status: dict[str, Any] = status if isinstance(status, dict) else {}
        expected: dict[str, str | None] = {}
        plan = read_json(root / "pipeline.json")
        if isinstance(plan, dict) and isinstance(plan.get("stages"), list):
            for entry in plan["stages"]:
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                    uses = entry.get("uses")
                    expected[entry["name"]] = uses if isinstance(uses, str) else None
        elif plan is not None:
            self.notes.append(f"{root / 'pipeline.json'} is malformed: ignored")
        names = list(expected)
        if root.is_dir():
            names += sorted(
                p.name
                for p in root.iterdir()
                if p.is_dir() and (p / "manifest.json").exists() and p.name not in expected
            )
        self.stages: dict[str, Stage] = {}
        for name in names:
            directory = root / name
            manifest: dict[str, Any] | None = None
            problem = None
            if (directory / "manifest.json").exists():
                try:
                    manifest = read_manifest(directory)
                except AlborError as e:
                    problem = f"malformed manifest: {e}"
            else:
                problem = self._missing(name)
            kind = manifest.get("stage") if manifest else expected.get(name)
            self.stages[name] = Stage(
                name, directory, kind if isinstance(kind, str) else None, manifest, problem
            )

    def _missing(self, name: str) -> str:
        entry = self.status.get(name)
        if isinstance(entry, dict) and entry.get("status"):
            error = f": {entry['error']}" if entry.get("error") else ""
            return f"stage {name} has no manifest (status {entry['status']}{error})"
        return f"stage {name} has not run (no manifest)"

    def caveats(self) -> list[str]:
        """What may hide evidence from every contract: a malformed pipeline.json, and stages of
        unknown kind (their manifest is unreadable and pipeline.json does not name them)."""
        unknown = [f"{s.name} ({s.problem})" for s in self.stages.values() if s.kind is None]
        if unknown:
            return [*self.notes, f"unreadable stages of unknown kind: {'; '.join(unknown)}"]
        return self.notes

    def of_kind(self, *kinds: str) -> list[Stage]:
        return [s for s in self.stages.values() if s.kind in kinds]

    def failed_error(self, name: str) -> str | None:
        entry = self.status.get(name)
        if isinstance(entry, dict) and entry.get("status") == "failed":
            return str(entry.get("error") or "")
        return None


def read_json(path: Path) -> Any:
    """The JSON at `path`; None when missing, {"__malformed__": ...} when unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        return {"__malformed__": str(e)}


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def metrics_of(stage: Stage) -> dict[str, Any]:
    assert stage.manifest is not None
    metrics = stage.manifest.get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{stage.directory / 'manifest.json'}: metrics is not an object")
    return metrics


def config_of(stage: Stage) -> dict[str, Any]:
    assert stage.manifest is not None
    config = stage.manifest.get("config")
    return config if isinstance(config, dict) else {}


def step_lines(stage: Stage) -> list[dict[str, Any]]:
    from albor.track.metrics import METRICS_FILE, read

    return [r for r in read(stage.directory / METRICS_FILE) if "loss" in r or "grad_norm" in r]


def usable(stages: list[Stage]) -> tuple[list[Stage], list[str]]:
    """The stages with a manifest, and the reasons of those without."""
    ok = [s for s in stages if s.manifest is not None]
    return ok, [s.problem or f"{s.name}: no manifest" for s in stages if s.manifest is None]
