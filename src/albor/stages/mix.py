"""mix: combine several corpora into one corpus, each input weighted, deterministically.

`weighting` says what the weights mean (one meaning per config, never both):

  upsample  each weight is a repetition factor: 3 = every document three times; 2.5 = every document
            twice plus one more copy of a seeded half of them (by count); 0.4 = a seeded 40% of the
            documents once, the rest dropped.
  share     weights are target shares of the output's UTF-8 bytes (normalised to sum to 1). The
            output size T is `total_bytes` when set, else the size at which the largest input (by
            bytes) is used exactly once: T = bytes(largest) / share(largest). Input i then gets the
            factor f_i = share_i * T / bytes_i: floor(f_i) copies of every document, plus one more
            copy of the documents that come first in a seeded order until the fractional byte
            budget (f_i - floor(f_i)) * bytes_i is met, so the shares land on target even when
            document sizes vary.

Seeded choices: an input's documents are ordered by sha256(seed, input index, row, document
sha256), and the fractional copy goes to the head of that order. Same inputs + seed -> a
byte-identical corpus.parquet; another seed picks another subset.

Output order: the inputs in the order listed; each input is streamed once per copy (pass k writes
the documents that get more than k copies), so the copies of a document are a whole pass apart and
never share a training window. There is no global shuffle: split assigns documents by content hash
(which also puts every copy of a document in the same split, so upsampled data never leaks into
val / test) and pretraining draws random windows. Rows are copied unchanged: `source`, `path` and
`sha256` stay those of the input.

Counts: `in` = documents read (each input row once), `kept` = documents written at least once,
`rejected.downsampled` = documents that got no copy (factor below 1); `metrics.documents_written`
counts the rows written, repeats included, and `metrics.bytes_kept` their bytes (the corpus size,
as ingest and clean report it).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BeforeValidator, Field, model_validator

from albor import progress
from albor.config import Int
from albor.data.corpus import (
    CORPUS_FILE,
    CorpusWriter,
    iter_batches,
    num_rows,
    open_corpus,
    require_corpus,
)
from albor.errors import ArtifactError, DataError
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, counts

NAME = "mix"
INPUTS = ("inputs",)

Weighting = Literal["upsample", "share"]

# Figures for the plan's estimates, as ingest measures them: zstd keeps about a quarter of Python
# source; reading + writing Parquet streams at tens of MB/s.
_COMPRESSION = 0.25
_MB_PER_S = 50.0
# Beyond about four epochs, repeated data adds little (Muennighoff et al. 2023, "Scaling
# Data-Constrained Language Models"); share weighting warns when it implies more copies.
_MANY_COPIES = 4.0


def _as_list(value: Any) -> Any:
    """A single path (as a pipeline `needs:` of one stage gives it) is a list of one."""
    return [value] if isinstance(value, str | Path) else value


Weight = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Config(OutputConfig):
    inputs: Annotated[list[Path], BeforeValidator(_as_list)] = Field(
        default_factory=list,
        description="Corpus artifact directories to mix (outputs of ingest, clean, dedup, ...), "
        "in the order they are written.",
    )
    weights: list[Weight] = Field(
        description="One weight per input, in the order of `inputs`, each > 0; what it means is "
        "set by `weighting`.",
    )
    weighting: Weighting = Field(
        description="upsample: each weight is a repetition factor (2.5 = every document twice "
        "plus a seeded half once more; 0.5 = a seeded half once). share: weights are target "
        "shares of the output bytes (normalised), the largest input used once unless "
        "`total_bytes` is set.",
    )
    total_bytes: Int | None = Field(
        None,
        gt=0,
        description="With weighting: share, the output size in UTF-8 bytes (default: the size at "
        "which the largest input is used exactly once).",
    )
    seed: int = Field(
        0, description="Seed of the sampled choices: which documents get the fractional copy."
    )
    batch_rows: Int = Field(1024, gt=0, description="Rows per record batch while streaming.")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if len(self.weights) != len(self.inputs):
            raise ValueError(
                f"weights: {len(self.weights)} weight(s) for {len(self.inputs)} input(s): give "
                "one weight per input, in the order of `inputs`"
            )
        if self.total_bytes is not None and self.weighting != "share":
            raise ValueError(
                "total_bytes: only means something with weighting: share (remove it, or switch "
                "to share)"
            )
        seen: dict[Path, int] = {}
        for i, path in enumerate(self.inputs):
            key = Path(path).resolve()
            if key in seen:
                raise ValueError(
                    f"inputs[{i}]: same directory as inputs[{seen[key]}] ({path}): list each "
                    "corpus once and raise its weight instead"
                )
            seen[key] = i
        return self


def labels(inputs: list[Path]) -> list[str]:
    """A name per input for reports: its directory name, or the whole path if names repeat."""
    names = [Path(p).name for p in inputs]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in inputs]


@dataclass(frozen=True)
class InputSize:
    documents: int
    bytes: int


def input_size(directory: Path) -> InputSize:
    """Documents (Parquet footer) and UTF-8 bytes of a corpus artifact (manifest, else column)."""
    manifest = require_corpus(directory)
    path = directory / CORPUS_FILE
    docs = num_rows(path)
    size = (manifest.get("metrics") or {}).get("bytes_kept")
    if not isinstance(size, int):
        table = open_corpus(path).read(columns=["bytes"])
        size = sum(table.column("bytes").to_pylist())
    return InputSize(docs, int(size))


def factors(cfg: Config, sizes: list[int]) -> list[float]:
    """Copies per document (on average) of each input, from the weights and the input bytes."""
    if cfg.weighting == "upsample":
        return list(cfg.weights)
    total_weight = sum(cfg.weights)
    shares = [w / total_weight for w in cfg.weights]
    if cfg.total_bytes is not None:
        target = float(cfg.total_bytes)
    else:
        largest = max(range(len(sizes)), key=lambda i: sizes[i])
        target = sizes[largest] / shares[largest]
    found = [s * target / b if b > 0 else 0.0 for s, b in zip(shares, sizes, strict=True)]
    # Snap float noise (0.9999999999999999) to the whole number it stands for, so that "used
    # once" means every document exactly once, with no seeded selection at all.
    return [float(round(f)) if abs(f - round(f)) < 1e-9 else f for f in found]


def _share(part: float, whole: float) -> float:
    return round(part / whole, 4) if whole > 0 else 0.0


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    p.estimates["weighting"] = cfg.weighting
    if not cfg.inputs:
        p.add("inputs", "fail", "no inputs: set `inputs:` to a list of corpus artifact directories")
        return p
    names = labels(cfg.inputs)
    found: list[InputSize | None] = []
    for i, (name, path) in enumerate(zip(names, cfg.inputs, strict=True)):
        where = f"inputs[{i}]"
        try:
            size = input_size(Path(path))
        except ArtifactError as e:
            if ctx.is_pending("inputs"):
                p.add(where, "ok", f"{name}: {ctx.pending_note('inputs')}")
            else:
                p.add(where, "fail", str(e))
            found.append(None)
            continue
        p.add(where, "ok", f"{name}: {size.documents} documents, {size.bytes / 1e6:.2f} MB")
        found.append(size)
    sizes = [s for s in found if s is not None]
    if len(sizes) == len(found):
        _estimate(p, cfg, names, sizes)
    how = (
        "repeat each input's documents by its weight"
        if cfg.weighting == "upsample"
        else "sample each input to its share of the output bytes"
    )
    p.actions.append(f"{how} (seed {cfg.seed}), write {CORPUS_FILE} to {cfg.output}")
    return p


def _estimate(p: Plan, cfg: Config, names: list[str], sizes: list[InputSize]) -> None:
    """Per input: documents, bytes and share before and after (exact where counts decide)."""
    if cfg.weighting == "share":
        empty = [i for i, s in enumerate(sizes) if s.bytes == 0]
        for i in empty:
            p.add(
                f"inputs[{i}]",
                "fail",
                f"{names[i]}: empty corpus cannot make up a share of the output: remove it",
            )
        if empty:
            return
    fs = factors(cfg, [s.bytes for s in sizes])
    before_bytes = sum(s.bytes for s in sizes)
    after = [round(f * s.bytes) for f, s in zip(fs, sizes, strict=True)]
    after_bytes = sum(after)
    table: dict[str, dict[str, Any]] = {}
    for name, s, f, b in zip(names, sizes, fs, after, strict=True):
        base = math.floor(f)
        table[name] = {
            "documents": s.documents,
            "bytes": s.bytes,
            "share": _share(s.bytes, before_bytes),
            "factor": round(f, 4),
            # By count (upsample) the fractional copy goes to exactly round(frac * N) documents.
            "documents_after": base * s.documents + round((f - base) * s.documents),
            "bytes_after": b,
            "share_after": _share(b, after_bytes),
        }
        if cfg.weighting == "share":
            p.warn_if(
                f"{name} copies",
                f > _MANY_COPIES,
                f"{name} would be repeated {f:.1f} times: beyond about {_MANY_COPIES:g} copies "
                "repeated data adds little; lower its share or set total_bytes",
                f"{name}: factor {f:.3g}",
            )
    p.estimates["sources"] = table
    p.estimates["documents_in"] = sum(s.documents for s in sizes)
    p.estimates["documents"] = sum(row["documents_after"] for row in table.values())
    p.estimates["bytes"] = after_bytes
    p.estimates["disk_bytes"] = round(after_bytes * _COMPRESSION)
    # Each input is read once to rank it and once per copy to write it.
    read = sum(s.bytes * (1 + math.ceil(f)) for s, f in zip(sizes, fs, strict=True))
    p.estimates["wall_time_s"] = round(read / 1e6 / _MB_PER_S, 1)
    p.warn_if(
        "output",
        after_bytes == 0,
        "the mix would be empty: the inputs hold no text",
        f"about {p.estimates['documents']:,} documents, {after_bytes / 1e6:.2f} MB",
    )


def _rank_keys(path: Path, index: int, seed: int, batch_rows: int) -> np.ndarray:
    """A seeded 64-bit key per row: sha256(seed, input index, row, document sha256)."""
    keys: list[int] = []
    for batch in iter_batches(path, ["sha256"], batch_rows):
        start = len(keys)
        for offset, sha in enumerate(batch.column("sha256").to_pylist()):
            blob = f"albor-mix\0{seed}\0{index}\0{start + offset}\0{sha}".encode()
            keys.append(int.from_bytes(hashlib.sha256(blob).digest()[:8], "big"))
    return np.array(keys, dtype=np.uint64)


def copies_of(
    factor: float, sizes: np.ndarray, keys: np.ndarray | None, by_bytes: bool
) -> np.ndarray:
    """Copies of each document: floor(factor) for all, one more for the head of the key order.

    The head holds round(frac * N) documents when `by_bytes` is false, else the prefix whose
    bytes come closest to frac * total bytes.
    """
    n = len(sizes)
    base = math.floor(factor)
    copies = np.full(n, base, dtype=np.int64)
    frac = factor - base
    if frac <= 0 or n == 0:
        return copies
    if keys is None:
        raise ValueError("a fractional factor needs rank keys")
    order = np.argsort(keys, kind="stable")
    if by_bytes:
        cum = np.cumsum(sizes[order])
        budget = frac * float(cum[-1])
        take = int(np.searchsorted(cum, budget, side="right"))
        below = float(cum[take - 1]) if take > 0 else 0.0
        if take < n and float(cum[take]) - budget < budget - below:
            take += 1
    else:
        take = round(frac * n)
    copies[order[:take]] += 1
    return copies


def _bytes_column(path: Path, batch_rows: int) -> np.ndarray:
    parts = [
        batch.column("bytes").to_numpy(zero_copy_only=False)
        for batch in iter_batches(path, ["bytes"], batch_rows)
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    names = labels(cfg.inputs)
    paths = [Path(d) / CORPUS_FILE for d in cfg.inputs]
    sizes = [_bytes_column(path, cfg.batch_rows) for path in paths]
    fs = factors(cfg, [int(s.sum()) for s in sizes])
    total = kept = dropped = 0
    per: dict[str, dict[str, Any]] = {}
    with CorpusWriter(ctx.out / CORPUS_FILE, cfg.batch_rows) as writer:
        for i, (name, path, size, f) in enumerate(zip(names, paths, sizes, fs, strict=True)):
            keys = _rank_keys(path, i, cfg.seed, cfg.batch_rows) if f != math.floor(f) else None
            copies = copies_of(f, size, keys, by_bytes=cfg.weighting == "share")
            rows0, bytes0 = writer.rows, writer.bytes
            passes = int(copies.max()) if len(copies) else 0
            with progress.bar(f"mix {name}", len(copies) * passes) as bar:
                for k in range(passes):
                    _write_pass(writer, path, copies, k, cfg.batch_rows)
                    bar.advance(len(copies))
            n_kept = int((copies > 0).sum())
            total += len(copies)
            kept += n_kept
            dropped += len(copies) - n_kept
            per[name] = {
                "path": str(cfg.inputs[i]),
                "documents_in": len(copies),
                "bytes_in": int(size.sum()),
                "factor": round(f, 6),
                "documents_kept": n_kept,
                "documents_written": writer.rows - rows0,
                "bytes_written": writer.bytes - bytes0,
            }
        written, written_bytes = writer.rows, writer.bytes
    if written == 0:
        raise DataError(
            f"mix: nothing to write: the {total} input documents hold no text "
            "(check the inputs, or raise the weights)"
        )
    before = sum(row["bytes_in"] for row in per.values())
    for row in per.values():
        row["share_in"] = _share(row["bytes_in"], before)
        row["share_written"] = _share(row["bytes_written"], written_bytes)
    summary = "; ".join(
        f"{name} {row['documents_in']} -> {row['documents_written']} docs "
        f"({100 * row['share_written']:.1f}% of bytes)"
        for name, row in per.items()
    )
    return Outcome(
        summary=f"{summary}; {written} rows, {written_bytes / 1e6:.2f} MB ({cfg.weighting})",
        counts=counts(total, kept, {"downsampled": dropped} if dropped else {}),
        metrics={
            "weighting": cfg.weighting,
            "documents_written": written,
            "bytes_kept": written_bytes,
            "sources": per,
        },
    )


def _write_pass(
    writer: CorpusWriter, path: Path, copies: np.ndarray, k: int, batch_rows: int
) -> None:
    """Stream the input once, writing the rows that get more than `k` copies."""
    start = 0
    for batch in iter_batches(path, batch_rows=batch_rows):
        mask = copies[start : start + batch.num_rows] > k
        start += batch.num_rows
        if mask.all():
            writer.write_batch(batch)
        elif mask.any():
            writer.write_batch(batch.filter(pa.array(mask)))
