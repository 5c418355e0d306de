"""Throughput of the data stages on the stdlib corpus: ingest -> clean -> split through `run_stage`.

The named baseline, timed in the same run on the same files, is what the work costs without albor:
read every file and `ast.parse` it in a plain loop. ingest + clean against that baseline shows the
overhead of the stages (hashing, Parquet, counting, manifests, the other filters).

`clean` is timed as the pipeline runs it (its plan measures every document once to compare the
profiles, and apply reuses those measures); `clean_profiles` times each profile's apply alone
(`plan_sample_rows: 0`, measures forgotten before each), and `clean_plan` the profile comparison.

`workers` times clean -> dedup -> decontaminate with `workers: 1` (the baseline) and `workers: 2`
on the stdlib corpus and on a synthetic corpus ten times its size: the stdlib ten times over,
each copy with a comment naming it at the end of every line (continuation lines left alone), so
that the copies stay valid Python and are not near-duplicates of each other (their estimated
Jaccard similarity is about 0.4). Each stage reads the previous one's `workers: 1` output; clean
runs with `plan_sample_rows: 0` and cold measures, so that its apply does all the parsing. MB/s
is the stage's input text over its wall time, and `identical` says whether both runs wrote the
same bytes.

Run:  PYTHONPATH=src python benchmarks/data.py [--out DIR] [--copies N]
Prints one JSON object; with --out the artifacts stay in DIR, otherwise in a temp dir.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
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
from albor.artifact import atomic_write_json, describe_outputs, outputs_digest
from albor.data import filters, parallel, sources
from albor.data.corpus import CORPUS_FILE, CorpusWriter, document, iter_batches
from albor.stage import RunResult, run_stage
from albor.stages import clean, decontaminate, dedup, ingest

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


def perturbed(text: str, copy: int) -> str:
    """`text` with `# cN` at the end of every line but continuation lines: still valid Python,
    and two new tokens a line keep copies below dedup's similarity threshold."""
    return text.replace("\\\n", "\x00").replace("\n", f"  # c{copy}\n").replace("\x00", "\\\n")


def synthetic(source: Path, out: Path, copies: int) -> Path:
    """A corpus artifact of `copies` perturbed copies of the corpus in `source`, streamed."""
    out.mkdir(parents=True, exist_ok=True)
    with CorpusWriter(out / CORPUS_FILE, 256) as w:
        for copy in range(copies):
            for batch in iter_batches(source / CORPUS_FILE, ["text", "path"], 256):
                texts = batch.column("text").to_pylist()
                for text, path in zip(texts, batch.column("path").to_pylist(), strict=True):
                    w.write(document(perturbed(text, copy), f"copy{copy}/{path}", "synthetic"))
        rows, nbytes = w.rows, w.bytes
    outputs = describe_outputs(out)
    atomic_write_json(
        out / "manifest.json",
        {
            "stage": "ingest",
            "name": "synthetic",
            "fingerprint": f"synthetic-{copies}",
            "digest": outputs_digest(outputs),
            "config": {"copies": copies},
            "inputs": [],
            "outputs": outputs,
            "counts": {"in": rows, "kept": rows, "rejected": {}},
            "metrics": {"bytes_kept": nbytes},
        },
    )
    return out


def by_workers(source: Path, out: Path) -> dict[str, Any]:
    """clean -> dedup -> decontaminate on `source`, each with 1 and 2 workers."""
    found: dict[str, Any] = {}
    inp = source
    for module in (clean, dedup, decontaminate):
        extra = {"plan_sample_rows": 0} if module is clean else {}
        runs: dict[int, tuple[RunResult, float]] = {}
        for workers in (1, 2):
            filters.MEASURES.clear()
            cfg = module.Config(
                input=inp, output=out / f"{module.NAME}-w{workers}", workers=workers, **extra
            )
            runs[workers] = timed(module, cfg)
        mb_in = runs[1][0].manifest["metrics"]["bytes_in"] / MB
        one, two = (runs[w][0].output / CORPUS_FILE for w in (1, 2))
        found[module.NAME] = {
            "workers_1": row(*runs[1], mb_in),
            "workers_2": row(*runs[2], mb_in),
            "speedup": round(runs[1][1] / runs[2][1], 2),
            "identical": one.read_bytes() == two.read_bytes(),
        }
        inp = runs[1][0].output
    return found


def scaling(out: Path, copies: int) -> dict[str, Any]:
    """MB/s of the stages with 1 and 2 workers, on the stdlib and on `copies` copies of it."""
    big = synthetic(out / "ingest", out / "synthetic", copies)
    return {
        "cpus": parallel.cpu_count(),
        # Other work on the machine skews the 2-worker figures most; this says how busy it was.
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "stdlib": by_workers(out / "ingest", out / "w-stdlib"),
        f"synthetic_x{copies}": by_workers(big, out / "w-synthetic"),
    }


def run(out: Path, copies: int = 10) -> dict[str, Any]:
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
    workers = scaling(out, copies)
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
        "workers": workers,
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
    parser.add_argument(
        "--copies", type=int, default=10, help="stdlib copies in the synthetic corpus (10)"
    )
    args = parser.parse_args()
    if args.out is not None:
        report = run(args.out, args.copies)
    else:
        with tempfile.TemporaryDirectory(prefix="albor-bench-") as tmp:
            report = run(Path(tmp), args.copies)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
