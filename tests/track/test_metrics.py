"""metrics.jsonl: round trip, NaN as null, torn lines, truncation on resume, the tails."""

from __future__ import annotations

import json
import math
from pathlib import Path

from albor.track import metrics
from albor.track.metrics import MetricsTail


def test_round_trip_in_order(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    records = [
        {"step": 1, "loss": 3.25, "lr": 1e-4, "grad_norm": 0.5},
        {"step": 1, "event": "resume", "checkpoint": "step-0000001", "warnings": []},
        {"step": 2, "val_loss": 3.0, "val_bpb": 1.5},
    ]
    with open(path, "a", encoding="utf-8") as f:
        metrics.append(f, records[0])
        # Flushed at once: a watcher (the monitor) sees the line while the file is still open.
        assert metrics.read(path) == records[:1]
        metrics.append(f, records[1])
    metrics.append(path, records[2])
    assert metrics.read(path) == records
    assert len(path.read_text().splitlines()) == 3


def test_unrounded_floats_survive_exactly(tmp_path: Path) -> None:
    # A resumed run is compared with an uninterrupted one on the logged loss, bit for bit.
    path = tmp_path / metrics.METRICS_FILE
    loss = 1 / 3 + 1e-17
    metrics.append(path, {"step": 1, "loss": loss})
    assert metrics.read(path)[0]["loss"] == loss


def test_non_finite_values_are_written_as_null(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    metrics.append(
        path,
        {"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "extra": [float("-inf")]},
    )
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=_not_json)  # strict JSON: any reader, not only Python's
    assert metrics.read(path) == [{"step": 3, "loss": None, "grad_norm": None, "extra": [None]}]


def _not_json(constant: str) -> None:
    raise AssertionError(f"{constant} in metrics.jsonl is not JSON")


def test_nan_of_old_logs_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": Infinity}\n')
    assert metrics.read(path) == [{"step": 1, "loss": None}, {"step": 2, "loss": None}]


def test_torn_last_line_and_non_objects_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    path.write_text('{"step": 1, "loss": 3.0}\n[1, 2]\n\n"text"\n{"step": 2, "loss": 2.0}\n{"st')
    assert metrics.read(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
    assert metrics.read(tmp_path / "missing.jsonl") == []


def test_truncate_keeps_lines_up_to_the_step_and_drops_a_torn_one(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    lines = [json.dumps({"step": s, "loss": 1.0 + s / 7}) for s in range(1, 6)]
    lines.insert(3, '{"step": 3, "val_loss": 2.0}')
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')
    metrics.truncate(path, 3)
    # The kept lines stay byte for byte: a resumed log reads as if it had never stopped.
    assert path.read_text() == "\n".join(lines[:4]) + "\n"
    assert [r["step"] for r in metrics.read(path)] == [1, 2, 3, 3]
    metrics.truncate(path, 0)
    assert path.read_text() == ""
    metrics.truncate(tmp_path / "missing.jsonl", 3)  # nothing to cut: no error, no file
    assert not (tmp_path / "missing.jsonl").exists()


def test_first_is_the_first_finite_value(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    for record in (
        {"step": 0, "event": "resume"},
        {"step": 1, "loss": float("nan")},
        {"step": 2, "loss": 4},
        {"step": 3, "loss": 3.5},
    ):
        metrics.append(path, record)
    assert metrics.first(path, "loss") == 4.0
    assert isinstance(metrics.first(path, "loss"), float)
    assert metrics.first(path, "val_loss") is None
    assert metrics.first(tmp_path / "missing.jsonl", "loss") is None


def test_tail_reads_the_last_records_of_a_long_file(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    with open(path, "a", encoding="utf-8") as f:
        for step in range(1, 2001):
            metrics.append(f, {"step": step, "loss": 10 / step})
    found = metrics.tail(path, size=4096)
    # The cut first line is skipped; what is left is the end of the file, complete and in order.
    steps = [r["step"] for r in found]
    assert steps == list(range(steps[0], 2001)) and 2000 - steps[0] < 200
    assert math.isclose(found[-1]["loss"], 10 / 2000)
    assert metrics.tail(tmp_path / "missing.jsonl") == []


def test_tail_reader_returns_only_new_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / metrics.METRICS_FILE
    tail = MetricsTail(path)
    assert tail.read() == ([], False)  # not there yet
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    assert tail.read() == ([{"step": 1, "loss": 3.0}], False)
    with open(path, "a") as f:
        f.write('ss": NaN}\n')
    assert tail.read() == ([{"step": 2, "loss": None}], False)
    assert tail.read() == ([], False)
    path.write_text('{"step": 1, "loss": 3.0}\n')  # a resume rewrote it shorter
    assert tail.read() == ([{"step": 1, "loss": 3.0}], True)
