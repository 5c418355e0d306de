"""The runner: `Sandbox` starts one interpreter per program under the machine's isolation
(`isolation.py`), hands the harness (`harness.py`) its request, enforces the wall clock, cleans up
every process the program left, and turns what came back into a `SampleResult`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from albor import progress
from albor.config import StageConfig
from albor.evals.sandbox.harness import HARNESS
from albor.evals.sandbox.isolation import SLOTS, Mode, command, isolation, slot_uid

Status = Literal["passed", "failed", "timeout", "error"]

_OUTPUT_TAIL = 2000
_REASON_CHARS = 300
# Seconds beyond the timeout for interpreter and namespace start-up before the wall clock kills.
_START_GRACE = 0.25


class SandboxConfig(StageConfig):
    """Limits of one sandboxed sample."""

    timeout_s: float = Field(
        5.0, gt=0, le=3600, description="Wall-clock seconds per sample before it is killed."
    )
    cpu_s: int | None = Field(
        None, gt=0, description="CPU seconds per sample; default: the timeout rounded up, + 1."
    )
    memory_mb: int = Field(
        1024, ge=64, description="Address-space limit per process (RLIMIT_AS), MiB."
    )
    max_procs: int = Field(
        32, ge=2, description="Processes (and threads) a sample may have at once (RLIMIT_NPROC)."
    )
    file_size_mb: int = Field(
        16, ge=1, description="Largest file a sample may write, output included (RLIMIT_FSIZE)."
    )
    site_packages: bool = Field(
        True,
        description="Let samples import installed packages (numpy, ...); false runs `python -I "
        "-S`, the standard library only, which starts faster.",
    )
    isolation: Literal["auto", "bwrap", "namespaces", "uid", "userns", "plain"] = Field(
        "auto",
        description="auto: the strongest the machine allows (bwrap where bubblewrap works, else "
        "namespaces and a dedicated uid as root or a user namespace otherwise, plain limits where "
        "none works, each fallback logged as a warning naming what it leaves uncontained); or one "
        "of them, an error where it is not available.",
    )


@dataclass(frozen=True)
class SampleResult:
    """The verdict on one program: `passed` only when the harness returned the parent's nonce."""

    passed: bool
    status: Status
    reason: str
    wall_s: float
    network_isolated: bool
    output: str = ""  # the tail of the sample's stdout and stderr, for reading, never scoring

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["wall_s"] = round(self.wall_s, 4)
        return d


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _read_all(fd: int) -> bytes:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        if sum(map(len, chunks)) > 1 << 20:
            break
    return b"".join(chunks)


def _tail(f: Any) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - _OUTPUT_TAIL))
    return str(f.read().decode("utf-8", "replace"))


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _live_processes() -> Iterator[tuple[int, int]]:
    """(pid, real uid) of every process that is not a zombie (none known without /proc)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uids = fields.get("Uid", "").split()
        if uids and not fields.get("State", "").strip().startswith("Z"):
            yield int(entry), int(uids[0])


def uid_processes(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is `uid`."""
    return [pid for pid, u in _live_processes() if u == uid]


