"""Keep a training run alive: restart it after a crash or a stall, and say why it died.

`albor train watch CONFIG` runs `albor train apply CONFIG` in a child process group and watches
it. A crash (a non-zero exit, or death by a signal) is written up as a JSON report in
`<run dir>/crash-reports/` and the run is started again after an exponential backoff; the child
resumes from its newest checkpoint by itself. A run whose heartbeat (the step in
`training_state.json`, or the size of `metrics.jsonl`) stops moving for `stall_timeout` seconds
is stopped (SIGTERM to the group, SIGKILL after a grace period) and counts as a crash. The
supervisor stops when the child exits 0, forwards SIGINT / SIGTERM to the child (which saves a
checkpoint and exits 0), and gives up after `max_restarts` restarts.

The child command is injectable, so the tests drive `Supervisor` with small scripts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from albor.artifact import partial_dir
from albor.track import metrics
from albor.track.metrics import METRICS_FILE
from albor.track.runs import STATE_FILE, read_state

log = logging.getLogger(__name__)

REPORTS_DIR = "crash-reports"
# Signals that mean the process itself faulted (a driver or native-code crash), not that
# something outside stopped it.
FAULT_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL}
)
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "MemoryError")


@dataclass(frozen=True)
class WatchSettings:
    """How patient the supervisor is; every time is in seconds."""

    max_restarts: int = 10
    stall_timeout: float = 600.0
    backoff_base: float = 30.0
    backoff_cap: float = 600.0
    stable_after: float = 3600.0
    kill_grace: float = 30.0
    poll_interval: float = 1.0
    stderr_lines: int = 50

    def __post_init__(self) -> None:
        for name in ("stall_timeout", "backoff_cap", "poll_interval", "kill_grace"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, not {getattr(self, name)}")
        if self.max_restarts < 0 or self.backoff_base < 0 or self.stable_after < 0:
            raise ValueError("max_restarts, backoff_base and stable_after must be >= 0")
        if self.stderr_lines < 1:
            raise ValueError(f"stderr_lines must be >= 1, not {self.stderr_lines}")

    def backoff(self, consecutive: int) -> float:
        """The wait before restart number `consecutive` (0-based) since the last stable run."""
        return float(min(self.backoff_cap, self.backoff_base * 2.0 ** min(consecutive, 62)))


@dataclass(frozen=True)
class Classification:
    """What an exit means: a short kind for machines and a sentence for people."""

    kind: str
    explanation: str
    exit_code: int | None = None
    signal: str | None = None


def signal_name(signum: int) -> str:
    """`SIGKILL` for 9, or `signal 42` for a number Python has no name for."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def classify(
    returncode: int, stderr_tail: Sequence[str] = (), *, stalled: bool = False
) -> Classification:
    """Classify a child's exit; `returncode` is as `subprocess` reports it (-N for signal N).

    A shell reports death by signal N as exit 128 + N, so those codes are read as signals too.
    """
    code: int | None = returncode
    signum: int | None = None
    if returncode < 0:
        code, signum = None, -returncode
    elif returncode > 128 and returncode - 128 in {s.value for s in signal.Signals}:
        signum = returncode - 128
    name = signal_name(signum) if signum is not None else None
    if stalled:
        return Classification(
            "stalled",
            "the heartbeat stopped moving (a hang: a deadlock, a GPU hang, a stuck "
            "filesystem); the run was stopped",
            code,
            name,
        )
    if signum == signal.SIGKILL:
        return Classification(
            "oom_killed",
            "killed by SIGKILL: most likely the kernel's OOM killer (check "
            "`dmesg`), or someone ran kill -9",
            code,
            name,
        )
    if signum is not None and signum in FAULT_SIGNALS:
        return Classification(
            "crash", f"crashed with {name} (native code or driver fault)", code, name
        )
    if signum is not None:
        return Classification("signal", f"terminated by {name}", code, name)
    if any(marker in line for line in stderr_tail for marker in OOM_MARKERS):
        return Classification(
            "oom", f"exited with code {returncode} after running out of memory", code, None
        )
    return Classification("error", f"exited with code {returncode}", code, None)


