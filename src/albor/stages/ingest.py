"""ingest: read source files and tables into one Parquet corpus, counting every file it rejects.

Sources (`data/sources/`): the running Python's stdlib (the built-in default corpus), local
directories, globs, the tracked files of git checkouts, Parquet / JSONL files with a text column,
and Hugging Face datasets already in the local cache. Files are decoded as Python decodes source
(UTF-8, or the codec of a PEP 263 coding cookie). Every file or row seen is either kept (a row of
`corpus.parquet`) or rejected with a reason (a row of `rejected.parquet`), so
in == kept + rejected. The plan looks only at `stat` results, Parquet footers, `git ls-files` and
the datasets cache; a git source's commit is recorded in the metrics and the fingerprint.

With `workers` > 1 the files of stdlib, dir, glob and git sources are read, decoded and hashed in
worker processes, batch by batch, and come back in walk order, so the corpus is the same whatever
`workers` is. Parquet, JSONL and hf rows are decoded in this process (their reader is the work).
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from albor import progress
from albor.artifact import sha256_file
from albor.config import Int
from albor.data import parallel
from albor.data.corpus import CORPUS_FILE, REJECTED_FILE, CorpusWriter, RowWriter, document
from albor.data.sources import (
    UNREADABLE,
    GitSource,
    HfSource,
    JsonlSource,
    ParquetSource,
    Source,
    StdlibSource,
    describe,
    file_entries,
    git_checkout,
    git_dirty,
    iter_source,
    label,
    location,
    read_file,
    scan,
    state,
)
from albor.errors import DataError
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, counts

NAME = "ingest"
INPUTS: tuple[str, ...] = ()

REJECTED_SCHEMA = pa.schema(
    [("path", pa.string()), ("source", pa.string()), ("reason", pa.string())]
)
# Rough figures for the plan's estimates, from benchmarks/data.py on the stdlib: zstd keeps about
# a quarter of Python source; reading + hashing + writing ran at ~85 MB/s from a warm page cache,
# so a cold read is allowed for.
_COMPRESSION = 0.25
_MB_PER_S = 50.0


def _default_sources() -> list[Source]:
    return [StdlibSource()]


class Config(OutputConfig):
    sources: list[Source] = Field(
        default_factory=_default_sources,
        min_length=1,
        description="Where documents come from: a list of {type: stdlib | dir | glob | git | "
        "parquet | jsonl | hf, ...}; default: the running Python's standard library. "
        "git: {path, include, exclude} reads the tracked files of a checkout; hf: {dataset, "
        "split, column, config, path_column} reads a dataset from the local HF cache only "
        "(needs `pip install 'albor[hf]'`).",
    )
    max_file_bytes: Int = Field(
        default=1024**2,
        gt=0,
        description="Largest file (or row text) in bytes; a larger file is rejected by its size "
        "without being read.",
    )
    batch_rows: Int = Field(
        default=512, gt=0, description="Rows per record batch written to Parquet."
    )
    workers: parallel.Workers = Field(
        default=1,
        description=parallel.workers_description(
            "read, decode and hash the files of stdlib, dir, glob and git sources"
        ),
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> Config:
        seen: set[str] = set()
        for i, src in enumerate(self.sources):
            name = label(src)
            if name in seen:
                raise ValueError(
                    f"sources[{i}]: name '{name}' is used twice; give each source a distinct `name`"
                )
            seen.add(name)
        return self


def source_state(cfg: Config) -> dict[str, Any]:
    """(path, size, mtime) digest of every source, so a changed file re-runs the stage; a git
    source also names its commit."""
    found: dict[str, Any] = {}
    for src in cfg.sources:
        found[label(src)] = state(src)
        if isinstance(src, GitSource):
            found[label(src)] = {"commit": _commit(src), "files": found[label(src)]}
    return found


def _commit(src: GitSource) -> str | None:
    """HEAD of a git source, or None when it cannot be read (the plan reports why)."""
    try:
        return git_checkout(src).commit
    except DataError:
        return None


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    p = Plan(NAME)
    per: dict[str, Any] = {}
    items = total = too_large = 0
    counted = True
    for src in cfg.sources:
        name = label(src)
        try:
            s = scan(src, cfg.max_file_bytes)
        except DataError as e:
            p.add(f"source {name}", "fail", str(e))
            continue
        p.add(f"source {name}", "ok", f"{describe(src)}: {s.detail}")
        per[name] = {"type": src.type, s.unit: s.items, "bytes": s.bytes}
        if isinstance(src, GitSource):
            per[name]["commit"] = _commit(src)
        if s.items is None:
            counted = False
        else:
            items += s.items
        total += s.bytes
        too_large += s.too_large
    p.warn_if(
        "file sizes",
        too_large > 0,
        f"{too_large} file(s) exceed max_file_bytes={cfg.max_file_bytes} and will be rejected "
        "(raise max_file_bytes to keep them)",
        f"no file exceeds max_file_bytes={cfg.max_file_bytes}",
    )
    p.estimates["sources"] = per
    p.estimates["documents_seen"] = items if counted else f"{items} + JSONL lines"
    p.estimates["input_mb"] = round(total / 1e6, 2)
    p.estimates["disk_bytes"] = round(total * _COMPRESSION)
    workers = parallel.plan_workers(p, cfg.workers)
    p.estimates["wall_time_s"] = round(total / 1e6 / _MB_PER_S / workers, 1)
    p.actions.append(
        f"read {len(cfg.sources)} source(s); write {CORPUS_FILE}, {REJECTED_FILE} to {cfg.output}"
    )
    return p


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    kept = 0
    rejected: Counter[str] = Counter()
    per: dict[str, dict[str, Any]] = {}
    with (
        CorpusWriter(ctx.out / CORPUS_FILE, cfg.batch_rows) as corpus,
        RowWriter(ctx.out / REJECTED_FILE, REJECTED_SCHEMA, cfg.batch_rows) as report,
    ):
        for src in cfg.sources:
            name = label(src)
            mine: Counter[str] = Counter()
            n_kept = n_bytes = 0
            seen = hashlib.sha256()  # what was read: every path with its text hash or reason
            for path, doc, why in progress.track(_documents(src, cfg), f"ingest {name}"):
                if doc is None:
                    reason = why or UNREADABLE
                    mine[reason] += 1
                    report.write({"path": path, "source": name, "reason": reason})
                    seen.update(f"{path}\0{reason}\n".encode())
                else:
                    corpus.write(doc)
                    n_kept += 1
                    n_bytes += doc["bytes"]
                    seen.update(f"{path}\0{doc['sha256']}\n".encode())
            per[name] = {
                **counts(n_kept + mine.total(), n_kept, dict(mine)),
                "bytes": n_bytes,
                "content_sha256": seen.hexdigest(),
            }
            if isinstance(src, GitSource):
                # What was read is the working tree: say whether it matches the commit.
                per[name] |= {"commit": _commit(src), "dirty": git_dirty(src)}
            kept += n_kept
            rejected += mine
        bytes_kept = corpus.bytes
    total = kept + rejected.total()
    if kept == 0:
        raise DataError(
            f"ingest: none of the {total} files or rows seen was kept "
            f"({_reasons(rejected)}): check the sources and max_file_bytes"
        )
    files = all(not isinstance(s, ParquetSource | JsonlSource | HfSource) for s in cfg.sources)
    unit = "files" if files else "documents"
    return Outcome(
        summary=f"{total} {unit} in, {kept} kept ({bytes_kept / 1e6:.1f} MB), "
        f"{rejected.total()} rejected" + (f" ({_reasons(rejected)})" if rejected else ""),
        counts=counts(total, kept, dict(rejected)),
        metrics={"bytes_kept": bytes_kept, "sources": per},
        sources=[_provenance(s, per[label(s)]) for s in cfg.sources],
    )


Seen = tuple[str, dict[str, Any] | None, str | None]  # (path, corpus row or None, reason)


def _documents(src: Source, cfg: Config) -> Iterator[Seen]:
    """Every file or row of `src` as a corpus row or a rejection, in the source's order."""
    name = label(src)
    if isinstance(src, ParquetSource | JsonlSource | HfSource):
        for r in iter_source(src, cfg.max_file_bytes, cfg.batch_rows):
            doc = document(r.text, r.path, name) if r.text is not None else None
            yield r.path, doc, r.reason
        return
    entries = iter(file_entries(src))
    batches = iter(
        lambda: [(e.path, e.rel, e.listable) for e in itertools.islice(entries, cfg.batch_rows)],
        [],
    )
    payloads = ((name, cfg.max_file_bytes, batch) for batch in batches)
    for seen in parallel.map_batches(_read_files, payloads, cfg.workers, what=f"ingest {name}"):
        yield from seen


