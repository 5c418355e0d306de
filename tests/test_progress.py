"""Progress where nobody watches: plain lines on a non-terminal stderr, at a steady cadence."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from albor import progress
from albor.errors import ConfigError
from helpers import pretrain_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def loud() -> Iterator[None]:
    """Progress on, whatever an earlier test in the process left (the CLI's --json quiets it)."""
    progress.quiet(False)
    yield
    progress.quiet(False)


def test_lines_come_at_the_interval_with_rate_eta_and_fields() -> None:
    clock, out = Clock(), []
    lines = progress.Lines("pretrain", 100, every=30, clock=clock, write=out.append)
    for step in range(1, 101):
        clock.now += 1.0  # one step a second
        lines.update(completed=step, fields={"step": step, "loss": 5.0 - step / 100})
    assert [int(re.match(r"pretrain: (\d+)/100", x)[1]) for x in out] == [30, 60, 90]  # type: ignore[index]
    assert out[0] == ("pretrain: 30/100 (30.0%), 1 it/s, elapsed 30s, ETA 1m10s, step 30, loss 4.7")
    lines.close()
    assert out[-1] == "pretrain: done 100/100 (100.0%) in 1m40s (1 it/s), step 100, loss 4"
    assert not any("\x1b" in x for x in out)  # no terminal escapes in a log


def test_quick_work_writes_nothing_and_a_failure_says_where_it_stopped() -> None:
    clock, out = Clock(), []
    quick = progress.Lines("tokenize", 10, every=30, clock=clock, write=out.append)
    clock.now += 5
    quick.update(completed=10)
    quick.close()
    assert out == []
    slow = progress.Lines("eval", 10, unit="files", every=30, clock=clock, write=out.append)
    clock.now += 40
    slow.update(advance=4)
    slow.close(failed=True)
    assert out == [
        "eval: 4/10 files (40.0%), 0.1 files/s, elapsed 40s, ETA 1m00s",
        "eval: stopped at 4/10 files (40.0%) in 40s (0.1 files/s)",
    ]


def test_a_resumed_run_counts_only_its_own_work_in_rate_and_eta() -> None:
    clock, out = Clock(), []
    lines = progress.Lines("pretrain", 1000, completed=900, every=10, clock=clock, write=out.append)
    clock.now += 10
    lines.update(completed=920)
    assert out == ["pretrain: 920/1000 (92.0%), 2 it/s, elapsed 10s, ETA 40s"]


def test_unknown_total_has_no_eta() -> None:
    clock, out = Clock(), []
    lines = progress.Lines("ingest", None, every=1, clock=clock, write=out.append)
    clock.now += 2
    lines.update(advance=7)
    lines.close()
    assert out == ["ingest: 7, 3.5 it/s, elapsed 2s", "ingest: done 7 in 2s (3.5 it/s)"]


def test_bar_on_a_pipe_writes_lines_to_stderr_and_quiet_silences_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ALBOR_PROGRESS_INTERVAL", "0")
    assert not sys.stderr.isatty()
    assert list(progress.track(["a", "b", "c"], "items")) == ["a", "b", "c"]
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert [x.split(", ")[0] for x in lines[:3]] == [
        "items: 1/3 (33.3%)",
        "items: 2/3 (66.7%)",
        "items: 3/3 (100.0%)",
    ]
    assert len(lines) == 4 and lines[-1].startswith("items: done 3/3 (100.0%) in 0s (")
    progress.quiet()
    assert list(progress.track(["a", "b"], "items")) == ["a", "b"]
    assert capsys.readouterr().err == ""


def test_the_interval_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALBOR_PROGRESS_INTERVAL", raising=False)
    assert progress.interval() == progress.INTERVAL_S == 30.0
    monkeypatch.setenv("ALBOR_PROGRESS_INTERVAL", "0.5")
    assert progress.interval() == 0.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("ALBOR_PROGRESS_INTERVAL", bad)
        with pytest.raises(ConfigError, match="ALBOR_PROGRESS_INTERVAL"):
            progress.interval()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_keeps_its_rich_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv("ALBOR_PROGRESS_INTERVAL", "0")
    with progress.bar("pretrain", 3) as b:
        for step in (1, 2, 3):
            b.update(completed=step, fields={"loss": "4.2"})
    text = term.getvalue()
    assert "\x1b[" in text  # drawn with terminal control codes, not as log lines
    assert "loss 4.2" in text and "it/s" not in text


def test_pretrain_on_a_pipe_logs_step_loss_tokens_per_s_and_eta(
    token_data: Path, tmp_path: Path
) -> None:
    """A real `albor pretrain apply` with stderr a pipe, as under CI or nohup."""
    cfg = tmp_path / "pretrain.yaml"
    config = pretrain_config(
        token_data,
        tmp_path / "out",
        max_steps=300,
        seq_len=32,
        log_every=50,
        eval_every=100,
        eval_tokens=256,
        checkpoint_every=1000,
        threads=1,
    )
    cfg.write_text(json.dumps(config.model_dump(mode="json", exclude_none=True)))
    env = {**os.environ, "ALBOR_PROGRESS_INTERVAL": "0.2"}
    done = subprocess.run(
        [sys.executable, "-m", "albor", "pretrain", "apply", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stderr
    line = re.compile(
        r"^pretrain: (\d+)/300 \([\d.]+%\), [\d.e+]+ it/s, elapsed \S+, ETA \S+, "
        r"step (\d+), loss (\d+\.\d{4}), tok/s [\d,]+$"
    )
    periodic = [m for m in map(line.match, done.stderr.splitlines()) if m]
    assert len(periodic) >= 2, done.stderr
    assert all(m[1] == m[2] for m in periodic)  # the count is the step
    steps = [int(m[1]) for m in periodic]
    assert steps == sorted(steps) and steps[-1] <= 300  # a periodic line may fall on the last step
    final = [x for x in done.stderr.splitlines() if x.startswith("pretrain: done 300/300")]
    assert len(final) == 1 and "loss" in final[0], done.stderr
