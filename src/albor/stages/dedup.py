"""dedup: remove exact and near-duplicate documents, keeping one deterministic survivor per cluster.

What BigCode does for The Stack, for Python source:
- exact: documents whose text is equal once runs of whitespace are collapsed and the ends stripped
  (`minhash.normalized_key`) are duplicates;
- near: MinHash signatures of code-token 5-grams (`data/minhash.py`), LSH banding to find
  candidate pairs (the pairs datasketch's `MinHashLSH` finds, by sorting each band of the
  signature matrix), and each candidate verified by its estimated Jaccard similarity
  (`MinHash.jaccard` >= `threshold`), which drops the LSH false positives.
Duplicate pairs of either kind are joined into clusters (connected components, union-find), so
A ~ B and B ~ C put A, B and C in one cluster even when A and C are less similar, as in BigCode.

Survivor rule: in each cluster the longest document (most UTF-8 bytes) survives; ties go to the
smallest sha256, then the smallest path, then the smallest source name. The rule looks only at the
documents, and the clusters depend only on which pairs are duplicates, so the survivors do not
depend on the order of the input. A removed document's reason is `exact_duplicate` when its
normalised text equals its survivor's, else `near_duplicate`; `kept_path` names the survivor.

The corpus is read twice in record batches: the first pass keeps per document only its path,
sha256, size, exact group and (for one document per exact group) a `num_perm` x uint64
signature; the second streams the survivors to `corpus.parquet` in input order and the rest to
`rejected.parquet`. The per-document work of the first pass (whitespace-normalised keys,
tokenising, signing) runs in `workers` processes (`data/parallel.py`); the groups, the LSH
index and the union-find stay in this process and see the batches in input order, so the
output is the same whatever `workers` is.
`report.json` describes the clusters and lists a sample of removed pairs.
"""

from __future__ import annotations

import heapq
import math
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from albor import progress
from albor.artifact import atomic_write_json
from albor.config import Int
from albor.data import minhash, parallel
from albor.data.corpus import (
    CORPUS_FILE,
    REJECTED_FILE,
    CorpusWriter,
    RowWriter,
    iter_batches,
    num_rows,
    open_corpus,
    rejected_schema,
    require_corpus,
)
from albor.errors import ArtifactError, DataError
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input, counts

NAME = "dedup"
INPUTS = ("input",)

REPORT_FILE = "report.json"
EXACT = "exact_duplicate"
NEAR = "near_duplicate"
REJECTED_SCHEMA = rejected_schema(
    ("kept_path", pa.string()),
)

# Rates for the plan's wall-time estimate, from benchmarks/dedup.py on the stdlib (31.5 MB, one
# core of a shared 2-core machine): exact + near ran at 3.7-5.8 MB/s, tokenising and signing
# dominating; exact alone (a read, a whitespace join and a hash per document) at about 54 MB/s.
_NEAR_MB_PER_S = 5.0
_EXACT_MB_PER_S = 50.0
# Path, sha256, size, group and union-find parent of a document, and its exact key in the
# group table; a signature (num_perm x 8 bytes) comes on top, and sorting a band for LSH needs
# a band-sized copy of the signatures for a moment.
_PER_DOC_BYTES = 300
_LARGEST_CLUSTERS = 10
_MEMBERS_SHOWN = 50


