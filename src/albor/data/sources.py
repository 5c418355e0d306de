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

import errno
import gzip
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sysconfig
import tokenize
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from albor.config import StageConfig
from albor.errors import DataError

# Why a file or row was not kept. Files: the first eight; rows of Parquet / JSONL / hf: the rest,
# plus binary / invalid_utf8 / bad_encoding / empty / too_large, which apply to a row's text as they
# do to a file's.
BINARY = "binary"
INVALID_UTF8 = "invalid_utf8"
BAD_ENCODING = "bad_encoding"
EMPTY = "empty"
TOO_LARGE = "too_large"
UNREADABLE = "unreadable"
BROKEN_LINK = "broken_link"
NOT_A_FILE = "not_a_file"
NOT_JSON = "not_json"
MISSING_COLUMN = "missing_column"
NULL_TEXT = "null_text"
NOT_TEXT = "not_text"
REASONS = (
    BINARY,
    INVALID_UTF8,
    BAD_ENCODING,
    EMPTY,
    TOO_LARGE,
    UNREADABLE,
    BROKEN_LINK,
    NOT_A_FILE,
    NOT_JSON,
    MISSING_COLUMN,
    NULL_TEXT,
    NOT_TEXT,
)

DEFAULT_INCLUDE = ("**/*.py",)
# Third-party packages live inside the stdlib directory on most installs; they are not the stdlib.
STDLIB_EXCLUDE = ("**/site-packages/**", "**/dist-packages/**")
_GLOB_CHARS = frozenset("*?[")


# --- source configs -------------------------------------------------------------------------------


class _Source(StageConfig):
    name: str | None = Field(
        default=None,
        min_length=1,
        description="Name recorded in the corpus `source` column (default: the source type).",
    )


class StdlibSource(_Source):
    """The running Python's standard library (.py files), without site-packages."""

    type: Literal["stdlib"] = Field(
        default="stdlib", description="The running Python's standard library."
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Extra globs (relative to the stdlib directory) to leave out, e.g. `test/**`.",
    )


class DirSource(_Source):
    """A local directory, walked without following directory symlinks."""

    type: Literal["dir"] = Field(default="dir", description="A local directory of source files.")
    path: Path = Field(description="The directory to walk.")
    include: list[str] = Field(
        default_factory=lambda: list(DEFAULT_INCLUDE),
        min_length=1,
        description="Globs (relative to `path`, `**` for any depth) of the files to read.",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Globs (relative to `path`) of files or folders to skip."
    )


class GlobSource(_Source):
    """Files matching one glob pattern."""

    type: Literal["glob"] = Field(default="glob", description="Files matching a glob pattern.")
    pattern: str = Field(
        min_length=1, description="A glob such as `src/**/*.py` (`**` matches any depth)."
    )


class GitSource(_Source):
    """The files a git checkout tracks (`git ls-files`), read from its working tree."""

    type: Literal["git"] = Field(
        default="git", description="A git checkout on disk; only tracked files are read."
    )
    path: Path = Field(description="The checkout (or a folder inside it) whose files to read.")
    include: list[str] = Field(
        default_factory=lambda: list(DEFAULT_INCLUDE),
        min_length=1,
        description="Globs (relative to `path`, `**` for any depth) of the tracked files to read.",
    )
    exclude: list[str] = Field(
        default_factory=list, description="Globs (relative to `path`) of tracked files to skip."
    )


class _TableSource(_Source):
    path: Path = Field(description="The file to read.")
    column: str = Field(
        default="text", min_length=1, description="Column (key) holding the document text."
    )
    path_column: str | None = Field(
        default=None, description="Column (key) holding each document's path (default: FILE:ROW)."
    )


class ParquetSource(_TableSource):
    """Documents in a text column of a Parquet file."""

    type: Literal["parquet"] = Field(
        default="parquet", description="A Parquet file with a text column."
    )


class JsonlSource(_TableSource):
    """Documents in a key of each line of a JSON Lines file (`.jsonl` or `.jsonl.gz`)."""

    type: Literal["jsonl"] = Field(
        default="jsonl", description="A JSON Lines file, one object per line."
    )


