"""The training supervisor: restarts after crashes and stalls, crash reports, giving up, stopping.

Children are small Python scripts written here; one slow test watches a real tiny pretrain run
and SIGKILLs it mid-run."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from albor.track import metrics
from albor.train.supervisor import (
    Supervisor,
    WatchSettings,
    classify,
    last_step_and_loss,
    stage_run_dir,
)
from helpers import pretrain_config

# The child's behaviour on its Nth start (N counted in a file): "exit:3", "kill:SIGKILL",
# "stall" (heartbeat once, then sleep ignoring SIGTERM), "wait" (sleep until SIGTERM, exit 0),
# "ok".
CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
run_dir, plan = Path(sys.argv[1]), sys.argv[2:]
counter = run_dir / "starts"
n = int(counter.read_text()) if counter.exists() else 0
counter.write_text(str(n + 1))
action = plan[min(n, len(plan) - 1)]
state = {"step": 10 * (n + 1), "last": {"loss": 5.0 - n}, "pid": os.getpid()}
(run_dir / "training_state.json").write_text(json.dumps(state))
print(f"start {n}: {action}", file=sys.stderr, flush=True)
if action.startswith("exit:"):
    sys.exit(int(action[5:]))
if action.startswith("kill:"):
    os.kill(os.getpid(), getattr(signal, action[5:]))
if action == "stall":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
if action == "wait":
    (run_dir / "ready").write_text("1")
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    time.sleep(60)
    sys.exit(5)
"""


def supervisor(
    tmp_path: Path, *plan: str, sink: io.BytesIO | None = None, **settings: Any
) -> Supervisor:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    base: dict[str, Any] = dict(
        backoff_base=0.05,
        backoff_cap=0.15,
        stall_timeout=30.0,
        kill_grace=0.2,
        poll_interval=0.02,
        max_restarts=5,
    )
    base.update(settings)
    return Supervisor(
        [sys.executable, str(script), str(tmp_path), *plan],
        lambda: tmp_path,
        WatchSettings(**base),
        stderr=sink if sink is not None else io.BytesIO(),
        notify=lambda line: None,
    )


def reports(tmp_path: Path) -> list[dict[str, Any]]:
    found = sorted((tmp_path / "crash-reports").glob("*.json"))
    return sorted((json.loads(p.read_text()) for p in found), key=lambda r: r["crash"])


def test_crashes_are_reported_and_restarted_with_backoff_until_done(tmp_path: Path) -> None:
    sink = io.BytesIO()
    sup = supervisor(tmp_path, "exit:3", "kill:SIGKILL", "kill:SIGSEGV", "ok", sink=sink)
    started = time.monotonic()
    result = sup.run()
    took = time.monotonic() - started
    assert result.exit_code == 0 and result.restarts == 3, result
    assert (tmp_path / "starts").read_text() == "4"
    assert took >= 0.05 + 0.1 + 0.15  # base, doubled, capped
    got = reports(tmp_path)
    assert [r["classification"] for r in got] == ["error", "oom_killed", "crash"]
    assert [(r["exit_code"], r["signal"]) for r in got] == [
        (3, None),
        (None, "SIGKILL"),
        (None, "SIGSEGV"),
    ]
    assert [r["action"] for r in got] == ["restart in 0.05s", "restart in 0.1s", "restart in 0.15s"]
    assert [(r["last_step"], r["last_loss"]) for r in got] == [(10, 5.0), (20, 4.0), (30, 3.0)]
    assert got[1]["stderr_tail"][-1] == "start 1: kill:SIGKILL"
    assert all(r["time"] and r["restarts_so_far"] == r["crash"] - 1 for r in got)
    assert b"start 0: exit:3" in sink.getvalue() and b"start 3: ok" in sink.getvalue()


def test_backoff_resets_after_a_stable_run() -> None:
    s = WatchSettings(backoff_base=30, backoff_cap=600)
    assert [s.backoff(i) for i in range(7)] == [30, 60, 120, 240, 480, 600, 600]
    assert s.backoff(10_000) == 600


def test_a_stable_run_resets_the_backoff(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "exit:3", "exit:3", "ok", stable_after=0.0)
    assert sup.run().exit_code == 0
    assert [r["action"] for r in reports(tmp_path)] == ["restart in 0.05s"] * 2


def test_a_stalled_run_is_killed_and_restarted(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "stall", "ok", stall_timeout=0.5)
    result = sup.run()
    assert result.exit_code == 0 and result.restarts == 1
    (report,) = reports(tmp_path)
    # It ignored the SIGTERM, so the grace period ran out and SIGKILL ended it.
    assert report["classification"] == "stalled" and report["signal"] == "SIGKILL"
    assert report["last_step"] == 10