class Config(OutputConfig):
    input: Path | None = Field(
        default=None, description="Corpus artifact directory (from ingest or clean)."
    )
    exact: bool = Field(
        default=True,
        description="Remove documents equal up to whitespace (runs collapsed, ends stripped).",
    )
    near: bool = Field(
        default=True,
        description="Remove near-duplicates found by MinHash LSH (datasketch's signatures).",
    )
    threshold: float = Field(
        default=0.7,
        gt=0.0,
        le=1.0,
        description="Estimated Jaccard similarity of token shingles at or above which two "
        "documents are near-duplicates (BigCode: 0.7).",
    )
    num_perm: Int = Field(
        default=256,
        ge=16,
        le=1024,
        description="MinHash permutations per signature: more is more accurate and slower "
        "(the estimate's standard error is about 0.5 / sqrt(num_perm)).",
    )
    shingle_size: Int = Field(
        default=5, ge=1, le=64, description="Code tokens per shingle (n-gram size)."
    )
    seed: int = Field(
        default=1,
        ge=0,
        lt=2**32,
        description="Seed of the MinHash permutations; change it for an independent estimate.",
    )
    sample_pairs: Int = Field(
        default=20,
        ge=0,
        description="How many removed (removed_path, kept_path, jaccard) pairs report.json "
        "lists: those least similar to their survivor, to audit the threshold.",
    )
    batch_rows: Int = Field(
        default=1024, gt=0, description="Rows per record batch while streaming."
    )
    workers: parallel.Workers = Field(
        default=1,
        description=parallel.workers_description(
            "normalise, tokenise and sign the documents (the LSH index stays in this process)"
        ),
    )


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    workers = parallel.plan_workers(p, cfg.workers)
    modes = [m for m, on in (("exact", cfg.exact), ("near", cfg.near)) if on]
    p.warn_if(
        "modes",
        not modes,
        "exact and near are both off: the output will be a copy of the input",
        f"{' + '.join(modes)} deduplication",
    )
    if cfg.near:
        bands, rows = minhash.lsh_bands(cfg.threshold, cfg.num_perm)
        mid = (1.0 + cfg.threshold) / 2
        found = minhash.candidate_probability(mid, bands, rows)
        at_threshold = minhash.candidate_probability(cfg.threshold, bands, rows)
        p.estimates["lsh"] = {
            "bands": bands,
            "rows": rows,
            # Chance that a pair of this similarity is looked at (then verified by its Jaccard).
            "p_candidate": {
                f"{cfg.threshold:g}": round(at_threshold, 3),
                f"{mid:.3g}": round(found, 3),
            },
        }
        p.warn_if(
            "lsh recall",
            found < 0.9,
            f"pairs of similarity {mid:.3g} become LSH candidates with probability {found:.2f} "
            f"only ({bands} bands x {rows} rows), so some are missed: a lower threshold, or fewer "
            "permutations (shorter bands, a noisier estimate), finds more of them",
            f"{bands} bands x {rows} rows find pairs of similarity {mid:.3g} with p={found:.3f}",
        )
    manifest = check_input(
        p, ctx, "input", cfg.input, require_corpus, "a corpus artifact directory"
    )
    size = None
    if manifest is not None and cfg.input is not None:
        try:
            size = _text_bytes(cfg.input, manifest)
        except ArtifactError as e:
            p.add("input", "fail", str(e))
    if manifest is not None and size is not None:
        docs = int((manifest.get("counts") or {}).get("kept", 0))
        stored = sum(int(o["bytes"]) for o in manifest["outputs"] if o["path"] == CORPUS_FILE)
        p.add("input", "ok", f"{cfg.input} ({docs} documents, {size / 1e6:.1f} MB)")
        p.estimates["documents"] = docs
        p.estimates["input_mb"] = round(size / 1e6, 2)
        rate = _NEAR_MB_PER_S if cfg.near else _EXACT_MB_PER_S
        p.estimates["wall_time_s"] = round(size / 1e6 / rate / workers, 1)
        # The survivors are at most the input; the rejection list is small beside them.
        p.estimates["disk_bytes"] = stored
        signature = cfg.num_perm * 8 if cfg.near else 0
        p.estimates["memory_bytes"] = docs * (signature + _PER_DOC_BYTES)
    p.actions.append(
        f"find duplicates, write {CORPUS_FILE}, {REJECTED_FILE} and {REPORT_FILE} to {cfg.output}"
    )
    return p


def _text_bytes(directory: Path, manifest: dict[str, Any]) -> int:
    """UTF-8 bytes of the corpus's text: from the manifest (ingest and clean record it), else the
    uncompressed size of the text column in the Parquet footer, which is close to it."""
    recorded = (manifest.get("metrics") or {}).get("bytes_kept")
    if isinstance(recorded, int | float):
        return int(recorded)
    meta = open_corpus(directory / CORPUS_FILE).metadata
    column = meta.schema.to_arrow_schema().get_field_index("text")
    groups = (meta.row_group(g) for g in range(meta.num_row_groups))
    return sum(g.column(column).total_uncompressed_size for g in groups)


