"""Progress for long work, on stderr: rich bars on a terminal, plain lines anywhere else.

Library code reports progress through these helpers and never prints otherwise; `quiet()` turns
them off (the CLI does it for `--json`). When stderr is not a terminal (CI, nohup, a pipe) a bar
writes one plain line every `INTERVAL_S` seconds (env `ALBOR_PROGRESS_INTERVAL` overrides it) and
a final one when it closes, so a ten-minute run still says how far it is; work that ends within
one interval writes nothing, so quick steps keep logs short.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
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

from albor.errors import ConfigError

T = TypeVar("T")
_enabled = True

# Seconds between two plain progress lines: often enough to show a run is alive, rarely enough
# that an hour-long log stays readable.
INTERVAL_S = 30.0
INTERVAL_ENV = "ALBOR_PROGRESS_INTERVAL"

Fields = Mapping[str, object]


def quiet(flag: bool = True) -> None:
    global _enabled
    _enabled = not flag


def enabled() -> bool:
    """Whether rich bars are drawn (progress is on and stderr is a terminal)."""
    return _enabled and sys.stderr.isatty()


def interval() -> float:
    """Seconds between plain progress lines: `ALBOR_PROGRESS_INTERVAL` if set, else INTERVAL_S."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return INTERVAL_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also rejects nan
        raise ConfigError(f"{INTERVAL_ENV}={raw!r}: expected seconds >= 0, e.g. 30")
    return seconds


def format_duration(seconds: float) -> str:
    """`45s`, `3m05s`, `2h07m`: short enough for a log line."""
    s = round(max(seconds, 0.0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


def _format_fields(fields: Fields) -> str:
    parts = []
    for k, v in fields.items():
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        parts.append(f"{k} {text}")
    return ", ".join(parts)


class Lines:
    """Plain progress lines at a steady cadence, for a stderr nobody watches live.

    `clock` is injectable so the cadence can be tested without sleeping.
    """

    def __init__(
        self,
        description: str,
        total: float | None,
        *,
        unit: str = "",
        completed: float = 0,
        every: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = completed
        self.fields: dict[str, object] = {}
        self.every = interval() if every is None else every
        self._clock = clock
        self._write = write or _to_stderr
        self._start = clock()
        self._start_done = completed  # a resumed run's earlier work does not count in its rate
        self._last_line = self._start
        self.lines = 0

    def _rate(self, now: float) -> float:
        elapsed = now - self._start
        return (self.completed - self._start_done) / elapsed if elapsed > 0 else 0.0

    def _count(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        done = _number(self.completed)
        if self.total:
            pct = 100.0 * self.completed / self.total
            return f"{done}/{_number(self.total)}{unit} ({pct:.1f}%)"
        return f"{done}{unit}"

    def _emit(self, text: str) -> None:
        if self.fields:
            text += ", " + _format_fields(self.fields)
        self._write(text)
        self.lines += 1

    def update(
        self,
        *,
        advance: float = 0,
        completed: float | None = None,
        description: str | None = None,
        fields: Fields | None = None,
    ) -> None:
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if description is not None:
            self.description = description
        if fields is not None:
            self.fields.update(fields)
        now = self._clock()
        if now - self._last_line < self.every:
            return
        self._last_line = now
        rate = self._rate(now)
        per = f"{self.unit or 'it'}/s"
        text = f"{self.description}: {self._count()}, {rate:.3g} {per}"
        text += f", elapsed {format_duration(now - self._start)}"
        if self.total and rate > 0:
            text += f", ETA {format_duration((self.total - self.completed) / rate)}"
        elif self.total:
            text += ", ETA ?"
        self._emit(text)

    def close(self, failed: bool = False) -> None:
        """The final line, if the work lasted at least one interval (quick work stays silent)."""
        now = self._clock()
        if self.lines == 0 and now - self._start < self.every:
            return
        finished = not failed and (not self.total or self.completed >= self.total)
        state = "done" if finished else "stopped at"
        rate = self._rate(now)
        per = f"{self.unit or 'it'}/s"
        self._emit(
            f"{self.description}: {state} {self._count()} in "
            f"{format_duration(now - self._start)} ({rate:.3g} {per})"
        )


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Bar:
    """One progress bar: rich on a terminal, plain lines otherwise, nothing when quiet."""

    def __init__(self, progress: Progress | None, lines: Lines | None = None) -> None:
        self._p = progress
        self._lines = lines
        self._fields: dict[str, object] = {}

    def _postfix(self, fields: Fields) -> str:
        self._fields.update(fields)
        return _format_fields(self._fields)

    def advance(self, n: float = 1, *, fields: Fields | None = None) -> None:
        if self._p is not None:
            self._p.advance(TaskID(0), n)
            if fields is not None:
                self._p.update(TaskID(0), postfix=self._postfix(fields))
        if self._lines is not None:
            self._lines.update(advance=n, fields=fields)

    def update(
        self,
        *,
        completed: float | None = None,
        description: str | None = None,
        fields: Fields | None = None,
    ) -> None:
        """Set the work done, the description, or fields shown after the counts (a training
        step's loss and tokens/s); a field keeps its last value until set again."""
        if self._p is not None:
            self._p.update(TaskID(0), completed=completed, description=description)
            if fields is not None:
                self._p.update(TaskID(0), postfix=self._postfix(fields))
        if self._lines is not None:
            self._lines.update(completed=completed, description=description, fields=fields)


@contextmanager
def bar(
    description: str, total: float | None, unit: str = "", completed: float = 0
) -> Iterator[Bar]:
    """A progress bar for `total` units of work (None: unknown), `completed` of them done
    already (a resumed run: its rate and ETA count only the work done from here)."""
    if not _enabled:
        yield Bar(None)
        return
    if not sys.stderr.isatty():
        lines = Lines(description, total, unit=unit, completed=completed)
        try:
            yield Bar(None, lines)
        except BaseException:
            lines.close(failed=True)
            raise
        lines.close()
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if unit == "" else TaskProgressColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[postfix]}"),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=True) as p:
        p.add_task(description, total=total, completed=int(completed), postfix="")
        yield Bar(p)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate `items` with a progress bar."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    with bar(description, total) as b:
        for item in items:
            yield item
            b.advance()