def last_step_and_loss(run_dir: Path) -> tuple[int | None, float | None]:
    """The newest step and training loss the run recorded: `training_state.json`, else the last
    `metrics.jsonl` line that has a loss."""
    state = read_state(run_dir)
    step = state.get("step") if isinstance(state.get("step"), int) else None
    last = state.get("last")
    last = last if isinstance(last, dict) else {}
    loss = last.get("loss") if isinstance(last.get("loss"), (int, float)) else None
    if loss is None:
        for record in reversed(metrics.tail(run_dir / METRICS_FILE)):
            if isinstance(record.get("loss"), (int, float)):
                loss = float(record["loss"])
                if step is None and isinstance(record.get("step"), int):
                    step = record["step"]
                break
    return step, loss


def heartbeat(run_dir: Path) -> tuple[Any, int]:
    """What moves while a run makes progress: its step and the size of its metrics file."""
    try:
        size = (run_dir / METRICS_FILE).stat().st_size
    except OSError:
        size = -1
    return read_state(run_dir).get("step"), size


def stage_run_dir(output: Path) -> Callable[[], Path]:
    """The run dir of a stage writing `output`: its `.NAME.partial` dir while it runs, else the
    directory the output is in (a crash before the partial dir exists, or after the swap)."""

    def resolve() -> Path:
        partial = partial_dir(output)
        return partial if partial.is_dir() else output.parent

    return resolve


@dataclass
class WatchResult:
    """How watching ended: the exit code to leave with, and a line that says why."""

    exit_code: int
    message: str
    restarts: int = 0
    reports: list[Path] = field(default_factory=list)


