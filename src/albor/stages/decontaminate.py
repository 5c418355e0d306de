"""decontaminate: drop documents that share n-grams with benchmark prompts or solutions.

Every text of every configured benchmark (HumanEval built in, or any JSONL file) is cut into
n-grams of code tokens (`albor.evals.contamination`: word runs, so formatting cannot hide an
overlap), hashed to 64-bit integers and held in memory. The corpus is streamed batch by batch; a
document sharing at least `min_matches` distinct benchmark n-grams is dropped, listed in
`rejected.parquet` (reason `contaminated`, with the benchmarks and task ids it matched) and in
`report.json` with the number of n-grams it shares with each problem.

The index is built once; with `workers` > 1 each worker process receives a copy when it starts
(`data/parallel.py`) and scans whole batches, returning only the documents it matched, in input
order, so the output is the same whatever `workers` is. Nothing is kept per document but the
report entry of a dropped one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from albor import progress
from albor.artifact import atomic_write_json
from albor.config import Int
from albor.data import parallel
from albor.data.corpus import (
    CORPUS_FILE,
    REJECTED_FILE,
    CorpusWriter,
    RowWriter,
    iter_batches,
    num_rows,
    rejected_schema,
    require_corpus,
)
from albor.errors import DataError
from albor.evals import benchmarks as bench
from albor.evals.contamination import (
    CONTAMINATION_COLUMNS,
    Decontamination,
    Hit,
    NgramIndex,
    check_benchmarks,
    index_benchmarks,
    scan,
)
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input, counts

NAME = "decontaminate"
INPUTS = ("input",)

REPORT_FILE = "report.json"
CONTAMINATED = "contaminated"
REJECTED_SCHEMA = rejected_schema(
    *CONTAMINATION_COLUMNS,
)
# Tokenising, hashing and lookup: measured at about 17 MB/s on one core over the whole stdlib.
_MB_PER_S = 15.0


class Config(Decontamination, OutputConfig):
    input: Path | None = Field(
        default=None, description="Corpus artifact directory (from ingest, clean or dedup)."
    )
    batch_rows: Int = Field(
        default=1024, gt=0, description="Rows per record batch while streaming."
    )
    workers: parallel.Workers = Field(
        default=1,
        description=parallel.workers_description(
            "scan the documents for benchmark n-grams (each holds a copy of the index)"
        ),
    )


def source_state(cfg: Config) -> dict[str, str]:
    """The digest of every benchmark file: a changed benchmark re-runs the stage."""
    return {b.name: bench.state(b) for b in cfg.benchmarks}


def build(cfg: Config, p: Plan | None = None) -> tuple[NgramIndex, dict[str, bench.Benchmark]]:
    """Load every benchmark and index its n-grams; with a plan, each load is a check there."""
    if p is None:
        return index_benchmarks(cfg.benchmarks, cfg.ngram, cfg.short_texts)
    index, loaded, checks = check_benchmarks(cfg.benchmarks, cfg.ngram, cfg.short_texts)
    for name, ok, detail in checks:
        p.add(f"benchmark {name}", "ok" if ok else "fail", detail)
    return index, loaded


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    workers = parallel.plan_workers(p, cfg.workers)
    cfg.check_ngram(p, "document")
    index, _ = build(cfg, p)
    p.estimates["ngrams_indexed"] = index.ngrams_per_benchmark()
    manifest = check_input(
        p, ctx, "input", cfg.input, require_corpus, "a corpus artifact directory"
    )
    if manifest is not None:
        docs = (manifest.get("counts") or {}).get("kept", 0)
        size = (manifest.get("metrics") or {}).get("bytes_kept")
        stored = next((o["bytes"] for o in manifest["outputs"] if o["path"] == CORPUS_FILE), None)
        if not isinstance(size, int | float):
            # An ingest manifest may not record text bytes; the Parquet size is a lower bound.
            size = stored
        shown = f", {size / 1e6:.1f} MB" if isinstance(size, int | float) else ""
        p.add("input", "ok", f"{cfg.input} ({docs} documents{shown})")
        p.estimates["documents_in"] = docs
        if isinstance(size, int | float):
            p.estimates["input_mb"] = round(size / 1e6, 2)
            p.estimates["wall_time_s"] = round(size / 1e6 / _MB_PER_S / workers, 1)
        if isinstance(stored, int):
            # Contamination is rare: the kept corpus is about the size of the input.
            p.estimates["disk_bytes"] = stored
    p.actions.append(
        f"drop documents sharing {cfg.min_matches}+ {cfg.ngram}-grams with "
        f"{', '.join(b.name for b in cfg.benchmarks)}; write {CORPUS_FILE}, {REJECTED_FILE} and "
        f"{REPORT_FILE} to {cfg.output}"
    )
    return p


Found = list[tuple[int, Hit]]
"""The documents of a batch that share at least `min_matches` benchmark n-grams: (offset, hit)."""


def _scan(shared: tuple[NgramIndex, int], texts: list[str]) -> Found:
    """The contaminated documents of a batch. Runs in a worker process with `workers` > 1 (the
    index arrives once per worker, through the pool's initializer), so it is top-level and
    returns only the few hits."""
    index, min_matches = shared
    return scan(index, texts, min_matches)


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    assert cfg.input is not None
    index, loaded = build(cfg)
    source = cfg.input / CORPUS_FILE
    batches = math.ceil(num_rows(source) / cfg.batch_rows)
    total = kept = bytes_in = 0
    dropped: list[dict[str, Any]] = []
    per_benchmark: Counter[str] = Counter()
    meta = ["path", "source", "sha256", "bytes"]

    def work() -> Iterator[tuple[tuple[int, pa.RecordBatch], list[str]]]:
        start = 0
        for batch in iter_batches(source, ["text", *meta], cfg.batch_rows):
            # The texts go to a worker; this process keeps the batch to write its survivors.
            yield (start, batch), batch.column("text").to_pylist()
            start += batch.num_rows

    scanned = parallel.map_keyed(
        _scan,
        work(),
        cfg.workers,
        shared=(index.ready(), cfg.min_matches),
        what=NAME,
        describe=lambda key: f"rows {key[0]}-{key[0] + key[1].num_rows - 1} of {source}",
    )
    with (
        CorpusWriter(ctx.out / CORPUS_FILE, cfg.batch_rows) as corpus,
        RowWriter(ctx.out / REJECTED_FILE, REJECTED_SCHEMA, cfg.batch_rows) as rejected,
    ):
        for (_, batch), found in progress.track(scanned, NAME, batches):
            total += batch.num_rows
            bytes_in += int(pc.sum(batch.column("bytes")).as_py() or 0)
            keep = [True] * batch.num_rows
            for offset, hit in found:
                keep[offset] = False
                row = {name: batch.column(name)[offset].as_py() for name in meta}
                per_benchmark.update(hit.benchmarks)
                rejected.write(
                    {
                        **row,
                        "reason": CONTAMINATED,
                        "benchmarks": hit.benchmarks,
                        "task_ids": hit.task_ids,
                        "shared_ngrams": hit.shared,
                    }
                )
                dropped.append(
                    {
                        "path": row["path"],
                        "source": row["source"],
                        "sha256": row["sha256"],
                        "shared_ngrams": hit.shared,
                        "matches": [
                            {"benchmark": b, "task_id": t, "ngrams": k}
                            for (b, t), k in hit.by_problem.items()
                        ],
                    }
                )
            corpus.write_batch(batch.filter(pa.array(keep, pa.bool_())))
            kept += batch.num_rows - len(found)
        bytes_kept = corpus.bytes
    ngrams = index.ngrams_per_benchmark()
    per_doc = {name: per_benchmark.get(name, 0) for name in loaded}
    atomic_write_json(
        ctx.out / REPORT_FILE,
        {
            "ngram": cfg.ngram,
            "min_matches": cfg.min_matches,
            "short_texts": cfg.short_texts,
            "benchmarks": {
                name: {
                    "file": str(b.path),
                    "problems": index.stats[name].problems,
                    "fields": list(b.fields),
                    "ngrams_indexed": ngrams[name],
                    "texts_under_ngram": index.stats[name].texts_short,
                    "documents_dropped": per_doc[name],
                }
                for name, b in loaded.items()
            },
            "dropped": dropped,
        },
    )
    if kept == 0 and total > 0:
        raise DataError(
            f"decontaminate: every one of the {total} documents shares n-grams with a benchmark; "
            "raise `ngram` or `min_matches`, or check that the input is not the benchmark itself"
        )
    shown = ", ".join(f"{k}: {v}" for k, v in per_doc.items())
    return Outcome(
        summary=f"{total} docs in, {kept} kept ({bytes_kept / 1e6:.1f} MB), "
        f"{len(dropped)} contaminated ({shown})",
        counts=counts(total, kept, {CONTAMINATED: len(dropped)}),
        metrics={
            "ngrams_indexed": ngrams,
            "documents_dropped": per_doc,
            "bytes_in": bytes_in,
            "bytes_kept": bytes_kept,
        },
    )