class HfSource(_Source):
    """A split of a Hugging Face `datasets` dataset, read from the local cache only."""

    type: Literal["hf"] = Field(
        default="hf", description="A Hugging Face dataset already in the local cache (offline)."
    )
    dataset: str = Field(
        min_length=1,
        pattern=r"^[\w.-]+(/[\w.-]+)?$",
        description="Dataset id on the Hub, `org/name`, e.g. `codeparrot/codeparrot-clean`.",
    )
    split: str = Field(default="train", min_length=1, description="Split to read.")
    column: str = Field(
        default="content", min_length=1, description="Column holding the document text."
    )
    config: str | None = Field(
        default=None, description="Dataset configuration (subset) name; null for the default."
    )
    path_column: str | None = Field(
        default=None,
        description="Column holding each document's path (default: DATASET:SPLIT:ROW).",
    )


Source = Annotated[
    StdlibSource | DirSource | GlobSource | GitSource | ParquetSource | JsonlSource | HfSource,
    Field(discriminator="type"),
]
FileSource = StdlibSource | DirSource | GlobSource | GitSource

HF_EXTRA = "pip install 'albor[hf]'"


def label(src: Source) -> str:
    """The name a source's documents carry in the corpus `source` column."""
    return src.name or src.type


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def location(src: Source) -> str:
    """The directory, file, pattern or dataset a source reads."""
    if isinstance(src, StdlibSource):
        return str(stdlib_root())
    if isinstance(src, GlobSource):
        return src.pattern
    if isinstance(src, HfSource):
        return src.dataset
    return str(src.path)


def describe(src: Source) -> str:
    """Where a source reads from, in words."""
    if isinstance(src, HfSource):
        subset = f" ({src.config})" if src.config else ""
        return f"hf {src.dataset}{subset} split {src.split}"
    return f"{src.type} {location(src)}"


# --- glob patterns --------------------------------------------------------------------------------


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob: `*` and `?` stay within one path segment, `**` spans any depth.

    `**/*.py` matches `a.py` and `a/b/c.py`; `test/**` matches everything under `test/`. Character
    classes are those of `fnmatch` (`[abc]`, `[!abc]`).
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append(re.escape(c))
                i += 1
                continue
            body = pattern[i + 1 : j].replace("\\", "\\\\")
            # Inside a class, `re` may one day read `[`, `&&`, `~~`, `||` as set operations.
            body = re.sub(r"([\[&~|])", r"\\\1", body)
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append(f"[{body}]")
            i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def split_glob(pattern: str) -> tuple[Path, str]:
    """Split `a/b/**/*.py` into the directory to walk (`a/b`) and the part to match (`**/*.py`)."""
    parts = PurePosixPath(os.path.expanduser(pattern)).parts
    for i, part in enumerate(parts):
        if _GLOB_CHARS & set(part):
            return Path(*parts[:i]), "/".join(parts[i:])
    # No wildcard: one file, matched by its name in its directory.
    return Path(*parts[:-1]), parts[-1]


class _Matcher:
    """Include / exclude globs over paths relative to a root, with directory pruning."""

    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        self.include = [glob_regex(p) for p in include]
        self.exclude = [glob_regex(p) for p in exclude]
        # Without `**`, a pattern reaches a fixed depth; deeper directories need not be listed.
        self.max_depth = (
            None if any("**" in p for p in include) else max(p.count("/") for p in include)
        )

    def wants_dir(self, rel: str, depth: int) -> bool:
        if self.max_depth is not None and depth > self.max_depth:
            return False
        # `rel + "/"` lets `test/**` prune the folder `test` itself.
        return not any(r.fullmatch(rel) or r.fullmatch(rel + "/") for r in self.exclude)

    def wants_file(self, rel: str) -> bool:
        return any(r.fullmatch(rel) for r in self.include) and not any(
            r.fullmatch(rel) for r in self.exclude
        )


