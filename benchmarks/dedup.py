"""Throughput of the dedup stage on the stdlib corpus, beside datatrove's MinHash dedup pipeline.

The corpus is the running Python's stdlib, built by the ingest stage. albor's dedup runs through
`run_stage` (exact + near, then exact alone). The named baseline, timed in the same run on the same
documents, is datatrove's four-step MinHash pipeline (signatures -> buckets -> clusters -> filter,
one local task, output written as Parquet) with the same shingle size, 256 permutations as
32 buckets x 8 hashes and seed. It runs only where `datatrove` is importable (`pip install
datatrove`; it is not an albor dependency). datatrove's English word tokenizer needs spaCy and its
text normalisation drops punctuation, so it is given albor's code tokenizer with normalisation off:
both then shingle the same token streams, and the differences left are the hashing, the LSH
banding (datatrove's implied threshold is (1/32)^(1/8) = 0.65 and candidates are not verified)
and the survivor rule (datatrove keeps the first document of a cluster, albor the longest).

Run:  python benchmarks/dedup.py [--out DIR]
Prints one JSON object; with --out the artifacts stay in DIR, otherwise in a temp dir.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import albor
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import albor

import pyarrow.parquet as pq

from albor import progress
from albor.data import minhash
from albor.data.corpus import CORPUS_FILE
from albor.stage import load_stage, run_stage
from albor.stages import dedup, ingest

MB = 1e6
BUCKETS, HASHES = 32, 8  # 256 permutations, the nearest banding to threshold 0.7 with 256


def timed_dedup(corpus: Path, out: Path, **knobs: Any) -> tuple[dict[str, Any], float]:
    cfg = dedup.Config(input=corpus, output=out, **knobs)
    t0 = time.perf_counter()
    result = run_stage(dedup, cfg, force=True)
    return result.manifest, time.perf_counter() - t0


def albor_sets(out: Path) -> tuple[set[str], set[str]]:
    """(removed paths, paths in a duplicate cluster) of a dedup artifact."""
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    removed = {r["path"] for r in rejected}
    return removed, removed | {r["kept_path"] for r in rejected}


def jaccard(a: set[str], b: set[str]) -> float:
    return round(len(a & b) / len(a | b), 4) if a | b else 1.0


def datatrove(corpus: Path, work: Path, paths: list[str]) -> dict[str, Any]:
    """Run datatrove's MinHash dedup on `corpus`; its wall time and removed / clustered paths."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import ParquetReader
    from datatrove.pipeline.writers import ParquetWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.text import TextNormConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class CodeTokenizer(WordTokenizer):
        """albor's code tokens, so both pipelines shingle the same token streams."""

        def word_tokenize(self, text: str) -> list[str]:
            return minhash.tokenize(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    hash_fc = _datatrove_hash()
    config = MinhashConfig(
        n_grams=5,
        num_buckets=BUCKETS,
        hashes_per_bucket=HASHES,
        seed=1,
        norm_config=TextNormConfig(
            lowercase=False,
            norm_whitespace=False,
            remove_punctuation=False,
            norm_unicode_diacritics=False,
            norm_numbers=False,
        ),
        hash_config=HashConfig(precision=64, hash_fc=hash_fc),
    )

    def reader() -> ParquetReader:
        return ParquetReader(str(corpus), glob_pattern=CORPUS_FILE, id_key="path")

    # datatrove skips tasks it finds completed: start from nothing so every step is timed.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    logs = work / "logs"
    steps = [
        ([reader(), MinhashDedupSignature(str(work / "sigs"), config, CodeTokenizer())], 1),
        ([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)], BUCKETS),
        (
            [
                MinhashDedupCluster(
                    str(work / "buckets"), str(work / "ids"), config=config, save_cluster_id=True
                )
            ],
            1,
        ),
        ([reader(), MinhashDedupFilter(str(work / "ids")), ParquetWriter(str(work / "out"))], 1),
    ]
    t0 = time.perf_counter()
    with (
        open(work / "datatrove.log", "w") as log,
        contextlib.redirect_stderr(log),
        contextlib.redirect_stdout(log),
    ):
        for i, (pipeline, tasks) in enumerate(steps):
            LocalPipelineExecutor(
                pipeline, tasks=tasks, workers=1, logging_dir=str(logs / str(i))
            ).run()
    seconds = time.perf_counter() - t0
    removed = {paths[i] for i in _uint32s(work / "ids" / "000000.remove")}
    members = _uint32s(work / "ids" / "000000.clusters")[0::2]
    return {
        "seconds": seconds,
        "removed": removed,
        "clustered": {paths[i] for i in members},
        "hash_fc": hash_fc,
    }