@dataclass
class _Documents:
    """What the first pass keeps of each document: no text; its path, source, sha256, size,
    exact group and union-find parent; and, with `near` on, one `num_perm` x uint64 signature
    per exact group (its members have the same tokens, so the same signature), a row of one
    preallocated matrix rather than an object per document."""

    paths: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    sha256: list[bytes] = field(default_factory=list)
    nbytes: array[int] = field(default_factory=lambda: array("q"))
    group: array[int] = field(default_factory=lambda: array("q"))
    parent: array[int] = field(default_factory=lambda: array("q"))
    leaders: array[int] = field(default_factory=lambda: array("q"))  # first document per group
    signatures: np.ndarray | None = None  # row g: the signature of group g
    bands: tuple[int, int] | None = None
    candidates: int = 0
    verified: int = 0

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps the trees shallow
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def rank(self, i: int) -> tuple[int, bytes, str, str]:
        """Sort key of the survivor rule: longest first, then smallest sha256, path, source."""
        return (-self.nbytes[i], self.sha256[i], self.paths[i], self.sources[i])

    def jaccard(self, i: int, j: int) -> float:
        """Estimated Jaccard similarity; 1.0 within an exact group (same tokens)."""
        gi, gj = self.group[i], self.group[j]
        if gi == gj:
            return 1.0
        assert self.signatures is not None
        pair = np.array([[gi, gj]], dtype=np.int64)
        return float(minhash.similarities(self.signatures, pair)[0])


Signed = tuple[bytes, list[int], np.ndarray | None]
"""A batch's per-document work: the 16-byte exact keys of its documents, joined; the offsets of
the documents signed (the first of each key within the batch); and their signatures."""


def _sign(signer: minhash.Signer | None, texts: list[str]) -> Signed:
    """Exact keys of a batch and, with a signer, the signatures of the first document of each key
    in it. Runs in a worker process with `workers` > 1, so it is top-level. A document whose key
    an earlier batch already holds is signed needlessly: only the parent knows every key, and
    asking it first would cost a round trip per batch."""
    keys = [minhash.normalized_key(text) for text in texts]
    if signer is None:
        return b"".join(keys), [], None
    first: dict[bytes, int] = {}
    signed = [i for i, key in enumerate(keys) if first.setdefault(key, i) == i]
    signatures = np.empty((len(signed), signer.num_perm), dtype=np.uint64)
    for row, i in enumerate(signed):
        signatures[row] = signer.signature(signer.shingle_hashes(texts[i]))
    return b"".join(keys), signed, signatures


def _scan(cfg: Config, source: Path, rows: int, batches: int) -> _Documents:
    """First pass: exact groups and signatures (signing in `workers` processes), then LSH
    candidates verified into union-find edges."""
    docs = _Documents()
    groups: dict[bytes, int] = {}
    names: dict[str, str] = {}  # one string object per source name, not one per row
    signer = None
    if cfg.near:
        signer = minhash.Signer(cfg.num_perm, cfg.seed, cfg.shingle_size)
        docs.bands = minhash.lsh_bands(cfg.threshold, cfg.num_perm)
        # Untouched rows of np.empty are never paged in: memory follows the groups found.
        docs.signatures = np.empty((rows, cfg.num_perm), dtype=np.uint64)
    keyed = cfg.exact or cfg.near
    meta = ["path", "source", "sha256", "bytes"]
    columns = ["text", *meta] if keyed else meta

    def work() -> Iterator[tuple[tuple[int, pa.RecordBatch], list[str]]]:
        start = 0
        for batch in iter_batches(source, columns, cfg.batch_rows):
            texts = batch.column("text").to_pylist() if keyed else []
            # Only the texts travel to a worker; the rest stays here, without them.
            yield (start, batch.select(meta)), texts
            start += batch.num_rows

    found = parallel.map_keyed(
        _sign,
        work(),
        cfg.workers if keyed else 1,
        shared=signer,
        what=NAME,
        describe=lambda key: f"rows {key[0]}-{key[0] + key[1].num_rows - 1} of {source}",
    )
    for (_, batch), (keys, signed, signatures) in progress.track(found, f"{NAME}: sign", batches):
        row_of = dict(zip(signed, range(len(signed)), strict=True))
        shas = batch.column("sha256").to_pylist()
        sizes = batch.column("bytes").to_pylist()
        sources = batch.column("source").to_pylist()
        for offset, path in enumerate(batch.column("path").to_pylist()):
            i = len(docs.paths)
            docs.paths.append(path)
            docs.sources.append(names.setdefault(sources[offset], sources[offset]))
            docs.sha256.append(bytes.fromhex(shas[offset]))
            docs.nbytes.append(int(sizes[offset]))
            docs.parent.append(i)
            if not keyed:
                docs.group.append(i)
                continue
            g = groups.setdefault(keys[16 * offset : 16 * (offset + 1)], len(docs.leaders))
            docs.group.append(g)
            if g < len(docs.leaders):
                # Same text up to whitespace: an exact duplicate, and with near on alone a
                # near-duplicate of similarity 1 (whitespace never enters a token).
                docs.union(docs.leaders[g], i)
                continue
            docs.leaders.append(i)
            if docs.signatures is not None and signatures is not None:
                if g >= len(docs.signatures):
                    raise DataError(_changed(source, len(docs.signatures), "more"))
                docs.signatures[g] = signatures[row_of[offset]]
    if docs.signatures is not None and docs.bands is not None:
        _link(cfg, docs)
    return docs