# --- walking files --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A file a walk has seen: where it is on disk, and its path relative to the source root.

    `listable` is False for a sub-directory that could not be listed: its files cannot be seen one
    by one, so it is reported (as `unreadable`) rather than silently skipped.
    """

    path: str
    rel: str
    listable: bool = True


def walk(root: Path, include: Sequence[str], exclude: Sequence[str] = ()) -> Iterator[Entry]:
    """The files under `root` whose relative path matches `include` and not `exclude`, sorted.

    Directory symlinks are never followed (a loop cannot hang the walk); file symlinks are yielded
    like files and resolved when read, so a dangling one or a loop is reported as `broken_link`.
    """
    matcher = _Matcher(include, exclude)
    stack: list[tuple[str, str, int]] = [(str(root), "", 0)]
    while stack:
        directory, prefix, depth = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            if not prefix:
                raise
            yield Entry(directory, prefix, listable=False)
            continue
        subdirs = []
        for e in entries:
            rel = prefix + e.name
            try:
                is_dir = e.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                if matcher.wants_dir(rel, depth + 1):
                    subdirs.append((e.path, rel + "/", depth + 1))
            elif matcher.wants_file(rel):
                yield Entry(e.path, rel)
        stack.extend(reversed(subdirs))


def file_layout(src: FileSource) -> tuple[Path, list[str], list[str]]:
    """(root, include, exclude) of a file source; DataError when the root is not a directory."""
    if isinstance(src, StdlibSource):
        root, include, exclude = (
            stdlib_root(),
            list(DEFAULT_INCLUDE),
            [*STDLIB_EXCLUDE, *src.exclude],
        )
        where = "stdlib"
    elif isinstance(src, DirSource | GitSource):
        root, include, exclude = src.path.expanduser(), src.include, src.exclude
        where = f"sources[{label(src)}].path"
    else:
        root, rest = split_glob(src.pattern)
        include, exclude = [rest], []
        where = f"sources[{label(src)}].pattern"
    if not root.exists():
        raise DataError(f"{root}: directory not found ({where}: check the path)")
    if not root.is_dir():
        raise DataError(
            f"{root}: not a directory ({where}: point it at a folder, or use `type: glob`)"
        )
    return root, include, exclude


def file_entries(src: FileSource) -> Iterator[Entry]:
    """The files a file source sees; DataError when its root cannot be listed."""
    if isinstance(src, GitSource):
        checkout = git_checkout(src)
        for rel in checkout.files:
            yield Entry(str(checkout.root / rel), rel)
        return
    root, include, exclude = file_layout(src)
    try:
        yield from walk(root, include, exclude)
    except OSError as e:
        raise DataError(f"{root}: cannot list directory: {e.strerror} (check permissions)") from e


# --- git checkouts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GitCheckout:
    """What a git source reads: tracked files under `root` that match its globs, sorted."""

    root: Path
    commit: str | None  # HEAD; None in a repository without commits
    files: list[str]  # relative to root


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """Run one local git command in `root`; DataError when git is not installed."""
    # No prompt can block us, and read-only commands take no optional lock (plans write nothing).
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            env=env,
            check=False,
        )
    except FileNotFoundError as e:
        raise DataError(
            "git: command not found: install git (e.g. `apt-get install git`) to read a "
            "`type: git` source, or read the folder with `type: dir`"
        ) from e


def _stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    return " ".join(result.stderr.decode("utf-8", "replace").split()) or f"exit {result.returncode}"


def git_checkout(src: GitSource) -> GitCheckout:
    """List a git source's tracked files (`git ls-files`, local only) and its HEAD commit.

    DataError when the path is missing, is not inside a git working tree, or git is missing."""
    root, include, exclude = file_layout(src)
    where = f"sources[{label(src)}].path"
    inside = _git(root, "rev-parse", "--is-inside-work-tree")
    if inside.returncode != 0 or inside.stdout.strip() != b"true":
        raise DataError(
            f"{root}: not a git working tree ({_stderr(inside)}): point {where} at a git "
            "checkout, or use `type: dir` to read every file of the folder"
        )
    head = _git(root, "rev-parse", "--verify", "--quiet", "HEAD^{commit}")
    commit = head.stdout.decode().strip() if head.returncode == 0 else None
    # -z: paths verbatim (no quoting of unusual names); --cached: what the index tracks.
    listed = _git(root, "ls-files", "-z", "--cached")
    if listed.returncode != 0:
        raise DataError(f"{root}: `git ls-files` failed: {_stderr(listed)}")
    matcher = _Matcher(include, exclude)
    # A path in a merge conflict is listed once per stage; a set keeps one.
    tracked = sorted({os.fsdecode(p) for p in listed.stdout.split(b"\0") if p})
    return GitCheckout(root, commit, [rel for rel in tracked if matcher.wants_file(rel)])


def git_dirty(src: GitSource) -> bool:
    """True when tracked files differ from the commit (what ingest reads is the working tree)."""
    root = src.path.expanduser()
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=no")
    return status.returncode != 0 or bool(status.stdout.strip(b"\0"))


# --- reading --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Read:
    """One file or row seen: its text when kept, else the reason it was rejected."""

    path: str
    text: str | None
    reason: str | None = None


def stat_reason(st: os.stat_result, max_bytes: int) -> str | None:
    """The rejection that `stat` alone can tell, before any byte is read."""
    if not stat.S_ISREG(st.st_mode):
        return NOT_A_FILE
    if st.st_size > max_bytes:
        return TOO_LARGE
    if st.st_size == 0:
        return EMPTY
    return None


def decode(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) for usable source bytes, (None, reason) otherwise.

    Decoded as Python decodes a source file (`tokenize.detect_encoding`, PEP 263): UTF-8, without
    its BOM, unless a coding cookie in the first two lines names another codec. A cookie naming a
    codec Python does not know, or a BOM contradicting the cookie, is `bad_encoding`; bytes that
    are not UTF-8 where no cookie says otherwise are `invalid_utf8`."""
    if b"\0" in data:
        return None, BINARY
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as e:
        # "invalid or missing encoding declaration": a first line that is not UTF-8 and holds no
        # cookie. Anything else ("unknown encoding: x", "encoding problem: utf-8") is the cookie.
        return None, INVALID_UTF8 if "invalid or missing" in str(e) else BAD_ENCODING
    try:
        text = data.decode(encoding)
    except LookupError:  # a codec that is not a text encoding, such as rot13 or hex
        return None, BAD_ENCODING
    except UnicodeDecodeError:
        return None, INVALID_UTF8 if encoding in ("utf-8", "utf-8-sig") else BAD_ENCODING
    # utf-8-sig drops a BOM; another codec may decode one, and the model should not learn it.
    text = text.removeprefix("\ufeff")
    if not text.strip():
        return None, EMPTY
    return text, None