class Supervisor:
    """Run `command` until it exits 0, restarting it after crashes and stalls.

    `run_dir` is called whenever the run dir is needed (it moves when a stage swaps its partial
    dir in). `notify` receives one line per event (a crash, a restart, a stop). Call `run` from
    the main thread to have SIGINT / SIGTERM forwarded; `request_stop` does the same from code.
    """

    def __init__(
        self,
        command: Sequence[str],
        run_dir: Callable[[], Path],
        settings: WatchSettings | None = None,
        *,
        env: dict[str, str] | None = None,
        stderr: IO[bytes] | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.command = list(command)
        self.run_dir = run_dir
        self.settings = settings or WatchSettings()
        self.env = env
        self._stderr = stderr
        self.notify = notify or log.warning
        self._proc: subprocess.Popen[bytes] | None = None
        self._stop_signal: int | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()

    # ----- stopping ----------------------------------------------------------------------------

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Stop watching: forward `signum` to the child's group and restart nothing after it."""
        with self._lock:
            self._stop_signal = signum
            proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signum)
        self._wake.set()

    def _handle(self, signum: int, frame: Any) -> None:
        self.request_stop(signum)

    # ----- the watch ---------------------------------------------------------------------------

    def run(self) -> WatchResult:
        """Watch until the child exits 0, is stopped, or the restarts run out."""
        old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                old[sig] = signal.signal(sig, self._handle)
        try:
            return self._watch()
        finally:
            for signum, handler in old.items():
                signal.signal(signum, handler)

    def _watch(self) -> WatchResult:
        s = self.settings
        reports: list[Path] = []
        crashes = consecutive = 0
        while True:
            started = time.monotonic()
            returncode, stalled, tail, pid = self._run_once()
            runtime = time.monotonic() - started
            stop = self._stop_signal
            if stop is not None and not stalled:
                clean = returncode == 0 or returncode in (-stop, 128 + stop)
                if clean:
                    return WatchResult(0, f"stopped by {signal_name(stop)}", crashes, reports)
                return WatchResult(
                    1,
                    f"stopped by {signal_name(stop)}; the run then exited with "
                    f"{_describe(returncode)}",
                    crashes,
                    reports,
                )
            if returncode == 0 and not stalled:
                done = "done" + (f" after {crashes} restart(s)" if crashes else "")
                return WatchResult(0, done, crashes, reports)
            crashes += 1
            if runtime >= s.stable_after:
                consecutive = 0
            giving_up = crashes > s.max_restarts or stop is not None
            delay = 0.0 if giving_up else s.backoff(consecutive)
            consecutive += 1
            what = classify(returncode, tail, stalled=stalled)
            path = self._report(what, crashes, pid, runtime, tail, None if giving_up else delay)
            reports.append(path)
            if stop is not None:
                return WatchResult(
                    0,
                    f"stopped by {signal_name(stop)} while stopping a stalled run",
                    crashes,
                    reports,
                )
            if giving_up:
                return WatchResult(
                    1,
                    f"gave up after {s.max_restarts} restart(s); last: {what.explanation}; "
                    f"crash reports in {path.parent}",
                    crashes - 1,
                    reports,
                )
            self.notify(
                f"run {what.kind}: {what.explanation}; restart {crashes}/{s.max_restarts} in "
                f"{delay:g}s (report: {path})"
            )
            if self._wake.wait(delay) or self._stop_signal is not None:
                stop = self._stop_signal or int(signal.SIGTERM)
                return WatchResult(
                    0, f"stopped by {signal_name(stop)} before restarting", crashes, reports
                )

    def _run_once(self) -> tuple[int, bool, list[str], int]:
        """Run the child to its end; (returncode, whether it was stopped as stalled, the tail
        of its stderr, its pid)."""
        s = self.settings
        tail: deque[str] = deque(maxlen=s.stderr_lines)
        with self._lock:
            proc = subprocess.Popen(
                self.command, stderr=subprocess.PIPE, env=self.env, start_new_session=True
            )
            self._proc = proc
            stop = self._stop_signal
        if stop is not None:  # a signal arrived while it was starting
            _signal_group(proc, stop)
        tee = threading.Thread(target=self._tee, args=(proc, tail), daemon=True)
        tee.start()
        beat, beat_at = self._beat(), time.monotonic()
        stalled = False
        try:
            while proc.poll() is None:
                self._wake.wait(s.poll_interval)
                self._wake.clear()
                if self._stop_signal is not None:
                    continue  # stopping: let the child save its checkpoint, however long
                now, current = time.monotonic(), self._beat()
                if current != beat:
                    beat, beat_at = current, now
                elif now - beat_at > s.stall_timeout:
                    stalled = True
                    self.notify(f"no progress for {now - beat_at:.0f}s: stopping the run")
                    self._terminate(proc)
                    break
            returncode = proc.wait()
            if returncode != 0:
                _signal_group(proc, signal.SIGKILL)  # leftovers (loader workers) hold memory
        finally:
            with self._lock:
                self._proc = None
        tee.join(timeout=5)
        return returncode, stalled, list(tail), proc.pid

    def _beat(self) -> tuple[Any, int]:
        return heartbeat(self.run_dir())

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM the child's group; SIGKILL it if it is still there after the grace period."""
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=self.settings.kill_grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

    def _tee(self, proc: subprocess.Popen[bytes], tail: deque[str]) -> None:
        """Copy the child's stderr through, line by line, keeping the last lines."""
        assert proc.stderr is not None
        sink = self._stderr or getattr(sys.stderr, "buffer", None)
        for line in iter(proc.stderr.readline, b""):
            tail.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if sink is not None:
                try:
                    sink.write(line)
                    sink.flush()
                except (OSError, ValueError):
                    sink = None  # the terminal went away; keep watching regardless
        proc.stderr.close()

    def _report(
        self,
        what: Classification,
        crash: int,
        pid: int,
        runtime: float,
        tail: list[str],
        restart_in: float | None,
    ) -> Path:
        """Write one crash report into `<run dir>/crash-reports/`; its path."""
        run_dir = self.run_dir()
        step, loss = last_step_and_loss(run_dir)
        now = datetime.now(UTC)
        report = {
            "time": now.isoformat(timespec="seconds"),
            "crash": crash,
            "restarts_so_far": crash - 1,
            "max_restarts": self.settings.max_restarts,
            "classification": what.kind,
            "explanation": what.explanation,
            "exit_code": what.exit_code,
            "signal": what.signal,
            "pid": pid,
            "runtime_s": round(runtime, 3),
            "last_step": step,
            "last_loss": loss,
            "run_dir": str(run_dir),
            "state_file": str(run_dir / STATE_FILE),
            "command": self.command,
            "action": "give up" if restart_in is None else f"restart in {restart_in:g}s",
            "stderr_tail": tail,
        }
        reports = run_dir / REPORTS_DIR
        reports.mkdir(parents=True, exist_ok=True)
        path = reports / f"crash-{now:%Y%m%dT%H%M%S}-{crash:03d}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    """Send `signum` to the child's process group (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _describe(returncode: int) -> str:
    return f"{signal_name(-returncode)}" if returncode < 0 else f"code {returncode}"