def test_gives_up_after_max_restarts(tmp_path: Path) -> None:
    result = supervisor(tmp_path, "exit:3", max_restarts=2).run()
    assert result.exit_code == 1 and result.restarts == 2
    assert "gave up after 2 restart(s)" in result.message
    assert str(tmp_path / "crash-reports") in result.message
    got = reports(tmp_path)
    assert len(got) == 3 and got[-1]["action"] == "give up"
    assert (tmp_path / "starts").read_text() == "3"


def test_a_stop_is_forwarded_and_nothing_restarts(tmp_path: Path) -> None:
    sup = supervisor(tmp_path, "wait", "exit:3")

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 20
        while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        sup.request_stop(signal.SIGTERM)

    stopper = threading.Thread(target=stop_when_ready)
    stopper.start()
    result = sup.run()
    stopper.join()
    assert (result.exit_code, result.message) == (0, "stopped by SIGTERM")
    assert (tmp_path / "starts").read_text() == "1" and reports(tmp_path) == []


@pytest.mark.parametrize(
    ("returncode", "tail", "kind"),
    [
        (-signal.SIGKILL, [], "oom_killed"),
        (137, [], "oom_killed"),
        (-signal.SIGBUS, [], "crash"),
        (-signal.SIGHUP, [], "signal"),
        (1, ["torch.OutOfMemoryError: CUDA out of memory."], "oom"),
        (2, ["ValueError"], "error"),
    ],
)
def test_classify(returncode: int, tail: list[str], kind: str) -> None:
    assert classify(returncode, tail).kind == kind
    assert classify(returncode, tail, stalled=True).kind == "stalled"


def test_last_loss_from_the_metrics_when_the_state_has_none(tmp_path: Path) -> None:
    # A skipped step's loss is null, and a kill may have cut the last line: neither is the loss.
    for record in ({"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.5}, {"step": 3, "loss": None}):
        metrics.append(tmp_path / metrics.METRICS_FILE, record)
    with open(tmp_path / metrics.METRICS_FILE, "a") as f:
        f.write('{"step": 4, "lo')
    assert last_step_and_loss(tmp_path) == (2, 3.5)
    (tmp_path / "training_state.json").write_text(json.dumps({"step": 3, "last": {}}))
    assert last_step_and_loss(tmp_path) == (3, 3.5)  # the state's step is newer


def test_stage_run_dir_follows_the_partial_dir(tmp_path: Path) -> None:
    resolve = stage_run_dir(tmp_path / "out")
    assert resolve() == tmp_path  # before the stage made its work dir
    (tmp_path / ".out.partial").mkdir()
    assert resolve() == tmp_path / ".out.partial"


@pytest.mark.slow
def test_watch_brings_a_killed_pretrain_run_to_completion(token_data: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "pretrain.yaml"
    out = tmp_path / "out"
    config = pretrain_config(
        token_data,
        out,
        max_steps=60,
        warmup_steps=5,
        seq_len=32,
        log_every=1,
        eval_every=20,
        eval_tokens=512,
        keep_checkpoints=2,
        threads=1,
    )
    cfg.write_text(json.dumps(config.model_dump(mode="json", exclude_none=True)))  # JSON is YAML
    command = [sys.executable, "-m", "albor", "train", "watch", str(cfg)]
    watch = subprocess.Popen(
        [*command, "--backoff-base", "0.1", "--stall-timeout", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state_file = tmp_path / ".out.partial" / "training_state.json"
    deadline = time.monotonic() + 120
    while True:
        assert watch.poll() is None, watch.communicate()
        assert time.monotonic() < deadline, "the run never reached step 15"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("step", 0) >= 15:
            break
        time.sleep(0.05)
    os.kill(state["pid"], signal.SIGKILL)
    stdout, stderr = watch.communicate(timeout=300)
    assert watch.returncode == 0, stderr
    assert "done after 1 restart(s)" in stdout, stdout
    assert "run oom_killed" in stderr
    (report_path,) = (out / "crash-reports").glob("*.json")  # swapped in with the partial dir
    report = json.loads(report_path.read_text())
    assert report["classification"] == "oom_killed" and report["signal"] == "SIGKILL"
    assert report["last_step"] >= 15 and report["last_loss"] is not None
    assert report["pid"] == state["pid"]  # the watched child is the training process itself
    assert (out / "model.safetensors").exists()
    lines = metrics.read(out / metrics.METRICS_FILE)
    assert [r for r in lines if r.get("event") == "resume"]
    assert max(r["step"] for r in lines if "loss" in r) == 60
