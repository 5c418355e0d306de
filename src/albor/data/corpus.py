"""The corpus format every data stage reads and writes: Parquet with one row per document.

Columns: `text` (the UTF-8 source), `path` (where it came from), `source` (which configured source),
`sha256` (of the UTF-8 text), `bytes` (its UTF-8 length). Writers stream record batches so memory
stays bounded by the batch size, not by the corpus.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from albor.artifact import read_manifest
from albor.errors import ArtifactError

SCHEMA = pa.schema(
    [
        ("text", pa.large_string()),
        ("path", pa.string()),
        ("source", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
    ]
)
CORPUS_FILE = "corpus.parquet"
REJECTED_FILE = "rejected.parquet"
SPLITS = ("train", "val", "test")


def rejected_schema(*extra: tuple[str, pa.DataType]) -> pa.Schema:
    """The rejection report of a filtering stage: enough to find the document again and see why
    (path, source, sha256, bytes, reason), plus the stage's own columns."""
    return pa.schema(
        [
            ("path", pa.string()),
            ("source", pa.string()),
            ("sha256", pa.string()),
            ("bytes", pa.int64()),
            ("reason", pa.string()),
            *extra,
        ]
    )


def document(text: str, path: str, source: str) -> dict[str, Any]:
    """A corpus row for `text`."""
    data = text.encode("utf-8")
    return {
        "text": text,
        "path": path,
        "source": source,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }


class RowWriter:
    """Stream rows of a fixed schema to a Parquet file, flushing every `batch_rows` rows."""

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int = 1024) -> None:
        self.path = path
        self.schema = schema
        self.batch_rows = batch_rows
        self.rows = 0
        self._buffer: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(str(path), schema, compression="zstd")

    def write(self, row: dict[str, Any]) -> None:
        self._buffer.append(row)
        self.rows += 1
        if len(self._buffer) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=self.schema))
            self._buffer = []

    def close(self) -> None:
        self.flush()
        self._writer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CorpusWriter(RowWriter):
    """A `RowWriter` of corpus rows that also counts the text bytes written."""

    def __init__(self, path: Path, batch_rows: int = 1024) -> None:
        super().__init__(path, SCHEMA, batch_rows)
        self.bytes = 0

    def write(self, row: dict[str, Any]) -> None:
        super().write(row)
        self.bytes += int(row["bytes"])

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self.flush()
        self._writer.write_batch(batch.select(SCHEMA.names).cast(SCHEMA))
        self.rows += batch.num_rows
        self.bytes += int(pc.sum(batch.column("bytes")).as_py() or 0)


def open_corpus(path: Path) -> pq.ParquetFile:
    try:
        f = pq.ParquetFile(str(path))
    except FileNotFoundError:
        raise ArtifactError(
            f"{path}: corpus file not found (run the stage that makes it)"
        ) from None
    except (OSError, pa.ArrowException) as e:
        raise ArtifactError(f"{path}: not a readable Parquet corpus: {e}") from e
    missing = [c for c in SCHEMA.names if c not in f.schema_arrow.names]
    if missing:
        raise ArtifactError(f"{path}: corpus lacks column(s) {', '.join(missing)}")
    return f


def iter_batches(
    path: Path, columns: list[str] | None = None, batch_rows: int = 1024
) -> Iterator[pa.RecordBatch]:
    """Record batches of at most `batch_rows` rows of a corpus file, read one row group at a time.

    One `ParquetFile.iter_batches` over a whole file keeps a share of every row group it has
    read until it is exhausted (pyarrow 26 on the stdlib x 10 corpus: 37 MB of Arrow memory after
    the first of 580 row groups, 156 MB after the last, for 64-row batches), so its memory grows
    with the file; a reader per row group stays at about one row group (9 MB there), at the same
    speed. A batch never spans two row groups, which albor's writers keep to `batch_rows` rows."""
    f = open_corpus(path)
    for group in range(f.metadata.num_row_groups):
        yield from f.iter_batches(batch_size=batch_rows, columns=columns, row_groups=[group])


def iter_texts(path: Path, batch_rows: int = 1024) -> Iterator[str]:
    for batch in iter_batches(path, ["text"], batch_rows):
        yield from batch.column("text").to_pylist()


def num_rows(path: Path) -> int:
    """Row count from the Parquet footer alone."""
    return int(open_corpus(path).metadata.num_rows)


def require_corpus(directory: Path) -> dict[str, Any]:
    """The manifest of a finished corpus artifact (any stage that writes `corpus.parquet`)."""
    manifest = read_manifest(directory)
    if not any(o["path"] == CORPUS_FILE for o in manifest["outputs"]):
        raise ArtifactError(
            f"{directory}: artifact of stage '{manifest['stage']}' holds no {CORPUS_FILE} "
            "(point the input at a corpus: the output of ingest or clean)"
        )
    return manifest


def require_splits(directory: Path) -> dict[str, Any]:
    """The manifest of a finished split artifact (train / val / test Parquet files)."""
    manifest = read_manifest(directory)
    have = {o["path"] for o in manifest["outputs"]}
    missing = [s for s in SPLITS if f"{s}.parquet" not in have]
    if missing:
        raise ArtifactError(
            f"{directory}: artifact of stage '{manifest['stage']}' lacks "
            f"{', '.join(m + '.parquet' for m in missing)} (point it at the output of split)"
        )
    return manifest


def draw_split(key: str, seed: str, val: float, test: float) -> str:
    """The split of an item identified by the hex digest `key`: a uniform draw from the salted
    hash, the rule the split stage applies to documents and the pairs stage to records."""
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2**64
    if u < val:
        return "val"
    if u < val + test:
        return "test"
    return "train"
