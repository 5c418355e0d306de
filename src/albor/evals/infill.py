"""HumanEval infilling (Bavarian et al. 2022; the SantaCoder evaluation): mask part of a canonical
solution, let the model write it back from the code on both sides, and score the result.

Tasks are built from the 164 canonical solutions:
- single-line: each non-blank line of the body in turn is the middle; the prompt and the lines
  above it are the prefix, the lines below it the suffix;
- multi-line: each contiguous block of two or more body lines that starts and ends on a non-blank
  line is the middle.

The model sees a FIM prompt in the training layout (`albor.data.fim`, PSM or SPM) after the
document-start EOS and generates the middle until EOS, both with its tokenizer's own ids (an
adopted tokenizer's sentinels, such as StarCoder's `<fim_prefix>`, are not albor's). Each sample
is scored two ways: by running the problem's tests on prefix + middle + suffix in the sandbox
(pass rate), and by exact match of the stripped middle with the stripped truth. `limit` keeps
that many tasks per kind, spread evenly over the whole list so that every part of the benchmark
is represented.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from albor import progress
from albor.artifact import atomic_write_text
from albor.evals.humaneval import CodeProblem, status_counts
from albor.evals.sandbox import Sandbox

Kind = Literal["single-line", "multi-line"]
FimMode = Literal["psm", "spm"]
KINDS: tuple[Kind, ...] = ("single-line", "multi-line")


@dataclass(frozen=True)
class InfillTask:
    """One masked span of a canonical solution."""

    task_id: str  # HumanEval/N/single-line/I or HumanEval/N/multi-line/I-J (body line numbers)
    kind: Kind
    problem: CodeProblem
    prefix: str  # the prompt and the body above the span
    middle: str  # the span, newline included: what the model must write
    suffix: str  # the body below the span

    def program(self, middle: str) -> str:
        """The program the sandbox runs for a generated `middle`."""
        p = self.problem
        return self.prefix + middle + self.suffix + "\n" + p.test + "\n" + f"check({p.entry_point})"


def _body_lines(problem: CodeProblem) -> list[str]:
    return problem.canonical_solution.splitlines(keepends=True)


def single_line_tasks(problems: Sequence[CodeProblem]) -> list[InfillTask]:
    """One task per non-blank line of every canonical solution."""
    tasks = []
    for p in problems:
        lines = _body_lines(p)
        for i, line in enumerate(lines):
            if line.strip():
                tasks.append(
                    InfillTask(
                        f"{p.task_id}/single-line/{i}",
                        "single-line",
                        p,
                        p.prompt + "".join(lines[:i]),
                        line,
                        "".join(lines[i + 1 :]),
                    )
                )
    return tasks


def multi_line_tasks(problems: Sequence[CodeProblem]) -> list[InfillTask]:
    """One task per block of >= 2 body lines that starts and ends on a non-blank line."""
    tasks = []
    for p in problems:
        lines = _body_lines(p)
        for i in range(len(lines)):
            if not lines[i].strip():
                continue
            for j in range(i + 2, len(lines) + 1):
                if lines[j - 1].strip():
                    tasks.append(
                        InfillTask(
                            f"{p.task_id}/multi-line/{i}-{j - 1}",
                            "multi-line",
                            p,
                            p.prompt + "".join(lines[:i]),
                            "".join(lines[i:j]),
                            "".join(lines[j:]),
                        )
                    )
    return tasks


def spread(tasks: Sequence[InfillTask], limit: int | None) -> list[InfillTask]:
    """At most `limit` tasks, evenly spaced over `tasks` (all of them without a limit)."""
    if limit is None or limit >= len(tasks):
        return list(tasks)
    return [tasks[i * len(tasks) // limit] for i in range(limit)]


def build_tasks(problems: Sequence[CodeProblem], kind: Kind, limit: int | None) -> list[InfillTask]:
    make = single_line_tasks if kind == "single-line" else multi_line_tasks
    return spread(make(problems), limit)


def exact_match(generated: str, truth: str) -> bool:
    return generated.strip() == truth.strip()


@dataclass
class InfillReport:
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]

    def write(self, path: Path) -> None:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.rows))


def evaluate(
    tasks: Sequence[InfillTask],
    modes: Sequence[FimMode],
    infill: Callable[[Sequence[tuple[InfillTask, FimMode]]], Iterable[list[str]]],
    sandbox: Sandbox | None,
) -> InfillReport:
    """Generate middles for every task in every mode, then score them (tests and exact match).

    `infill` maps the (task, mode) jobs to their middles, in order (so a generator can batch
    them). Without a sandbox only exact match is scored.
    """
    jobs = [(t, m) for m in modes for t in tasks]
    middles = list(progress.track(infill(jobs), "infilling", total=len(jobs)))
    programs = [t.program(mid) for (t, _), ms in zip(jobs, middles, strict=True) for mid in ms]
    results = iter(sandbox.run_many(programs, "executing infills") if sandbox else [])
    rows: list[dict[str, Any]] = []
    groups: dict[str, dict[str, Any]] = {}
    for (t, mode), ms in zip(jobs, middles, strict=True):
        exact = [exact_match(mid, t.middle) for mid in ms]
        scored = [next(results) for _ in ms] if sandbox else []
        key = f"{t.kind}/{mode}"
        g = groups.setdefault(key, {"tasks": 0, "samples": 0, "exact": 0, "results": []})
        g["tasks"] += 1
        g["samples"] += len(ms)
        g["exact"] += sum(exact)
        g["results"] += scored
        rows.append(
            {
                "task_id": t.task_id,
                "kind": t.kind,
                "mode": mode,
                "middle": t.middle,
                "completions": ms,
                "exact_match": exact,
                "results": [r.to_json() for r in scored],
            }
        )
    metrics: dict[str, Any] = {}
    for key, g in groups.items():
        kind, mode_name = key.split("/")
        entry: dict[str, Any] = {
            "tasks": g["tasks"],
            "samples": g["samples"],
            "exact_match": round(g["exact"] / g["samples"], 6) if g["samples"] else 0.0,
        }
        if sandbox:
            entry["pass_rate"] = round(sum(r.passed for r in g["results"]) / g["samples"], 6)
            entry["statuses"] = status_counts(g["results"])
        metrics.setdefault(kind, {})[mode_name] = entry
    return InfillReport(rows, metrics)