def _read_files(payload: tuple[str, int, list[tuple[str, str, bool]]]) -> list[Seen]:
    """Read, decode and hash a batch of (path, rel, listable) files of source `name`. Runs in a
    worker process with `workers` > 1, so it is top-level and takes and returns plain data."""
    name, max_bytes, entries = payload
    out: list[Seen] = []
    for path, rel, listable in entries:
        if not listable:
            out.append((rel, None, UNREADABLE))
            continue
        text, reason = read_file(path, max_bytes)
        out.append((rel, document(text, rel, name) if text is not None else None, reason))
    return out


def source_digests(cfg: Config) -> dict[str, str]:
    """Each source's current digest (paths, sizes, mtimes), as `_provenance` records it."""
    return {label(s): state(s) for s in cfg.sources}


def _provenance(src: Source, metrics: dict[str, Any]) -> dict[str, Any]:
    """A source as the manifest's inputs list it: where, and a digest of what was read."""
    entry = {
        "name": label(src),
        "type": src.type,
        "path": location(src),
        "digest": state(src),
        "content_sha256": metrics["content_sha256"],
    }
    if isinstance(src, ParquetSource | JsonlSource):
        entry["sha256"] = sha256_file(Path(location(src)))
    if "commit" in metrics:
        entry["commit"] = metrics["commit"]
    return entry


def _reasons(rejected: Counter[str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
