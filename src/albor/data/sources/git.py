"""Git checkouts on disk: the tracked files (`git ls-files`, no network) and the commit."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from albor.data.sources.config import GitSource, label
from albor.data.sources.files import _Matcher, file_layout
from albor.errors import DataError

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
