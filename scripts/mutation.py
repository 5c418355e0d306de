"""Mutation testing of the weight transforms and the distillation loss: the score, as JSON.

Run from the repository root, with mutmut installed (the `test` extra has it):

    python scripts/mutation.py              # mutmut run, then the score as one JSON object
    python scripts/mutation.py --no-run     # the score of the last run (mutants/), nothing rerun
    python scripts/mutation.py --diffs      # with each surviving mutant's diff

What is mutated and which tests run is `[tool.mutmut]` in pyproject.toml: every function of
`albor/model/transforms/` and `albor/train/distill.py`, against the transforms' and the
distillation loss's unit tests. mutmut keeps its results in mutants/ and, run again, retests
only the functions that changed since.

The score is killed / (killed + survived), with a mutant that makes the tests time out counted
as killed (the tests noticed it) and one that no selected test reaches ("no tests") counted as
survived (nothing would notice it). `loss_functions` is the same score over distill.py's loss
functions alone (the objectives and the offline data classes around them run whole models and
are tested elsewhere). Exit status: 0 when the score is at least `--min-score` (0.85, the
specification's bar for new code), 1 below it, 2 when mutmut failed or left mutants unchecked.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {
    "albor.model.transforms.merge": "src/albor/model/transforms/merge.py",
    "albor.model.transforms.prune": "src/albor/model/transforms/prune.py",
    "albor.model.transforms.quantize": "src/albor/model/transforms/quantize.py",
    "albor.train.distill": "src/albor/train/distill.py",
}
# distill.py's loss: the functions `kd_loss_sum` and `dense_kd_loss_sum` are made of.
LOSS_FUNCTIONS = frozenset(
    {
        "_check",
        "_compute_dtype",
        "topk_teacher",
        "_kl",
        "_blend",
        "_chunked_sum",
        "kd_loss_sum",
        "dense_kd_loss_sum",
    }
)
KILLED = {"killed", "timeout", "caught by type check"}
SURVIVED = {"survived", "no tests"}
# `mutmut results --all true` prints one "    <module>.x_<function>__mutmut_<n>: <status>" per
# mutant (a method is "<module>.xǁ<Class>ǁ<method>__mutmut_<n>").
_LINE = re.compile(r"^\s*(?P<name>\S+__mutmut_\d+): (?P<status>.+?)\s*$")


def mutmut(*args: str, capture: bool) -> subprocess.CompletedProcess[str]:
    """mutmut of this interpreter's environment, run in the repository root (its config is
    pyproject.toml's); its progress goes to stderr so that stdout stays one JSON object."""
    return subprocess.run(
        [sys.executable, "-m", "mutmut", *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE if capture else sys.stderr,
        check=False,
    )


def parse_results(text: str) -> dict[str, str]:
    """Mutant name -> status, from `mutmut results --all true`."""
    found = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            found[m.group("name")] = m.group("status")
    return found


def split_name(name: str) -> tuple[str, str]:
    """(module, function) of a mutant name; a method's function is "Class.method"."""
    qualified = name.partition("__mutmut_")[0]
    module, _, function = qualified.rpartition(".")
    if function.startswith("xǁ"):
        _, cls, method = function.split("ǁ")
        return module, f"{cls}.{method}"
    return module, function.removeprefix("x_")


def score(counts: Counter[str]) -> dict[str, float | int | None]:
    killed = sum(counts[s] for s in KILLED)
    survived = sum(counts[s] for s in SURVIVED)
    return {
        "score": round(killed / (killed + survived), 4) if killed + survived else None,
        "killed": counts["killed"],
        "timeout": counts["timeout"],
        "survived": counts["survived"],
        "no_tests": counts["no tests"],
        "other": sum(n for s, n in counts.items() if s not in KILLED | SURVIVED),
    }


def report(statuses: dict[str, str], diffs: bool) -> dict[str, object]:
    per_file: dict[str, Counter[str]] = {path: Counter() for path in MODULES.values()}
    loss: Counter[str] = Counter()
    survivors = []
    for name, status in sorted(statuses.items()):
        module, function = split_name(name)
        per_file[MODULES.get(module, module)][status] += 1
        if module == "albor.train.distill" and function in LOSS_FUNCTIONS:
            loss[status] += 1
        if status in SURVIVED:
            entry: dict[str, str] = {"mutant": name, "status": status}
            if diffs:
                entry["diff"] = mutmut("show", name, capture=True).stdout.strip()
            survivors.append(entry)
    total = sum(per_file.values(), Counter())
    return {
        **score(total),
        "mutants": sum(total.values()),
        "not_checked": total["not checked"],
        "files": {path: score(c) for path, c in per_file.items()},
        "loss_functions": score(loss),
        "survivors": survivors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="report the last run only")
    parser.add_argument("--max-children", type=int, default=None, help="mutmut's workers")
    parser.add_argument("--diffs", action="store_true", help="each survivor's diff")
    parser.add_argument("--min-score", type=float, default=0.85, help="exit 1 below this")
    args = parser.parse_args(argv)
    if not args.no_run:
        run_args = ["run"]
        if args.max_children is not None:
            run_args += ["--max-children", str(args.max_children)]
        if mutmut(*run_args, capture=False).returncode != 0:
            print("mutmut run failed: its output above says why", file=sys.stderr)
            return 2
    results = mutmut("results", "--all", "true", capture=True)
    statuses = parse_results(results.stdout)
    if results.returncode != 0 or not statuses:
        print(
            "no mutation results in mutants/: run without --no-run (pip install mutmut first)",
            file=sys.stderr,
        )
        return 2
    out = report(statuses, args.diffs)
    print(json.dumps(out, indent=2, ensure_ascii=False))
    if out["not_checked"]:
        print(f"{out['not_checked']} mutants are not checked yet: run again", file=sys.stderr)
        return 2
    assert isinstance(out["score"], float)
    return 0 if out["score"] >= args.min_score else 1


if __name__ == "__main__":
    sys.exit(main())
