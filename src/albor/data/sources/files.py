"""Files on disk: glob patterns, walking directories without following directory symlinks, and
reading each file of a stdlib, dir, glob or git source.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from albor.data.sources.config import (
    DEFAULT_INCLUDE,
    STDLIB_EXCLUDE,
    DirSource,
    FileSource,
    GitSource,
    StdlibSource,
    label,
    stdlib_root,
)
from albor.data.sources.read import UNREADABLE, Read, read_file
from albor.errors import DataError

_GLOB_CHARS = frozenset("*?[")


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
        from albor.data.sources.git import git_checkout  # git.py uses this module's matcher

        checkout = git_checkout(src)
        for rel in checkout.files:
            yield Entry(str(checkout.root / rel), rel)
        return
    root, include, exclude = file_layout(src)
    try:
        yield from walk(root, include, exclude)
    except OSError as e:
        raise DataError(f"{root}: cannot list directory: {e.strerror} (check permissions)") from e


def _iter_files(src: FileSource, max_bytes: int) -> Iterator[Read]:
    for entry in file_entries(src):
        if not entry.listable:
            yield Read(entry.rel, None, UNREADABLE)
            continue
        text, reason = read_file(entry.path, max_bytes)
        yield Read(entry.rel, text, reason)
