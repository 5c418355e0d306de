"""A stage type for pipeline tests: writes a corpus of given texts, or fails on request."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from albor.data.corpus import CORPUS_FILE, CorpusWriter, document
from albor.errors import DataError
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, counts

NAME = "fake"
INPUTS = ("input",)
RUNS: list[str] = []


class Config(OutputConfig):
    input: Path | None = Field(None, description="Optional upstream.")
    texts: list[str] = Field(default_factory=lambda: ["x = 1\n"], description="Documents.")
    fail: bool = Field(False, description="Fail in apply.")
    disk_bytes: int = Field(0, ge=0, description="Disk the plan estimates.")


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    p = Plan(NAME)
    p.require("texts", bool(cfg.texts), f"{len(cfg.texts)} texts", "no texts: add some")
    p.estimates["wall_time_s"] = 1.0
    if cfg.disk_bytes:
        p.estimates["disk_bytes"] = cfg.disk_bytes
    return p


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    RUNS.append(ctx.name)
    if cfg.fail:
        raise DataError(f"{ctx.name}: asked to fail")
    with CorpusWriter(ctx.out / CORPUS_FILE) as w:
        for i, t in enumerate(cfg.texts):
            w.write(document(t, f"doc{i}.py", "fake"))
    n = len(cfg.texts)
    return Outcome(summary=f"{n} docs", counts=counts(n, n, {}))
