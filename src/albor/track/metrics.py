"""`metrics.jsonl`, the per-step log of a training run: the one place that writes and reads it.

One JSON object per line, appended and flushed as training goes: `step` (int) and the values
logged at it (`loss`, `lr`, `grad_norm`, `tokens_per_s`, ... or `val_loss`, `val_bpb`, ... after
an evaluation, or an `event` such as a resume). JSON has no NaN: a value that is not a finite
number (the loss of a skipped step) is written as `null`, and a NaN or Infinity in a file written
before that rule is read as `None` too, so every reader sees one spelling of "no value".

A run killed mid-write leaves a torn last line; readers skip it (and any line that is not a JSON
object), and `truncate`, which a resumed run calls, drops it with the lines after the checkpoint.
`MetricsTail` follows the file as it grows (`albor monitor`); `tail` reads only its end (the
supervisor's heartbeat of a possibly huge log).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from albor.artifact import atomic_write_text

METRICS_FILE = "metrics.jsonl"
# How much of the end of the file `tail` reads: many lines, however long the run.
TAIL_BYTES = 64 * 1024


def _finite(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON cannot spell NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def encode(record: Mapping[str, Any]) -> str:
    """One record as its line (newline included)."""
    return json.dumps(_finite(record), allow_nan=False) + "\n"


def append(target: IO[str] | Path, record: Mapping[str, Any]) -> None:
    """Append `record` as one line to an open text file (flushed, so a watcher and a crash see
    it) or to the file at a path."""
    if isinstance(target, Path):
        with open(target, "a", encoding="utf-8") as f:
            f.write(encode(record))
        return
    target.write(encode(record))
    target.flush()


def parse(line: str | bytes) -> dict[str, Any] | None:
    """The record on one line, or None for a line that is torn, blank or not a JSON object."""
    try:
        # NaN / Infinity from files written before they became null.
        record = json.loads(line, parse_constant=lambda _: None)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError of a line cut inside a character
        return None
    return record if isinstance(record, dict) else None


def _parse_all(lines: list[str]) -> list[dict[str, Any]]:
    return [r for r in map(parse, lines) if r is not None]


def read(path: Path) -> list[dict[str, Any]]:
    """Every record of the file, in order; [] when there is no file yet."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return _parse_all(text.splitlines())


def tail(path: Path, size: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The records on the last `size` bytes of the file (the first, cut line is skipped); []
    when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            data = f.read()
    except OSError:
        return []
    return _parse_all(data.decode("utf-8", "replace").splitlines())


def first(path: Path, key: str) -> float | None:
    """The first finite number logged under `key` (e.g. the first training loss), or None."""
    for record in read(path):
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            return float(value)
    return None


def truncate(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step` and drop the rest (a resume writes them again) and any
    line a kill cut short. Kept lines stay byte for byte; the file is replaced atomically, so a
    second kill cannot lose the log. A record without a step is kept."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    keep = []
    for line in text.splitlines():
        record = parse(line)
        if record is not None and _step(record) <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _step(record: Mapping[str, Any]) -> int:
    try:
        return int(record.get("step") or 0)
    except (TypeError, ValueError):
        return 0


class MetricsTail:
    """Reads a growing metrics file incrementally: each `read` returns only the complete records
    added since the last one. A file that shrank or was replaced (a resumed run rewrites it
    without the lines after its checkpoint) is read again from the start; `read` says so."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._inode: int | None = None
        self._rest = b""

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """(new records, whether the file was started over)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return [], False
        restarted = self._inode is not None and (
            st.st_ino != self._inode or st.st_size < self._offset
        )
        if restarted:
            self._offset, self._rest = 0, b""
        self._inode = st.st_ino
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()  # an unfinished last line waits for the next read
        return [r for r in map(parse, lines) if r is not None], restarted
