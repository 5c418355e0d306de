"""Throughput of the data stages on the stdlib corpus: ingest -> clean -> split through `run_stage`.

The named baseline, timed in the same run on the same files, is what the work costs without albor:
read every file and `ast.parse` it in a plain loop. ingest + clean against that baseline shows the
overhead of the stages (hashing, Parquet, counting, manifests, the other filters).

`clean` is timed as the pipeline runs it (its plan measures every document once to compare the
profiles, and apply reuses those measures); `clean_profiles` times each profile's apply alone
(`plan_sample_rows: 0`, measures forgotten before each), and `clean_plan` the profile comparison.

Run:  PYTHONPATH=src python benchmarks/data.py [--out DIR]
Prints one JSON object; with --out the artifacts stay in DIR, otherwise in a temp dir.
"""

from __future__ import annotations

import argparse
import ast
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

try:
    import albor
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import albor

import albor.stages.split as split
from albor import progress
from albor.data import filters, sources
from albor.stage import RunResult, run_stage
from albor.stages import clean, ingest

MB = 1e6


def baseline() -> dict[str, Any]:
    """Read and parse the stdlib files in a plain loop: the floor under ingest + clean."""
    paths = [e.path for e in sources.file_entries(sources.StdlibSource())]
    t0 = time.perf_counter()
    texts = []
    nbytes = 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        nbytes += len(data)
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    read_s = time.perf_counter() - t0
    parsed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for text in texts:
            try:
                ast.parse(text)
                parsed += 1
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                pass
    total_s = time.perf_counter() - t0
    return {
        "name": "plain loop: open().read() + decode + ast.parse",
        "files": len(paths),
        "parsed": parsed,
        "mb_in": round(nbytes / MB, 2),
        "read_s": round(read_s, 3),
        "read_mb_per_s": round(nbytes / MB / read_s, 1),
        "seconds": round(total_s, 3),
        "mb_per_s": round(nbytes / MB / total_s, 2),
    }


def timed(module: Any, cfg: Any) -> tuple[RunResult, float]:
    t0 = time.perf_counter()
    result = run_stage(module, cfg, force=True)
    return result, time.perf_counter() - t0


def row(result: RunResult, seconds: float, mb_in: float) -> dict[str, Any]:
    c = result.manifest["counts"] or {}
    return {
        "seconds": round(seconds, 3),
        "apply_s": result.manifest["wall_time_s"],
        "mb_in": round(mb_in, 2),
        "mb_per_s": round(mb_in / seconds, 2),
        "docs_in": c.get("in"),
        "docs_kept": c.get("kept"),
    }


def profiles(out: Path, mb_in: float) -> dict[str, Any]:
    """Each profile's clean apply on its own, from cold measures."""
    found = {}
    for name in filters.PROFILES:
        filters.MEASURES.clear()
        cfg = clean.Config(
            input=out / "ingest", output=out / f"clean-{name}", profile=name, plan_sample_rows=0
        )
        result, seconds = timed(clean, cfg)
        found[name] = {
            **row(result, seconds, mb_in),
            "rejected": result.manifest["counts"]["rejected"],
        }
    return found


def compare(out: Path, mb_in: float) -> dict[str, Any]:
    """`clean plan`'s profile table on the whole corpus, from cold measures."""
    filters.MEASURES.clear()
    t0 = time.perf_counter()
    p = clean.plan(clean.Config(input=out / "ingest", output=out / "clean-plan"))
    seconds = time.perf_counter() - t0
    return {
        "seconds": round(seconds, 3),
        "mb_per_s": round(mb_in / seconds, 2),
        "rows": p.estimates["profiles_sample"]["rows"],
    }


def run(out: Path) -> dict[str, Any]:
    progress.quiet()
    stdlib_mb = sources.scan(sources.StdlibSource(), 1024**2).bytes / MB
    ing, t_ing = timed(ingest, ingest.Config(output=out / "ingest"))
    filters.MEASURES.clear()
    cln, t_cln = timed(clean, clean.Config(input=out / "ingest", output=out / "clean"))
    spl, t_spl = timed(split, split.Config(input=out / "clean", output=out / "split"))
    clean_mb = cln.manifest["metrics"]["bytes_in"] / MB
    by_profile = profiles(out, clean_mb)
    plan_pass = compare(out, clean_mb)
    base = baseline()
    stages = {
        "ingest": row(ing, t_ing, stdlib_mb),
        "clean": row(cln, t_cln, clean_mb),
        "split": row(spl, t_spl, cln.manifest["metrics"]["bytes_kept"] / MB),
    }
    return {
        "benchmark": "data",
        "corpus": "stdlib",
        "python": platform.python_version(),
        "albor": albor.__version__,
        "stages": stages,
        "clean_profiles": by_profile,
        "clean_plan": plan_pass,
        "baseline": base,
        # Same files, same parse: how much longer ingest + clean take than the plain loop.
        "ingest_clean_over_baseline": round((t_ing + t_cln) / base["seconds"], 2),
        "rejected": {
            "ingest": ing.manifest["counts"]["rejected"],
            "clean": cln.manifest["counts"]["rejected"],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the artifacts here (default: a temp dir)")
    args = parser.parse_args()
    if args.out is not None:
        report = run(args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="albor-bench-") as tmp:
            report = run(Path(tmp))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
