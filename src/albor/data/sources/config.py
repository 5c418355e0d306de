"""Source configs: a pydantic union on `type`, and what each source is called and reads."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from albor.config import StageConfig

DEFAULT_INCLUDE = ("**/*.py",)
# Third-party packages live inside the stdlib directory on most installs; they are not the stdlib.
STDLIB_EXCLUDE = ("**/site-packages/**", "**/dist-packages/**")

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
