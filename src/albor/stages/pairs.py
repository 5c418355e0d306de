"""pairs: docstring -> body pairs for instruction finetuning, split by source file, decontaminated.

Every function with a docstring in a split artifact's files gives a pair (`albor.data.pairs`:
prompt = decorators, signature and docstring as written; completion = the rest of the body). A
pair inherits the split of the file it came from, so no file gives pairs to two splits and the
val / test pairs come from files pretraining never saw. Extra pairs come from JSONL files of
`{"prompt": ..., "completion": ...}` records (other keys kept in `meta`); a record's split is a
draw from the hash of its prompt, salted by `seed`, as the split stage draws documents.

A pair is dropped, for a counted reason, when it is outside the size limits, repeats an earlier
pair (same sha256 of prompt + completion), or shares `min_matches` n-grams with a benchmark (the
n-gram index of `albor.evals.contamination`, the one the decontaminate stage uses). The splits are
filled train first, so a pair repeated across splits stays in train and val / test hold no copy
of a training pair.

Counts: `in` is every candidate (each function of each parsed file, each file that does not
parse, each non-blank JSONL line); `kept` the pairs written; `rejected` every other candidate by
reason. Files that do not parse, bad JSONL lines (with their line number) and dropped pairs are
also listed in rejected.parquet; functions that never made a pair (no docstring, a stub, nothing
after the docstring) are only counted. Memory is bounded by the batch, plus 8 bytes per kept pair
for the duplicate check.

The plan mines the corpus's first 2 MB (all of a small one): a corpus with no documented
function, or none within the limits, fails there, naming why.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from albor import progress
from albor.artifact import sha256_file
from albor.config import Int
from albor.data import pairs
from albor.data.corpus import (
    REJECTED_FILE,
    SPLITS,
    RowWriter,
    draw_split,
    iter_batches,
    num_rows,
    rejected_schema,
    require_splits,
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

NAME = "pairs"
INPUTS = ("input",)

JSONL_SOURCE = "jsonl"
REJECTED_SCHEMA = rejected_schema(
    ("split", pa.string()),
    ("name", pa.string()),
    ("lineno", pa.int64()),
    ("detail", pa.string()),
    *CONTAMINATION_COLUMNS,
)
# Source text the plan mines to see that the corpus gives pairs at all (~0.3 s of `ast.parse`):
# all of a small corpus, so one without a documented function fails at plan, not at apply.
_SCAN_BYTES = 2_000_000
# Share of a corpus's bytes that pairs hold (nested functions not counted twice): 0.42 on the
# tests' stdlib sample, 0.29 over every .py file of a Python install; a rough guide for the
# plan's disk estimate, not a promise.
_PAIR_BYTES_SHARE = 0.4


class Config(Decontamination, OutputConfig):
    input: Path | None = Field(
        default=None, description="Split artifact directory (train / val / test from split)."
    )
    jsonl: list[Path] = Field(
        default_factory=list,
        description='Extra JSONL files of {"prompt": ..., "completion": ...} records; other '
        "keys are kept as `meta`.",
    )
    val: float = Field(
        0.05, ge=0.0, lt=1.0, description="Fraction of JSONL records for validation."
    )
    test: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of JSONL records for test.")
    seed: str = Field("albor", description="Salt of the prompt hash that splits JSONL records.")
    max_prompt_chars: Int = Field(
        default=4000, gt=0, description="Longest prompt kept, in characters."
    )
    max_completion_chars: Int = Field(
        default=8000, gt=0, description="Longest completion kept, in characters."
    )
    min_completion_lines: Int = Field(
        default=1, ge=0, description="Fewest non-blank completion lines a pair needs."
    )
    batch_rows: Int = Field(
        default=1024, gt=0, description="Rows per record batch while streaming."
    )

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.val + self.test >= 1.0:
            raise ValueError(
                f"val + test = {self.val + self.test:g} leaves no JSONL record to train on: "
                "make it below 1"
            )
        return self


def source_state(cfg: Config) -> dict[str, Any]:
    """Digests of the benchmark and JSONL files: a changed one re-runs the stage."""
    jsonl = {}
    for path in cfg.jsonl:
        try:
            jsonl[str(path)] = sha256_file(path)
        except OSError:
            jsonl[str(path)] = "unreadable"
    return {"benchmarks": {b.name: bench.state(b) for b in cfg.benchmarks}, "jsonl": jsonl}


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    cfg.check_ngram(p, "pair")
    index, _, checks = check_benchmarks(cfg.benchmarks, cfg.ngram, cfg.short_texts)
    for name, ok, detail in checks:
        p.add(f"benchmark {name}", "ok" if ok else "fail", detail)
    p.estimates["ngrams_indexed"] = index.ngrams_per_benchmark()

    manifest = check_input(p, ctx, "input", cfg.input, require_splits, "a split artifact directory")
    disk = 0.0
    if manifest is not None and cfg.input is not None:
        metrics = manifest.get("metrics") or {}
        recorded = metrics.get("documents") or {}
        size = metrics.get("bytes") or {}
        docs = {
            s: n if isinstance(n := recorded.get(s), int) else num_rows(cfg.input / f"{s}.parquet")
            for s in SPLITS
        }
        shown = ", ".join(f"{s} {n}" for s, n in docs.items())
        p.add("input", "ok", f"{cfg.input} (documents: {shown})")
        p.estimates["documents"] = docs
        if all(isinstance(size.get(s), int) for s in SPLITS):
            disk += _PAIR_BYTES_SHARE * sum(size[s] for s in SPLITS)
        _check_source(p, cfg, cfg.input)
    for i, path in enumerate(cfg.jsonl):
        if p.require(
            f"jsonl[{i}]",
            path.is_file(),
            f"{path} ({path.stat().st_size / 1e6:.1f} MB)" if path.is_file() else "",
            f"{path}: JSONL file not found; fix or remove it in `jsonl:`",
        ):
            disk += path.stat().st_size
    if disk:
        # Text bytes before Parquet's compression: an upper bound on what lands on disk.
        p.estimates["pair_text_mb"] = round(disk / 1e6, 2)
    p.actions.append(
        f"mine docstring -> body pairs, drop those sharing {cfg.min_matches}+ {cfg.ngram}-grams "
        f"with {', '.join(b.name for b in cfg.benchmarks)}; write "
        f"{', '.join(s + '.parquet' for s in SPLITS)} and {REJECTED_FILE} to {cfg.output}"
    )
    return p


def _check_source(p: Plan, cfg: Config, directory: Path) -> None:
    """Mine the corpus's first `_SCAN_BYTES`: a corpus (all of it read) with no function that
    gives a pair within the limits fails here, naming why, instead of after apply's full pass."""
    docs = functions = found = fits = 0
    rejected: Counter[str] = Counter()
    scanned, complete = 0, True

    def texts() -> Iterator[str]:
        for split in SPLITS:
            for batch in iter_batches(directory / f"{split}.parquet", ["text"], cfg.batch_rows):
                yield from batch.column("text").to_pylist()

    for text in texts():
        if scanned >= _SCAN_BYTES:
            complete = False
            break
        scanned += len(text)
        docs += 1
        mined = pairs.mine(text)
        functions += mined.functions
        rejected.update(mined.rejected)
        found += len(mined.pairs)
        limits = (cfg.max_prompt_chars, cfg.max_completion_chars, cfg.min_completion_lines)
        fits += sum(
            pairs.limit_reason(x.prompt, x.completion, *limits) is None for x in mined.pairs
        )
    read = f"{docs} documents" + ("" if complete else f" (the first {scanned / 1e6:.1f} MB)")
    if fits:
        p.add("pairs", "ok", f"{fits} pairs within the limits in {read}")
        return
    if found:
        why = f"{found} pairs in {read}, none within the limits: loosen max_prompt_chars, "
        why += "max_completion_chars or min_completion_lines"
    else:
        reasons = ", ".join(f"{k} {n}" for k, n in sorted(rejected.items())) or "none"
        why = (
            f"{directory}: {functions} functions in {read}, none with a docstring and a body "
            f"after it (rejected: {reasons}); point `input:` at Python source with documented "
            "functions"
        )
    if complete and not cfg.jsonl:
        p.add("pairs", "fail", why)
    else:
        # Later documents, or the JSONL records, may still give pairs: apply finds out.
        p.add("pairs", "warn", why)