def read_file(path: str, max_bytes: int) -> tuple[str | None, str | None]:
    """Read one source file: (text, None) or (None, reason). Never blocks on a FIFO."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, BROKEN_LINK if os.path.islink(path) else UNREADABLE
    except OSError as e:
        return None, BROKEN_LINK if e.errno == errno.ELOOP else UNREADABLE
    reason = stat_reason(st, max_bytes)
    if reason is not None:
        return None, reason
    try:
        # O_NONBLOCK: if the file was swapped for a FIFO after the stat, opening it must not block.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None, UNREADABLE
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None, NOT_A_FILE
            data = f.read(max_bytes + 1)
    except OSError:
        return None, UNREADABLE
    if len(data) > max_bytes:  # it grew since the stat
        return None, TOO_LARGE
    return decode(data)


def check_text(path: str, text: str, max_bytes: int) -> Read:
    """The checks a file's bytes get, applied to a row's text."""
    if "\0" in text:
        return Read(path, None, BINARY)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from a JSON `\ud800` escape
        return Read(path, None, INVALID_UTF8)
    if size > max_bytes:
        return Read(path, None, TOO_LARGE)
    if not text.strip():
        return Read(path, None, EMPTY)
    return Read(path, text.removeprefix("\ufeff"))


def _iter_files(src: FileSource, max_bytes: int) -> Iterator[Read]:
    for entry in file_entries(src):
        if not entry.listable:
            yield Read(entry.rel, None, UNREADABLE)
            continue
        text, reason = read_file(entry.path, max_bytes)
        yield Read(entry.rel, text, reason)


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