def _link(cfg: Config, docs: _Documents) -> None:
    """Union the groups whose signatures share an LSH band and whose estimated Jaccard reaches
    the threshold (the candidates that fail are LSH's false positives)."""
    assert docs.signatures is not None and docs.bands is not None
    signed = docs.signatures[: len(docs.leaders)]
    pairs = minhash.candidate_pairs(signed, *docs.bands)
    close = minhash.similarities(signed, pairs) >= cfg.threshold
    docs.candidates = len(pairs)
    docs.verified = int(np.count_nonzero(close))
    for a, b in pairs[close].tolist():
        docs.union(docs.leaders[a], docs.leaders[b])


def _changed(source: Path, before: int, now: int | str) -> str:
    return (
        f"{source}: changed while dedup read it ({before} rows, then {now}): "
        "re-run once the upstream stage has finished"
    )


@dataclass
class _Clusters:
    """The outcome of the first pass: who survives, who is removed for what, and the report."""

    kept_of: np.ndarray  # survivor index per document; itself for survivors
    reasons: np.ndarray  # 0 kept, 1 exact, 2 near
    report: dict[str, Any]


def _cluster(cfg: Config, docs: _Documents) -> _Clusters:
    n = len(docs.paths)
    roots = np.fromiter((docs.find(i) for i in range(n)), dtype=np.int64, count=n)
    # Members of clusters of two or more, grouped by root (numpy, not a dict per document).
    shared = np.flatnonzero(np.bincount(roots, minlength=n)[roots] > 1)
    shared = shared[np.argsort(roots[shared], kind="stable")]
    cuts = np.flatnonzero(np.diff(roots[shared])) + 1
    kept_of = np.arange(n, dtype=np.int64)
    reasons = np.zeros(n, dtype=np.int8)
    removed: list[tuple[int, int]] = []
    clusters = []
    for members in np.split(shared, cuts) if len(shared) else []:
        group = members.tolist()
        survivor = min(group, key=docs.rank)
        for i in group:
            if i == survivor:
                continue
            kept_of[i] = survivor
            exact = cfg.exact and docs.group[i] == docs.group[survivor]
            reasons[i] = 1 if exact else 2
            removed.append((i, survivor))
        clusters.append((len(group), docs.paths[survivor], group))
    sizes = Counter(size for size, _, _ in clusters)
    largest = sorted(clusters, key=lambda c: (-c[0], c[1]))[:_LARGEST_CLUSTERS]
    label = {1: EXACT, 2: NEAR}
    pairs = heapq.nsmallest(
        cfg.sample_pairs,
        (
            (round(docs.jaccard(i, s), 4), docs.paths[i], docs.paths[s], label[int(reasons[i])])
            for i, s in removed
        ),
    )
    report = {
        "documents": n,
        "exact": cfg.exact,
        "near": cfg.near,
        "threshold": cfg.threshold,
        "num_perm": cfg.num_perm,
        "shingle_size": cfg.shingle_size,
        "survivor_rule": "longest document (UTF-8 bytes), then smallest sha256, path, source",
        "lsh": _lsh_report(docs),
        "clusters": {
            "count": len(clusters),
            "documents": sum(size for size, _, _ in clusters),
            "size_histogram": {str(k): sizes[k] for k in sorted(sizes)},
            "largest": [
                {
                    "size": size,
                    "kept_path": kept,
                    "members": sorted(docs.paths[i] for i in group)[:_MEMBERS_SHOWN],
                }
                for size, kept, group in largest
            ],
        },
        "removed_pairs": [
            {"removed_path": r, "kept_path": k, "jaccard": j, "reason": why}
            for j, r, k, why in pairs
        ],
    }
    return _Clusters(kept_of, reasons, report)


