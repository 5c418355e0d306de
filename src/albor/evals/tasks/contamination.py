"""The evaluate task `contamination`: the documents of a corpus (or of one split of a split
artifact) that share n-grams with benchmark prompts or solutions, found with the n-gram index of
`albor.evals.contamination`. Writes NAME.jsonl: one line per contaminated document with the
problems it shares n-grams with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from albor import progress
from albor.artifact import atomic_write_text
from albor.config import Int, StageConfig
from albor.errors import ArtifactError, DataError
from albor.evals import benchmarks as bench
from albor.evals.contamination import ShortTexts
from albor.evals.tasks import Models, Planning, Split


class ContaminationTask(StageConfig):
    """Documents of a corpus sharing n-grams with benchmark prompts or solutions."""

    task: Literal["contamination"]
    name: str | None = Field(None, description="Key in metrics.json and file prefix.")
    corpus: Path = Field(description="Corpus artifact (corpus.parquet) or split artifact.")
    split: Split | None = Field(None, description="With a split artifact: which split to scan.")
    benchmarks: list[bench.BenchmarkConfig] = Field(
        default_factory=lambda: [bench.BenchmarkConfig(name=bench.HUMANEVAL)],
        min_length=1,
        description="Benchmarks to look for: {name: humaneval} or {name, path, fields}.",
    )
    ngram: Int = Field(10, ge=1, description="n-gram length, in code tokens.")
    short_texts: ShortTexts = Field("skip", description="Benchmark texts under `ngram` tokens.")


def corpus_file(t: ContaminationTask) -> Path:
    from albor.data.corpus import CORPUS_FILE, require_corpus, require_splits

    if t.split is not None:
        require_splits(t.corpus)
        return t.corpus / f"{t.split}.parquet"
    require_corpus(t.corpus)
    return t.corpus / CORPUS_FILE


def plan(t: ContaminationTask, pl: Planning, name: str) -> dict[str, Any]:
    from albor.data.corpus import num_rows
    from albor.evals.contamination import check_benchmarks

    p = pl.p
    est: dict[str, Any] = {}
    try:
        path = corpus_file(t)
        est["documents"] = num_rows(path)
        p.add(name, "ok", f"{path}: {est['documents']:,} documents")
    except (ArtifactError, DataError) as e:
        p.add(name, "fail", str(e))
    for benchmark, ok, detail in check_benchmarks(t.benchmarks, t.ngram, t.short_texts)[2]:
        p.add(f"{name}.{benchmark}", "ok" if ok else "fail", detail)
    return est


def run(t: ContaminationTask, models: Models, name: str, out: Path) -> tuple[dict[str, Any], str]:
    from albor.data.corpus import iter_batches, num_rows
    from albor.evals.contamination import index_benchmarks, scan

    index, loaded = index_benchmarks(t.benchmarks, t.ngram, t.short_texts)
    problems = sum(len(b.problems) for b in loaded.values())
    index.ready()
    corpus = corpus_file(t)
    lines: list[dict[str, Any]] = []
    hit_problems: set[tuple[str, str]] = set()
    documents = 0
    with progress.bar("contamination", num_rows(corpus)) as bar:
        for batch in iter_batches(corpus, ["text", "path", "sha256"]):
            rows = batch.to_pylist()
            documents += len(rows)
            for offset, hit in scan(index, (row["text"] for row in rows)):
                row = rows[offset]
                hit_problems.update(hit.by_problem)
                lines.append(
                    {
                        "path": row["path"],
                        "sha256": row["sha256"],
                        "shared_ngrams": hit.shared,
                        "problems": {f"{b}/{tid}": n for (b, tid), n in hit.by_problem.items()},
                    }
                )
            bar.advance(len(rows))
    atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    metrics = {
        "documents": documents,
        "contaminated_documents": len(lines),
        "contaminated_fraction": round(len(lines) / documents, 6) if documents else 0.0,
        "problems": problems,
        "problems_found": len(hit_problems),
        "problems_found_fraction": round(len(hit_problems) / problems, 6) if problems else 0.0,
        "ngram": t.ngram,
    }
    summary = (
        f"{len(lines)} of {documents} documents share {t.ngram}-grams with "
        f"{len(hit_problems)} of {problems} benchmark problems"
    )
    return metrics, summary