def _datatrove_hash() -> str:
    """datatrove's default shingle hash (xxhash) where it works, else its sha1: datatrove 0.10
    passes `str` to xxhash, which xxhash 4 refuses."""
    try:
        import xxhash

        xxhash.xxh64_intdigest("probe")
    except (ImportError, TypeError):
        return "sha1"
    return "xxhash"


def _uint32s(path: Path) -> list[int]:
    data = path.read_bytes() if path.exists() else b""
    return list(struct.unpack(f"<{len(data) // 4}I", data))


def run(out: Path) -> dict[str, Any]:
    progress.quiet()
    cfg = ingest.Config.model_validate({"sources": [{"type": "stdlib"}], "output": out / "ingest"})
    ing = run_stage(load_stage("ingest"), cfg)
    corpus = ing.output
    paths = pq.read_table(corpus / CORPUS_FILE, columns=["path"])["path"].to_pylist()
    near, t_near = timed_dedup(corpus, out / "dedup")
    exact, t_exact = timed_dedup(corpus, out / "dedup-exact", near=False)
    mb_in = near["metrics"]["bytes_in"] / MB
    removed, clustered = albor_sets(out / "dedup")
    report: dict[str, Any] = {
        "benchmark": "dedup",
        "corpus": "stdlib",
        "python": platform.python_version(),
        "albor_version": albor.__version__,
        "documents": near["counts"]["in"],
        "mb_in": round(mb_in, 2),
        "albor": {
            "config": {k: near["config"][k] for k in ("threshold", "num_perm", "shingle_size")},
            "lsh": near["metrics"]["lsh"],
            "seconds": round(t_near, 3),
            "mb_per_s": round(mb_in / t_near, 2),
            "removed": near["counts"]["rejected"],
            "clusters": near["metrics"]["clusters"],
        },
        "albor_exact_only": {
            "seconds": round(t_exact, 3),
            "mb_per_s": round(mb_in / t_exact, 2),
            "removed": exact["counts"]["rejected"],
        },
    }
    if importlib.util.find_spec("datatrove") is None:
        report["baseline"] = {
            "name": "datatrove MinHash dedup",
            "skipped": "datatrove is not importable (pip install datatrove to compare)",
        }
        return report
    base = datatrove(corpus, out / "datatrove", paths)
    report["baseline"] = {
        "name": "datatrove MinHash dedup (signatures, buckets, clusters, filter; 1 task)",
        "config": {
            "n_grams": 5,
            "buckets": BUCKETS,
            "hashes_per_bucket": HASHES,
            "implied_threshold": round((1 / BUCKETS) ** (1 / HASHES), 3),
            "hash_fc": base["hash_fc"],
            "tokens": "albor TOKEN_RE, text normalisation off",
        },
        "seconds": round(base["seconds"], 3),
        "mb_per_s": round(mb_in / base["seconds"], 2),
        "removed": len(base["removed"]),
    }
    report["comparison"] = {
        # Above 1: datatrove takes longer than albor on the same documents.
        "baseline_over_albor_seconds": round(base["seconds"] / t_near, 2),
        "removed_jaccard": jaccard(removed, base["removed"]),
        # Survivor rules differ, so also compare which documents are in any duplicate cluster.
        "clustered_jaccard": jaccard(clustered, base["clustered"]),
        "removed_only_by_albor": len(removed - base["removed"]),
        "removed_only_by_baseline": len(base["removed"] - removed),
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
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