@dataclass(frozen=True)
class _Candidate:
    prompt: str
    completion: str
    path: str
    source: str
    name: str
    lineno: int
    meta: str | None = None


class _Sink:
    """Where candidate pairs go: the size limits, the duplicate check and the benchmark scan,
    then the split's Parquet file or rejected.parquet; it keeps the tallies."""

    def __init__(self, cfg: Config, index: NgramIndex, out: Path) -> None:
        self.cfg = cfg
        self.index = index
        self.writers = {
            s: RowWriter(out / f"{s}.parquet", pairs.SCHEMA, cfg.batch_rows) for s in SPLITS
        }
        self.rejected = RowWriter(out / REJECTED_FILE, REJECTED_SCHEMA, cfg.batch_rows)
        # 64 bits of each pair's sha256: a false duplicate among 10M pairs is a 1-in-300,000
        # event, at a quarter of the memory of whole digests.
        self.seen: set[int] = set()
        self.reasons: Counter[str] = Counter()
        self.kept: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.per_benchmark: Counter[str] = Counter()

    def count(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] += n

    def reject(self, reason: str, row: dict[str, Any], hit: Hit | None = None) -> None:
        self.reasons[reason] += 1
        found = (
            {"benchmarks": hit.benchmarks, "task_ids": hit.task_ids, "shared_ngrams": hit.shared}
            if hit is not None
            else {}
        )
        self.rejected.write({**row, "reason": reason, **found})

    def offer(self, split: str, candidates: list[_Candidate]) -> None:
        cfg = self.cfg
        survivors: list[tuple[_Candidate, dict[str, Any]]] = []
        for c in candidates:
            sha = pairs.pair_sha256(c.prompt, c.completion)
            row: dict[str, Any] = {
                "path": c.path,
                "source": c.source,
                "sha256": sha,
                "bytes": len((c.prompt + c.completion).encode("utf-8")),
                "split": split,
                "name": c.name,
                "lineno": c.lineno,
            }
            why = pairs.limit_reason(
                c.prompt,
                c.completion,
                cfg.max_prompt_chars,
                cfg.max_completion_chars,
                cfg.min_completion_lines,
            )
            if why is not None:
                detail = (
                    f"prompt {len(c.prompt)} chars, completion {len(c.completion)} chars, "
                    f"{pairs.code_lines(c.completion)} lines"
                )
                self.reject(why, {**row, "detail": detail})
                continue
            key = int(sha[:16], 16)
            if key in self.seen:
                self.reject(pairs.DUPLICATE, row)
                continue
            self.seen.add(key)
            survivors.append((c, row))
        texts = [c.prompt + c.completion for c, _ in survivors]
        hits = dict(scan(self.index, texts, cfg.min_matches))
        for i, (c, row) in enumerate(survivors):
            hit = hits.get(i)
            if hit is not None:
                self.per_benchmark.update(hit.benchmarks)
                self.reject(pairs.CONTAMINATED, row, hit)
                continue
            self.writers[split].write(
                {
                    "prompt": c.prompt,
                    "completion": c.completion,
                    "path": c.path,
                    "name": c.name,
                    "lineno": c.lineno,
                    "split": split,
                    "sha256": row["sha256"],
                    "meta": c.meta,
                }
            )
            self.kept[split] += 1
            self.bytes[split] += row["bytes"]

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.rejected.close()


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every non-blank line; a blank line holds no record."""
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip(b"\r\n")
                if line.strip():
                    yield lineno, line
    except OSError as e:
        raise DataError(f"{path}: cannot read JSONL file: {e}; fix or remove it in `jsonl:`") from e


def _offer_jsonl(sink: _Sink, path: Path, split: str) -> int:
    """Offer the records of one JSONL file that fall in `split`; returns the lines read. Every
    pass reads every line, so a bad line is listed only in the first pass (train)."""
    cfg = sink.cfg
    first = split == SPLITS[0]
    lines = 0
    pending: list[_Candidate] = []
    for lineno, line in _jsonl_lines(path):
        lines += 1
        rec, reason, detail = pairs.parse_record(line)
        if rec is None:
            if first:
                row = {"path": str(path), "source": JSONL_SOURCE, "bytes": len(line)}
                sink.reject(reason, {**row, "lineno": lineno, "detail": detail})
            continue
        key = hashlib.sha256(rec.prompt.encode("utf-8")).hexdigest()
        if draw_split(key, cfg.seed, cfg.val, cfg.test) != split:
            continue
        pending.append(
            _Candidate(rec.prompt, rec.completion, str(path), JSONL_SOURCE, "", lineno, rec.meta)
        )
        if len(pending) >= cfg.batch_rows:
            sink.offer(split, pending)
            pending = []
    sink.offer(split, pending)
    return lines


@dataclass
class _Tally:
    files: Counter[str]
    functions: int = 0
    unparsable: int = 0
    records: int = 0


def _offer_documents(sink: _Sink, batch: pa.RecordBatch, split: str, tally: _Tally) -> None:
    """Mine every document of a corpus batch and offer its pairs to `split`."""
    cols = batch.to_pydict()
    for text, path, source, sha in zip(
        cols["text"], cols["path"], cols["source"], cols["sha256"], strict=True
    ):
        tally.files[split] += 1
        mined = pairs.mine(text)
        if mined.error is not None:
            tally.unparsable += 1
            row = {"path": path, "source": source, "sha256": sha, "split": split}
            size = len(text.encode("utf-8"))
            sink.reject(pairs.UNPARSABLE_FILE, {**row, "bytes": size, "detail": mined.error})
            continue
        tally.functions += mined.functions
        for reason, n in mined.rejected.items():
            sink.count(reason, n)
        found = [
            _Candidate(p.prompt, p.completion, path, source, p.name, p.lineno) for p in mined.pairs
        ]
        sink.offer(split, found)


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    assert cfg.input is not None
    index, loaded = index_benchmarks(cfg.benchmarks, cfg.ngram, cfg.short_texts)
    sink = _Sink(cfg, index.ready(), ctx.out)
    tally = _Tally(Counter())
    sources = {s: cfg.input / f"{s}.parquet" for s in SPLITS}
    total = sum(math.ceil(num_rows(p) / cfg.batch_rows) for p in sources.values())
    total += len(SPLITS) * len(cfg.jsonl)

    def work() -> Iterator[tuple[str, pa.RecordBatch | Path]]:
        # Train first: a pair repeated across splits is kept in train, dropped from val / test.
        for split in SPLITS:
            columns = ["text", "path", "source", "sha256"]
            for batch in iter_batches(sources[split], columns, cfg.batch_rows):
                yield split, batch
            for path in cfg.jsonl:
                yield split, path

    try:
        for split, item in progress.track(work(), NAME, total):
            if isinstance(item, Path):
                lines = _offer_jsonl(sink, item, split)
                if split == SPLITS[0]:
                    tally.records += lines
            else:
                _offer_documents(sink, item, split, tally)
    finally:
        sink.close()
    functions, records = tally.functions, tally.records
    kept = sum(sink.kept.values())
    total_in = functions + tally.unparsable + records
    if kept == 0:
        raise DataError(
            f"pairs: none of {total_in} candidates ({functions} functions, {records} JSONL "
            f"records) gave a pair (rejected: {dict(sink.reasons)}); check that `input:` holds "
            "Python source with docstrings, or loosen the limits"
        )
    per_benchmark = {name: sink.per_benchmark.get(name, 0) for name in loaded}
    per_split = {s: sink.kept[s] for s in SPLITS}
    files = sum(tally.files.values())
    return Outcome(
        summary=f"{functions} functions in {files} files"
        + (f" + {records} JSONL records" if cfg.jsonl else "")
        + f": {kept} pairs ({', '.join(f'{s} {n}' for s, n in per_split.items())}), "
        f"{sum(sink.reasons.values())} rejected "
        f"({sink.reasons[pairs.CONTAMINATED]} contaminated)",
        counts=counts(total_in, kept, dict(sink.reasons)),
        metrics={
            "files": {s: tally.files[s] for s in SPLITS},
            "unparsable_files": tally.unparsable,
            "functions": functions,
            "jsonl_records": records,
            "pairs": per_split,
            "bytes": {s: sink.bytes[s] for s in SPLITS},
            "ngrams_indexed": index.ngrams_per_benchmark(),
            "pairs_contaminated": per_benchmark,
        },
    )
