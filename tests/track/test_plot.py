"""Text plots (sparklines, braille charts) and loss.png, with and without matplotlib."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import matplotlib.figure
import pytest

from albor.track import plot
from albor.track.plot import (
    BLOCKS,
    braille_chart,
    bucket,
    read_curves,
    sparkline,
    write_loss_plot,
)
from track.runmaker import make_run_dir, write_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_sparkline_scales_and_squeezes() -> None:
    assert sparkline([]) == ""
    line = sparkline(list(range(100)), width=20)
    assert len(line) == 20 and line[0] == BLOCKS[0] and line[-1] == BLOCKS[-1]
    assert list(line) == sorted(line)  # a rising series never dips
    assert sparkline([1.0, float("nan"), None, 2.0], width=10) == BLOCKS[0] + BLOCKS[-1]
    assert sparkline([5.0, 5.0]) == BLOCKS[4] * 2
    # Fixed bounds put both runs of a diff on one scale.
    assert sparkline([2.0], lo=0.0, hi=4.0) == BLOCKS[round(0.5 * 7)]
    assert bucket([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 3.5]


def test_braille_chart_shape() -> None:
    loss = [(float(s), 10.0 / (1 + s)) for s in range(100)]
    val = [(0.0, 9.0), (50.0, 1.0), (99.0, 0.5)]
    lines = braille_chart([loss, val], width=60, height=8)
    assert len(lines) == 9  # 8 rows and the step axis
    assert all(len(line.plain) <= 60 for line in lines)
    assert lines[0].plain.lstrip().startswith("10┤") and "step 0" in lines[-1].plain
    assert sum(ch != " " for line in lines[:-1] for ch in line.plain.split("┤", 1)[1]) > 30
    assert braille_chart([[]], 60, 8)[0].plain == "(no data yet)"


def test_curves_skip_skipped_steps_and_text(tmp_path: Path) -> None:
    write_metrics(
        tmp_path,
        [
            {"step": 1, "loss": 3.0, "lr": 1e-4},
            {"step": 2, "loss": float("nan"), "lr": 2e-4},  # skipped: written as null
            {"step": 2, "event": "resume", "checkpoint": "step-0000002"},
            {"step": 3, "loss": 2.5, "lr": 3e-4},
        ],
    )
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": NaN}\n{"step": 5, "lo')  # an old log's NaN, a torn line
    curves = read_curves(tmp_path)
    assert curves == {
        "loss": [(1.0, 3.0), (3.0, 2.5)],
        "lr": [(1.0, 1e-4), (2.0, 2e-4), (3.0, 3e-4)],
    }


def test_loss_png_is_written(tmp_path: Path) -> None:
    run_dir = make_run_dir(tmp_path / "pretrain")
    path = write_loss_plot(run_dir)
    assert path == run_dir / "loss.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not list(run_dir.glob(".loss.png.*"))  # written atomically, nothing left over
    assert write_loss_plot(tmp_path / "empty") is None  # no metrics yet: nothing to draw


def test_without_matplotlib_the_plot_is_skipped_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    monkeypatch.setattr(plot, "_warned_missing", False)
    run_dir = make_run_dir(tmp_path / "pretrain")
    with caplog.at_level(logging.INFO, logger="albor.track.plot"):
        assert write_loss_plot(run_dir) is None
        assert write_loss_plot(run_dir) is None
    assert not (run_dir / "loss.png").exists()
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "pip install matplotlib" in notes[0]  # said once, with the fix


def test_a_plotting_failure_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    run_dir = make_run_dir(tmp_path / "pretrain")
    with caplog.at_level(logging.WARNING, logger="albor.track.plot"):
        assert write_loss_plot(run_dir) is None
    assert "No space left" in caplog.text and not (run_dir / "loss.png").exists()
