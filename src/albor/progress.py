"""Progress bars for long work, on stderr, shown only when stderr is a terminal.

Library code reports progress through these helpers and never prints otherwise; `quiet()` turns
them off (the CLI does it for `--json`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")
_enabled = True


def quiet(flag: bool = True) -> None:
    global _enabled
    _enabled = not flag


def enabled() -> bool:
    return _enabled and sys.stderr.isatty()


class Bar:
    """One progress bar; every method is a no-op when bars are off."""

    def __init__(self, progress: Progress | None) -> None:
        self._p = progress

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(TaskID(0), n)

    def update(self, *, completed: float | None = None, description: str | None = None) -> None:
        if self._p is not None:
            self._p.update(TaskID(0), completed=completed, description=description)


@contextmanager
def bar(description: str, total: float | None, unit: str = "") -> Iterator[Bar]:
    """A progress bar for `total` units of work (None: unknown)."""
    if not enabled():
        yield Bar(None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if unit == "" else TaskProgressColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=True) as p:
        p.add_task(description, total=total)
        yield Bar(p)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items` with a progress bar."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    with bar(description, total) as b:
        for item in items:
            yield item
            b.advance()
