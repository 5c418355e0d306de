"""HumanEval infilling: the task construction (1033 single-line tasks, as in Bavarian et al. and
SantaCoder), the truth always passes, a wrong middle fails, and exact match is stripped."""

from __future__ import annotations

import pytest

from albor.evals import infill
from albor.evals.humaneval import CodeProblem, load_humaneval
from albor.evals.sandbox import Sandbox, SandboxConfig


@pytest.fixture(scope="module")
def problems() -> list[CodeProblem]:
    return load_humaneval()


def test_task_construction(problems: list[CodeProblem]) -> None:
    single = infill.single_line_tasks(problems)
    assert len(single) == 1033
    multi = infill.multi_line_tasks(problems)
    assert len(multi) > len(single)
    for t in single[:50] + multi[::97]:
        assert t.prefix + t.middle + t.suffix == t.problem.prompt + t.problem.canonical_solution
        assert t.prefix.startswith(t.problem.prompt) and t.middle.strip()
    assert all(t.middle.count("\n") == 1 for t in single)
    assert all(t.middle.count("\n") >= 2 for t in multi)
    assert single[0].task_id == "HumanEval/0/single-line/0"


def test_spread_keeps_every_part_of_the_benchmark(problems: list[CodeProblem]) -> None:
    tasks = infill.single_line_tasks(problems)
    some = infill.spread(tasks, 100)
    assert len(some) == 100 and len({t.task_id for t in some}) == 100
    assert some[0] is tasks[0] and int(some[-1].problem.task_id.split("/")[1]) >= 160
    assert infill.spread(tasks, None) == tasks and infill.spread(tasks[:3], 10) == tasks[:3]


def test_truth_passes_and_wrong_middles_fail(problems: list[CodeProblem]) -> None:
    tasks = infill.build_tasks(problems, "single-line", 40) + infill.build_tasks(
        problems, "multi-line", 20
    )
    box = Sandbox(SandboxConfig(timeout_s=10.0))
    truth = infill.evaluate(tasks, ["psm"], lambda jobs: ([t.middle] for t, _ in jobs), box)
    for kind in ("single-line", "multi-line"):
        m = truth.metrics[kind]["psm"]
        assert m["pass_rate"] == 1.0 and m["exact_match"] == 1.0, (kind, m)
    assert truth.metrics["single-line"]["psm"]["tasks"] == 40
    # A middle that raises fails every task (an empty one may not: a comment line can be masked).
    wrong = infill.evaluate(
        tasks, ["psm", "spm"], lambda jobs: (["    raise RuntimeError('x')\n"] for _ in jobs), box
    )
    for kind in ("single-line", "multi-line"):
        for mode in ("psm", "spm"):
            m = wrong.metrics[kind][mode]
            assert m["pass_rate"] == 0.0 and m["exact_match"] == 0.0
    assert len(wrong.rows) == 2 * len(tasks) and wrong.rows[0]["mode"] == "psm"


def test_exact_match_is_stripped_and_needs_no_sandbox(problems: list[CodeProblem]) -> None:
    tasks = infill.build_tasks(problems, "single-line", 5)
    assert infill.exact_match("  return x  \n", "    return x\n")
    report = infill.evaluate(
        tasks, ["spm"], lambda jobs: ([t.middle.strip(), "x"] for t, _ in jobs), None
    )
    m = report.metrics["single-line"]["spm"]
    assert m == {"tasks": 5, "samples": 10, "exact_match": 0.5}
