"""Rows of Parquet and JSONL files and of Hugging Face datasets in the local cache (Hub off)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from albor.data.sources.config import HF_EXTRA, HfSource, JsonlSource, ParquetSource, label
from albor.data.sources.read import (
    INVALID_UTF8,
    MISSING_COLUMN,
    NOT_JSON,
    NOT_TEXT,
    NULL_TEXT,
    TOO_LARGE,
    Read,
    check_text,
    decode,
)
from albor.errors import DataError

_TEXT_TYPES = (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())


def open_parquet(src: ParquetSource) -> pq.ParquetFile:
    """Open a Parquet source (footer only); DataError if missing, corrupt or lacking a column."""
    path = src.path.expanduser()
    if not path.is_file():
        what = "not a file" if path.exists() else "file not found"
        raise DataError(f"{path}: {what} (sources[{label(src)}].path: check the path)")
    try:
        pf = pq.ParquetFile(str(path))
    except (OSError, pa.ArrowException) as e:
        raise DataError(
            f"{path}: not a readable Parquet file ({e}): check the file, or re-export it"
        ) from e
    schema = pf.schema_arrow
    for key, value in (("column", src.column), ("path_column", src.path_column)):
        if value is None:
            continue
        if value not in schema.names:
            raise DataError(
                f"{path}: no column '{value}' (columns: {', '.join(schema.names)}): "
                f"set sources[{label(src)}].{key} to one of them"
            )
    kind = schema.field(src.column).type
    if kind not in _TEXT_TYPES:
        raise DataError(
            f"{path}: column '{src.column}' holds {kind}, not text: "
            f"set sources[{label(src)}].column to the column with the source code"
        )
    return pf


def read_value(where: str, value: str | bytes | None, max_bytes: int) -> Read:
    """One cell of a text (or binary) column: null, bytes decoded as a file's, or text checked."""
    if value is None:
        return Read(where, None, NULL_TEXT)
    if isinstance(value, bytes):
        if len(value) > max_bytes:
            return Read(where, None, TOO_LARGE)
        text, reason = decode(value)
        return Read(where, text, reason)
    return check_text(where, value, max_bytes)


def _iter_parquet(src: ParquetSource, max_bytes: int, batch_rows: int) -> Iterator[Read]:
    pf = open_parquet(src)
    path = src.path.expanduser()
    columns = [src.column] + ([src.path_column] if src.path_column else [])
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            texts = batch.column(0).to_pylist()
            paths = batch.column(1).to_pylist() if src.path_column else [None] * len(texts)
            for value, given in zip(texts, paths, strict=True):
                where = str(given) if given is not None else f"{path.name}:{row}"
                row += 1
                yield read_value(where, value, max_bytes)
    except (OSError, pa.ArrowException) as e:
        raise DataError(
            f"{path}: corrupt Parquet data after row {row} ({e}): re-export the file"
        ) from e


def _open_lines(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def _iter_jsonl(src: JsonlSource, max_bytes: int) -> Iterator[Read]:
    path = src.path.expanduser()
    if not path.is_file():
        what = "not a file" if path.exists() else "file not found"
        raise DataError(f"{path}: {what} (sources[{label(src)}].path: check the path)")
    try:
        with _open_lines(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():  # blank lines separate nothing; they are not records
                    continue
                where = f"{path.name}:{lineno}"
                try:
                    obj: Any = json.loads(raw)
                except ValueError:  # includes UnicodeDecodeError
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError:
                        yield Read(where, None, INVALID_UTF8)
                        continue
                    yield Read(where, None, NOT_JSON)
                    continue
                if not isinstance(obj, dict) or src.column not in obj:
                    yield Read(where, None, MISSING_COLUMN)
                    continue
                if src.path_column and isinstance(obj.get(src.path_column), str):
                    where = obj[src.path_column]
                value = obj[src.column]
                if value is None:
                    yield Read(where, None, NULL_TEXT)
                elif not isinstance(value, str):
                    yield Read(where, None, NOT_TEXT)
                else:
                    yield check_text(where, value, max_bytes)
    except (OSError, EOFError) as e:  # EOFError: a truncated .gz
        raise DataError(f"{path}: cannot read: {e} (check the file)") from e


# --- Hugging Face datasets (local cache only) -----------------------------------------------------


@contextmanager
def _hub_offline(datasets: Any) -> Iterator[None]:
    """Switch the Hub off for `datasets` and `huggingface_hub` while loading, as the environment
    variables HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 would. Both libraries read those once, at
    import, so once either is imported only their module settings still count; they are put back
    afterwards, so no one else's later download is refused."""
    import huggingface_hub.constants as hub

    switches = [
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
        (hub, "HF_HUB_OFFLINE"),
    ]
    saved = [(obj, key, getattr(obj, key)) for obj, key in switches if hasattr(obj, key)]
    for obj, key, _ in saved:
        setattr(obj, key, True)
    try:
        yield
    finally:
        for obj, key, value in saved:
            setattr(obj, key, value)


def load_hf(src: HfSource) -> Any:
    """The `datasets.Dataset` of an hf source, from the local cache with the Hub off.

    DataError when `datasets` is not installed (naming the extra), the dataset, split or config is
    not in the cache, or the column is missing or not text."""
    name = label(src)
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"sources[{name}]: reading dataset {src.dataset} needs the optional `datasets` "
            f"package: {HF_EXTRA}"
        ) from e
    cache = datasets.config.HF_DATASETS_CACHE
    with _hub_offline(datasets):
        try:
            ds = datasets.load_dataset(
                src.dataset,
                src.config,
                split=src.split,
                download_mode="reuse_cache_if_exists",
            )
        except (ConnectionError, FileNotFoundError) as e:  # what offline mode raises when absent
            raise DataError(
                f"dataset {src.dataset} is not in the local HF cache ({cache}): download it on a "
                "machine with network, or use a parquet source"
            ) from e
        except (ValueError, KeyError) as e:  # an unknown split or config of a cached dataset
            raise DataError(
                f"dataset {src.dataset}: {e} (check sources[{name}].split and .config)"
            ) from e
        except Exception as e:  # anything else `datasets` raises, e.g. a damaged cache entry
            raise DataError(
                f"dataset {src.dataset}: cannot load it from the local HF cache ({cache}): "
                f"{type(e).__name__}: {e}"
            ) from e
    columns = list(ds.column_names)
    for key, value in (("column", src.column), ("path_column", src.path_column)):
        if value is not None and value not in columns:
            raise DataError(
                f"dataset {src.dataset}: no column '{value}' (columns: {', '.join(columns)}): "
                f"set sources[{name}].{key} to one of them"
            )
    kind = getattr(ds.features[src.column], "dtype", None)
    if kind not in ("string", "large_string", "binary", "large_binary"):
        raise DataError(
            f"dataset {src.dataset}: column '{src.column}' holds {ds.features[src.column]}, not "
            f"text: set sources[{name}].column to the column with the source code"
        )
    return ds


def _iter_hf(src: HfSource, max_bytes: int, batch_rows: int) -> Iterator[Read]:
    ds = load_hf(src)
    columns = [src.column] + ([src.path_column] if src.path_column else [])
    row = 0
    for batch in ds.select_columns(columns).with_format("arrow").iter(batch_size=batch_rows):
        texts = batch.column(src.column).to_pylist()
        paths = batch.column(src.path_column).to_pylist() if src.path_column else None
        for i, value in enumerate(texts):
            given = paths[i] if paths is not None else None
            where = str(given) if given is not None else f"{src.dataset}:{src.split}:{row}"
            row += 1
            yield read_value(where, value, max_bytes)
