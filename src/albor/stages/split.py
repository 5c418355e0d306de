"""split: a corpus into train / val / test by document, deterministically and without leakage.

A document's split is decided by the hash of its content (salted by `seed`), so the same text always
lands in the same split, duplicates cannot straddle two splits, and adding documents never moves the
others.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from albor.data.corpus import (
    CORPUS_FILE,
    SPLITS,
    CorpusWriter,
    draw_split,
    iter_batches,
    num_rows,
    require_corpus,
)
from albor.errors import ArtifactError
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input, counts

NAME = "split"
INPUTS = ("input",)


class Config(OutputConfig):
    input: Path | None = Field(
        None, description="Corpus artifact directory (from ingest or clean)."
    )
    val: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of documents for validation.")
    test: float = Field(0.05, ge=0.0, lt=1.0, description="Fraction of documents for test.")
    seed: str = Field("albor", description="Salt of the content hash; change it for another split.")
    batch_rows: int = Field(1024, gt=0, description="Rows per record batch while streaming.")

    @model_validator(mode="after")
    def _fractions(self) -> Config:
        if self.val + self.test >= 1.0:
            raise ValueError(
                f"val + test = {self.val + self.test:g} leaves nothing to train on: make it below 1"
            )
        return self


def assign(sha256: str, cfg: Config) -> str:
    """The split of a document with content hash `sha256`: a uniform draw from the salted hash."""
    return draw_split(sha256, cfg.seed, cfg.val, cfg.test)


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    p.estimates["fractions"] = {
        "train": round(1 - cfg.val - cfg.test, 4),
        "val": cfg.val,
        "test": cfg.test,
    }

    def rows(path: Path) -> int:
        require_corpus(path)
        return num_rows(path / CORPUS_FILE)  # rows, repeats included (mix upsamples)

    docs = check_input(p, ctx, "input", cfg.input, rows, "a corpus artifact directory")
    if docs is not None:
        p.add("input", "ok", f"{cfg.input} ({docs} documents)")
        p.estimates["documents"] = {
            "train": round(docs * (1 - cfg.val - cfg.test)),
            "val": round(docs * cfg.val),
            "test": round(docs * cfg.test),
        }
        p.warn_if(
            "val size",
            cfg.val > 0 and docs * cfg.val < 1,
            f"about {docs * cfg.val:.1f} validation documents expected: raise `val` or add data",
            "enough documents for a validation split",
        )
    p.actions.append(f"write {', '.join(s + '.parquet' for s in SPLITS)} to {cfg.output}")
    return p


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    assert cfg.input is not None
    writers = {s: CorpusWriter(ctx.out / f"{s}.parquet", cfg.batch_rows) for s in SPLITS}
    total = 0
    try:
        for batch in iter_batches(cfg.input / CORPUS_FILE, batch_rows=cfg.batch_rows):
            rows = batch.to_pylist()
            total += len(rows)
            for row in rows:
                writers[assign(row["sha256"], cfg)].write(row)
    finally:
        for w in writers.values():
            w.close()
    per = {s: writers[s].rows for s in SPLITS}
    size = {s: writers[s].bytes for s in SPLITS}
    if per["train"] == 0:
        raise ArtifactError(f"{cfg.input}: no document fell in the train split ({total} in all)")
    return Outcome(
        summary=", ".join(f"{s} {per[s]} docs ({size[s] / 1e6:.1f} MB)" for s in SPLITS),
        counts=counts(total, total, {}),
        metrics={"documents": per, "bytes": size},
    )
