"""Where a corpus comes from: the running Python's stdlib, local directories, globs, git checkouts,
Parquet, JSONL and Hugging Face datasets in the local cache.

Every file (or row) a source holds is *seen* once and comes out as a `Read`: its text, or the
reason it was rejected (`REASONS`). Files are `stat`-ed before they are opened, so FIFOs, devices
and sockets are never opened (a FIFO would block), oversized files are never read, and directory
symlinks are not followed, so a symlink loop cannot hang a walk. Bytes are decoded as Python reads
source (PEP 263): UTF-8, or the codec a coding cookie in the first two lines names; the corpus holds
the decoded text, and stores it as UTF-8. `scan` counts files and bytes from `stat` alone (for
plans), and `state` hashes (path, size, mtime) so a fingerprint notices a changed source.

A git source reads only the files git tracks (`git ls-files`, no network) and records the commit;
an hf source reads a `datasets` dataset from the local cache only, with the Hub switched off.

Sources are typed configs (a pydantic union on `type`), so any stage that reads documents can take
them: `iter_source(src, max_bytes)` streams `Read`s; nothing here holds a corpus in memory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from albor.data.sources.config import (
    DEFAULT_INCLUDE,
    HF_EXTRA,
    STDLIB_EXCLUDE,
    DirSource,
    FileSource,
    GitSource,
    GlobSource,
    HfSource,
    JsonlSource,
    ParquetSource,
    Source,
    StdlibSource,
    describe,
    label,
    location,
    stdlib_root,
)
from albor.data.sources.files import (
    Entry,
    _iter_files,
    file_entries,
    file_layout,
    glob_regex,
    split_glob,
    walk,
)
from albor.data.sources.git import GitCheckout, git_checkout, git_dirty
from albor.data.sources.read import (
    BAD_ENCODING,
    BINARY,
    BROKEN_LINK,
    EMPTY,
    INVALID_UTF8,
    MISSING_COLUMN,
    NOT_A_FILE,
    NOT_JSON,
    NOT_TEXT,
    NULL_TEXT,
    REASONS,
    TOO_LARGE,
    UNREADABLE,
    Read,
    check_text,
    decode,
    read_file,
    stat_reason,
)
from albor.data.sources.tables import (
    _iter_hf,
    _iter_jsonl,
    _iter_parquet,
    load_hf,
    open_parquet,
    read_value,
)
from albor.errors import DataError

__all__ = [
    "BAD_ENCODING",
    "BINARY",
    "BROKEN_LINK",
    "DEFAULT_INCLUDE",
    "EMPTY",
    "HF_EXTRA",
    "INVALID_UTF8",
    "MISSING_COLUMN",
    "NOT_A_FILE",
    "NOT_JSON",
    "NOT_TEXT",
    "NULL_TEXT",
    "REASONS",
    "STDLIB_EXCLUDE",
    "TOO_LARGE",
    "UNREADABLE",
    "DirSource",
    "Entry",
    "FileSource",
    "GitCheckout",
    "GitSource",
    "GlobSource",
    "HfSource",
    "JsonlSource",
    "ParquetSource",
    "Read",
    "Scan",
    "Source",
    "StdlibSource",
    "check_text",
    "decode",
    "describe",
    "file_entries",
    "file_layout",
    "git_checkout",
    "git_dirty",
    "glob_regex",
    "iter_source",
    "label",
    "load_hf",
    "location",
    "open_parquet",
    "read_file",
    "read_value",
    "scan",
    "split_glob",
    "stat_reason",
    "state",
    "stdlib_root",
    "walk",
]


def iter_source(src: Source, max_bytes: int, batch_rows: int = 1024) -> Iterator[Read]:
    """Every file or row of `src`, once, in a stable order; DataError for an unusable source."""
    if isinstance(src, ParquetSource):
        return _iter_parquet(src, max_bytes, batch_rows)
    if isinstance(src, JsonlSource):
        return _iter_jsonl(src, max_bytes)
    if isinstance(src, HfSource):
        return _iter_hf(src, max_bytes, batch_rows)
    return _iter_files(src, max_bytes)


# --- plans and fingerprints (stat only) -----------------------------------------------------------


@dataclass
class Scan:
    """What a source holds, from `stat` and Parquet footers only."""

    items: int | None  # files or rows; None for JSONL, whose lines are counted only when read
    bytes: int  # bytes that would be read (files within max_bytes; the text column; the JSONL file)
    too_large: int = 0
    unit: str = "files"

    @property
    def detail(self) -> str:
        count = f"{self.items} {self.unit}" if self.items is not None else "lines counted on apply"
        extra = f", {self.too_large} over max_file_bytes" if self.too_large else ""
        return f"{count}, {self.bytes / 1e6:.1f} MB{extra}"


def scan(src: Source, max_bytes: int) -> Scan:
    """Count what `src` holds without reading contents; DataError when it is missing or unusable."""
    if isinstance(src, ParquetSource):
        pf = open_parquet(src)
        meta = pf.metadata
        if meta.num_rows == 0:
            raise DataError(f"{src.path}: Parquet file holds no rows (point the source at data)")
        size = 0
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                if group.column(c).path_in_schema == src.column:
                    size += group.column(c).total_uncompressed_size
        return Scan(meta.num_rows, size, unit="rows")
    if isinstance(src, JsonlSource):
        path = src.path.expanduser()
        if not path.is_file():
            what = "not a file" if path.exists() else "file not found"
            raise DataError(f"{path}: {what} (sources[{label(src)}].path: check the path)")
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"{path}: empty JSONL file (point the source at data)")
        return Scan(None, size, unit="lines")
    if isinstance(src, HfSource):
        ds = load_hf(src)
        if len(ds) == 0:
            raise DataError(f"dataset {src.dataset}: split {src.split} holds no rows")
        return Scan(len(ds), int(ds.data.column(src.column).nbytes), unit="rows")
    files = total = too_large = 0
    for entry in file_entries(src):
        files += 1
        try:
            st = os.stat(entry.path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            if st.st_size > max_bytes:
                too_large += 1
            else:
                total += st.st_size
    if files == 0:
        root, include, _ = file_layout(src)
        what = "tracked file" if isinstance(src, GitSource) else "file"
        raise DataError(
            f"{root}: no {what} matches {' or '.join(include)} "
            f"(sources[{label(src)}]: check the path and the include patterns)"
        )
    return Scan(files, total, too_large)


def state(src: Source) -> str:
    """sha256 over (path, size, mtime_ns) of what `src` reads: changes when any of it changes.

    A git source also hashes its commit; an hf source, the cache files of its split. Never raises:
    a source that cannot be listed hashes to its error, so the fingerprint still differs from that
    of a source that can.
    """
    h = hashlib.sha256()
    try:
        if isinstance(src, ParquetSource | JsonlSource):
            st = os.stat(src.path.expanduser())
            h.update(f"{src.path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        elif isinstance(src, HfSource):
            ds = load_hf(src)
            h.update(f"{src.dataset}\0{src.config}\0{src.split}\0{len(ds)}\n".encode())
            for f in ds.cache_files:
                st = os.stat(f["filename"])
                h.update(f"{f['filename']}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        else:
            if isinstance(src, GitSource):
                h.update(f"commit\0{git_checkout(src).commit}\n".encode())
            for entry in file_entries(src):
                try:
                    st = os.stat(entry.path)
                    h.update(f"{entry.rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                except OSError as e:
                    h.update(f"{entry.rel}\0{e.errno}\n".encode())
    except (OSError, DataError) as e:
        h.update(f"error\0{e}".encode())
    return h.hexdigest()