def _lsh_report(docs: _Documents) -> dict[str, Any] | None:
    if docs.bands is None:
        return None
    bands, rows = docs.bands
    return {
        "bands": bands,
        "rows": rows,
        "signed_documents": len(docs.leaders),
        "candidate_pairs": docs.candidates,
        "verified_pairs": docs.verified,
        "false_positive_pairs": docs.candidates - docs.verified,
    }


def _write(
    cfg: Config, ctx: ApplyContext, source: Path, docs: _Documents, found: _Clusters, batches: int
) -> tuple[int, Counter[str], Counter[str]]:
    """Second pass: survivors to the corpus in input order, the others to the rejection list."""
    label = {1: EXACT, 2: NEAR}
    rejected: Counter[str] = Counter()
    rejected_bytes: Counter[str] = Counter()
    start = 0
    with (
        CorpusWriter(ctx.out / CORPUS_FILE, cfg.batch_rows) as corpus,
        RowWriter(ctx.out / REJECTED_FILE, REJECTED_SCHEMA, cfg.batch_rows) as report,
    ):
        batch_iter = iter_batches(source, batch_rows=cfg.batch_rows)
        for batch in progress.track(batch_iter, f"{NAME}: write", batches):
            stop = start + batch.num_rows
            reasons = found.reasons[start:stop]
            keep = reasons == 0
            corpus.write_batch(batch.filter(pa.array(keep)))
            for offset in np.flatnonzero(~keep).tolist():
                i = start + offset
                why = label[int(reasons[offset])]
                rejected[why] += 1
                rejected_bytes[why] += docs.nbytes[i]
                report.write(
                    {
                        "path": docs.paths[i],
                        "source": docs.sources[i],
                        "sha256": docs.sha256[i].hex(),
                        "bytes": docs.nbytes[i],
                        "reason": why,
                        "kept_path": docs.paths[int(found.kept_of[i])],
                    }
                )
            start = stop
        kept_bytes = corpus.bytes
    if start != len(docs.paths):
        raise DataError(_changed(source, len(docs.paths), start))
    return kept_bytes, rejected, rejected_bytes


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    assert cfg.input is not None
    source = cfg.input / CORPUS_FILE
    rows = num_rows(source)
    batches = math.ceil(rows / cfg.batch_rows)
    docs = _scan(cfg, source, rows, batches)
    found = _cluster(cfg, docs)
    kept_bytes, rejected, rejected_bytes = _write(cfg, ctx, source, docs, found, batches)
    atomic_write_json(ctx.out / REPORT_FILE, found.report)
    total = len(docs.paths)
    kept = total - rejected.total()
    bytes_in = int(sum(docs.nbytes))
    clusters = found.report["clusters"]["count"]
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(rejected.items()))
    return Outcome(
        summary=f"{total} docs in, {kept} kept ({kept_bytes / 1e6:.1f} MB), "
        f"{rejected.total()} duplicates removed in {clusters} clusters"
        + (f" ({reasons})" if reasons else ""),
        counts=counts(total, kept, dict(rejected)),
        metrics={
            "clusters": clusters,
            "duplicates_removed": rejected.total(),
            "bytes_in": bytes_in,
            "bytes_kept": kept_bytes,
            "bytes_removed": bytes_in - kept_bytes,
            "rejected_bytes": dict(sorted(rejected_bytes.items())),
            "lsh": found.report["lsh"],
        },
    )