def sandbox_processes() -> list[int]:
    """Live processes running as any of this process's sandbox uids (none between runs)."""
    lo = slot_uid(0)
    return [pid for pid, u in _live_processes() if lo <= u < lo + SLOTS]


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (a dedicated sandbox uid), until none is
    left: the fallback for processes that left the process group where no PID namespace does it."""
    for _ in range(50):
        found = uid_processes(uid)
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _remove_tree(path: str) -> None:
    def retry(func: Callable[..., Any], p: str, _: Any) -> None:
        # A sample may have taken the permissions off what it wrote; give them back and retry.
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry)


# Worker slots of this process, shared by every Sandbox so that no two runs at the same time
# share a uid; last in, first out keeps reusing the same few. The last slot is the probe's.
_SLOT_POOL: queue.LifoQueue[int] = queue.LifoQueue()
for _slot in reversed(range(SLOTS - 1)):
    _SLOT_POOL.put(_slot)


class Sandbox:
    """Runs programs under `SandboxConfig` limits with `workers` at a time (default: the cores)."""

    def __init__(
        self,
        limits: SandboxConfig | None = None,
        workers: int | None = None,
        mode: Mode | None = None,
    ) -> None:
        self.limits = limits or SandboxConfig()
        self.workers = max(1, workers or os.cpu_count() or 1)
        configured = None if self.limits.isolation == "auto" else self.limits.isolation
        self.isolation = isolation(mode or configured)

    def _rlimits(self) -> dict[str, int]:
        lim = self.limits
        cpu = lim.cpu_s if lim.cpu_s is not None else math.ceil(lim.timeout_s) + 1
        return {
            "RLIMIT_CPU": cpu,
            "RLIMIT_AS": lim.memory_mb << 20,
            "RLIMIT_FSIZE": lim.file_size_mb << 20,
            "RLIMIT_CORE": 0,
        }

    def run(self, program: str) -> SampleResult:
        """Run one program to its verdict; never raises for anything the program does."""
        slot = _SLOT_POOL.get()
        try:
            return self._run(program, slot)
        finally:
            _SLOT_POOL.put(slot)

    def run_many(
        self, programs: Sequence[str], description: str = "executing samples"
    ) -> list[SampleResult]:
        """Run every program, `workers` at a time; results in input order, with a progress bar."""
        if not programs:
            return []
        with (
            progress.bar(description, len(programs)) as bar,
            ThreadPoolExecutor(max_workers=min(self.workers, len(programs))) as pool,
        ):

            def one(program: str) -> SampleResult:
                result = self.run(program)
                bar.advance()
                return result

            return list(pool.map(one, programs))

    def _run(self, program: str, slot: int) -> SampleResult:
        iso = self.isolation
        uid = slot_uid(slot)
        work = tempfile.mkdtemp(prefix="albor-sandbox-")
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = os.pipe()
        result_r, result_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        # In a user namespace (userns, bwrap when not root) the count is of the namespace's own.
        nproc = "absolute" if iso.dedicated_uid or iso.mode in ("userns", "bwrap") else "relative"
        request = {
            "program": program,
            "limits": self._rlimits(),
            "max_procs": self.limits.max_procs,
            "nproc": nproc if iso.process_limit else "off",
            "nonce_fd": nonce_r,
            "result_fd": result_w,
        }
        here = work
        env = {"HOME": here, "TMPDIR": here, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        cmd = [*command(iso, uid, work, self.limits.site_packages), "-c", HARNESS]
        timed_out = False
        proc: subprocess.Popen[bytes] | None = None
        t0 = time.perf_counter()
        try:
            if iso.dedicated_uid:
                os.chown(work, uid, uid)
            with tempfile.TemporaryFile() as output:
                try:
                    proc = subprocess.Popen(
                        cmd,
                        stdin=subprocess.PIPE,
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        pass_fds=(nonce_r, result_w),
                        cwd=work,
                        env=env,
                        start_new_session=True,
                    )
                except OSError as e:
                    return self._error(f"could not start the sandbox: {e}", t0)
                finally:
                    os.close(nonce_r)
                    os.close(result_w)
                try:
                    timed_out = self._wait(proc, json.dumps(request).encode())
                finally:
                    self._kill(proc, uid)
                wall = time.perf_counter() - t0
                reply = _read_all(result_r)
                return self._verdict(proc.returncode, reply, nonce, timed_out, wall, _tail(output))
        finally:
            os.close(result_r)
            _remove_tree(work)

    def _wait(self, proc: subprocess.Popen[bytes], request: bytes) -> bool:
        """Hand the harness its request and wait for the exit; True when the deadline killed it.

        A timer kills at the deadline, so the wait itself blocks in waitpid and returns the moment
        the sandbox exits (`Popen.wait(timeout)` polls in sleeps of up to 50 ms, more than a whole
        run takes). A child that never reads its request is killed the same way.
        """
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            self._terminate(proc)

        timer = threading.Timer(self.limits.timeout_s + _START_GRACE, expire)
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.write(request)
            with contextlib.suppress(OSError):
                proc.stdin.close()
            proc.wait()
        finally:
            timer.cancel()
        return fired.is_set()

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a running sandbox. With a PID namespace the harness (PID 1 there) goes first:
        the kernel then kills the rest of the namespace and `unshare`, still alive, reaps the
        harness and exits, so nothing is left to the machine's init as a zombie; the process
        group follows a moment later in case it does not. Without one, the process group."""
        children = _children(proc.pid) if self.isolation.pid_namespace else []
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if children:
            later = threading.Timer(2.0, _kill_group, (proc.pid,))
            later.daemon = True
            later.start()
        else:
            _kill_group(proc.pid)

    def _kill(self, proc: subprocess.Popen[bytes], uid: int) -> None:
        """After the sandbox exited: kill what is left of its process group and, without a PID
        namespace (which the kernel empties when its PID 1 exits), sweep the dedicated uid."""
        _kill_group(proc.pid)
        proc.wait()
        if self.isolation.dedicated_uid and not self.isolation.pid_namespace:
            _kill_uid(uid)

    def _error(self, reason: str, t0: float) -> SampleResult:
        return SampleResult(
            False, "error", reason, time.perf_counter() - t0, self.isolation.network
        )

    def _verdict(
        self,
        code: int | None,
        reply: bytes,
        nonce: bytes,
        timed_out: bool,
        wall: float,
        output: str,
    ) -> SampleResult:
        net = self.isolation.network
        limit = self.limits.timeout_s

        def result(status: Status, reason: str) -> SampleResult:
            return SampleResult(
                status == "passed", status, reason[:_REASON_CHARS], wall, net, output
            )

        if reply == b"SP" + nonce and not timed_out:
            return result("passed", "")
        if timed_out:
            return result("timeout", f"killed after the {limit:g} s wall-clock limit")
        started, rest = reply[:1] == b"S", reply[1:]
        if not started:
            last = output.strip().splitlines()[-1:] or [f"exit code {code}"]
            return result("error", f"the sandbox did not start the program: {last[0]}")
        if rest[:1] == b"F":
            return result("failed", rest[1:].decode("utf-8", "replace"))
        if code is not None and code > 128:
            sig = code - 128
            if sig == signal.SIGXCPU:
                return result("timeout", "CPU time limit exceeded (SIGXCPU)")
            if sig == signal.SIGXFSZ:
                return result("failed", "file size limit exceeded (SIGXFSZ)")
            return result("failed", f"killed by {_signal_name(sig)}")
        if rest:
            return result("failed", "the result channel held something other than the verdict")
        return result("failed", f"exited (code {code}) before the tests finished")
