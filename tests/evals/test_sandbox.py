"""The sandbox against hostile samples: each sample below passes its own asserts only if its attack
works, so every one must be scored a failure, and the host must be unchanged afterwards (no file
created or altered, no process left, no secret seen, no connection made, no signal received).

The isolation this platform must reach is asserted, not probed: as root on Linux that is `bwrap`
with nothing uncontained (CI installs bubblewrap), so a sandbox that silently fell back to a
weaker mode fails here instead of turning the hostile tests into skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from albor.evals import sandbox as sb
from albor.evals.sandbox import Sandbox, SandboxConfig, isolation
from albor.evals.sandbox.isolation import SLOTS, slot_uid

ISO = isolation()


def box(timeout: float = 2.0, **limits: object) -> Sandbox:
    return Sandbox(SandboxConfig(timeout_s=timeout, **limits), workers=2)  # type: ignore[arg-type]


def src(code: str) -> str:
    return textwrap.dedent(code)


def _unprivileged_bwrap_works() -> bool:
    """Whether bwrap can make a user namespace for this (non-root) user, tried on its own."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False
    cmd = [bwrap, "--unshare-user", "--ro-bind", "/", "/", "--", sys.executable, "-c", "pass"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def expected_mode() -> str | None:
    """The isolation this platform must reach; None where full containment is not required."""
    if sys.platform != "linux":
        return None
    if os.geteuid() == 0:
        if shutil.which("bwrap") is None:
            pytest.fail(
                "bubblewrap is required to test the sandbox as root on Linux: "
                "apt-get install bubblewrap"
            )
        return "bwrap"
    return "bwrap" if _unprivileged_bwrap_works() else None


@pytest.fixture
def contained() -> Iterator[None]:
    """Hostile tests run where full containment is required, and assert it is there."""
    mode = expected_mode()
    if mode is None:
        pytest.skip(f"{sys.platform}, uid {os.geteuid()}: full containment is not required here")
    assert ISO.mode == mode, f"the sandbox fell back to {ISO.mode}: {ISO.detail}"
    assert ISO.uncontained == (), ISO
    yield
    assert sb.sandbox_processes() == []


def assert_attack_failed(program: str, **limits: object) -> sb.SampleResult:
    r = box(**limits).run(program)
    assert not r.passed and r.status in ("failed", "timeout"), r
    return r


def test_isolation_is_detected_once_and_reported() -> None:
    assert isolation() is ISO
    assert ISO.mode in sb.MODES
    mode = expected_mode()
    if mode is not None:
        assert ISO.mode == mode and ISO.network and ISO.pid_namespace, ISO
        assert ISO.process_limit and ISO.uncontained == () and not ISO.read_caps, ISO
        assert ISO.dedicated_uid == (os.geteuid() == 0), ISO
    r = box().run("pass\n")
    assert r.passed and r.status == "passed" and r.network_isolated == ISO.network
    assert r.to_json()["wall_s"] >= 0
    assert ISO.to_json()["uncontained"] == list(ISO.uncontained)


def test_a_weaker_mode_says_what_it_leaves_open() -> None:
    # In a fresh process, as `albor` runs it: the warning reaches stderr with nothing configured.
    code = (
        "import json; from albor.evals.sandbox import isolation; "
        "print(json.dumps(isolation('plain').to_json()))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    plain = json.loads(done.stdout)
    assert plain["mode"] == "plain" and not plain["private_root"]
    uncontained = plain["uncontained"]
    for item in ("host files readable", "host /tmp writable", "network", "other processes visible"):
        assert item in uncontained, uncontained
    assert "sandbox isolation 'plain' does not contain: host files readable" in done.stderr
    assert "`isolation: plain`" in done.stderr


def test_pass_fail_error_and_output() -> None:
    results = box().run_many(
        [
            "def f(x):\n    return x + 1\nassert f(1) == 2\nprint('hello')\n",
            "def f(x):\n    return x\nassert f(1) == 2, 'f(1) is wrong'\n",
            "def f(:\n",
            "raise ValueError('boom')\n",
        ]
    )
    assert [r.status for r in results] == ["passed", "failed", "failed", "failed"]
    assert results[0].output == "hello\n"
    assert results[1].reason == "AssertionError: f(1) is wrong"
    assert results[2].reason.startswith("SyntaxError")
    assert results[3].reason == "ValueError: boom"


def test_its_own_directory_is_writable_and_site_packages_follow_the_config() -> None:
    program = src(
        """
        import os, pathlib, tempfile
        pathlib.Path("scratch.txt").write_text("mine")
        assert os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd()
        with tempfile.NamedTemporaryFile(dir=None) as f:
            f.write(b"x")
        assert os.listdir(".") == ["scratch.txt"]
        import pydantic
        """
    )
    assert box().run(program).passed
    r = box(site_packages=False).run(program)
    assert r.status == "failed" and "pydantic" in r.reason, r


@pytest.mark.parametrize(
    "program",
    [
        "import sys\nsys.exit(0)\nassert False\n",
        "raise SystemExit(0)\n",
        "import os\nos._exit(0)\nassert False\n",
        "import os, sys\nsys.stdout.flush()\nos.kill(os.getpid(), 9)\n",
        "import atexit, os\natexit.register(lambda: os._exit(0))\nassert 1 == 2\n",
    ],
    ids=["sys.exit", "SystemExit", "os._exit", "kill-self", "atexit"],
)
def test_exiting_before_the_asserts_is_a_failure(program: str) -> None:
    r = box().run(program)
    assert not r.passed and r.status == "failed", r


def test_a_forged_success_line_is_a_failure() -> None:
    # Prints what a naive harness looks for, writes a fake verdict on every descriptor it can,
    # then leaves with exit code 0 before the asserts.
    program = src(
        """
        import os
        print("passed")
        print("{'passed': True, 'result': 'passed'}", flush=True)
        for fd in range(3, 64):
            try:
                os.write(fd, b"SP" + b"0" * 32)
            except OSError:
                pass
        os._exit(0)
        assert False
        """
    )
    r = box().run(program)
    assert not r.passed and r.status == "failed" and "passed" in r.output


def test_infinite_loop_times_out_and_leaves_nothing() -> None:
    t0 = time.perf_counter()
    r = box(timeout=1.0).run("while True:\n    pass\n")
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 5
    assert sb.sandbox_processes() == []


def test_cpu_limit_stops_a_spinning_sample_before_the_wall_clock() -> None:
    r = box(timeout=20.0, cpu_s=1).run("while True:\n    pass\n")
    assert r.status == "timeout" and "CPU" in r.reason and r.wall_s < 10


def test_fork_bomb_is_bounded_and_cleaned_up() -> None:
    if not ISO.process_limit:
        assert expected_mode() is None, ISO
        pytest.skip(f"no process limit in isolation mode {ISO.mode} on this platform")
    # A counting bomb first: how many children can it hold at once?
    counting = src(
        """
        import os, time
        n = 0
        while True:
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
        print("children", n, flush=True)
        assert False
        """
    )
    r = box(timeout=5.0, max_procs=16).run(counting)
    assert r.status == "failed", r
    children = int(r.output.split()[-1])
    assert 0 < children < 16
    # The classic: every process forks forever.
    bomb = src(
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """
    )
    t0 = time.perf_counter()
    r = box(timeout=2.0, max_procs=16).run(bomb)
    assert r.status == "timeout" and time.perf_counter() - t0 < 10
    assert sb.sandbox_processes() == []
    # And the machine is unharmed: this process and a fresh sample still fork.
    assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0
    assert box().run("import os\nif os.fork() == 0:\n    os._exit(0)\nos.wait()\n").passed


def test_memory_bomb_is_a_failure() -> None:
    for program in (
        "x = bytearray(64 * 2**30)\n",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))\n",
    ):
        r = box(timeout=10.0, memory_mb=256).run(program)
        assert r.status == "failed" and "MemoryError" in r.reason, r


def test_file_size_limit() -> None:
    r = box(file_size_mb=1).run("open('big', 'wb').write(b'x' * (4 << 20))\n")
    assert r.status == "failed" and ("File too large" in r.reason or "SIGXFSZ" in r.reason), r


def test_plain_mode_still_scores_correctly() -> None:
    plain = Sandbox(SandboxConfig(timeout_s=1.0), workers=2, mode="plain")
    assert plain.isolation.mode == "plain" and not plain.isolation.network
    results = plain.run_many(
        ["assert 1 + 1 == 2\n", "assert 1 == 2\n", "import os\nos._exit(0)\n", "while 1: pass\n"]
    )
    assert [r.status for r in results] == ["passed", "failed", "failed", "timeout"]


# Hostile samples: each passes only if its attack succeeds.


def _private_tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 0600 file in a directory of the test's, and a token in a private (0700) home-like one."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    secret = secrets_dir / "root-only.txt"
    secret.write_text("root-only-7d1e")
    secret.chmod(0o600)
    home = tmp_path / "home"
    token = home / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_secret_token_42a")
    token.chmod(0o600)
    home.chmod(0o700)
    return secret, home, token


def test_host_files_cannot_be_read(contained: None, tmp_path: Path) -> None:
    secret, home, token = _private_tree(tmp_path)
    for path, text in ((secret, "root-only-7d1e"), (token, "hf_secret_token_42a")):
        r = assert_attack_failed(f"assert open({str(path)!r}).read() == {text!r}\n")
        assert text not in r.output
    r = assert_attack_failed(f"import os\nassert '.cache' in os.listdir({str(home)!r})\n")
    assert ".cache" not in r.output
    # Nor what the real home directory holds beside the interpreter (a private ~/.pyenv shows
    # its path inside the sandbox, nothing else).
    real_home = Path(os.path.expanduser("~")).resolve()
    ours = [Path(p).resolve() for p in (sys.prefix, sys.base_prefix)]
    others = [
        n for n in os.listdir(real_home) if not any(p.is_relative_to(real_home / n) for p in ours)
    ]
    if others:
        assert_attack_failed(f"import os\nassert {others[0]!r} in os.listdir({str(real_home)!r})\n")
    # Nothing of the host beyond the interpreter: not /etc/passwd, not the test's own source.
    assert_attack_failed("assert 'root:' in open('/etc/passwd').read()\n")
    assert_attack_failed(f"assert 'hostile' in open({__file__!r}).read()\n")


def test_host_files_cannot_be_written(contained: None, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tmp_path.chmod(0o777)  # even a directory anyone may write to is out of reach
    real_home = Path(os.path.expanduser("~"))
    name = f"albor-attack-{uuid.uuid4().hex}"
    targets = [real_home / name, Path(sys.prefix) / name, tmp_path / name]
    program = src(
        f"""
        import os, shutil
        victim, targets = {str(victim)!r}, {[str(t) for t in targets]!r}
        for attack in (
            lambda: os.remove(victim),
            lambda: open(victim, "w").write("pwned"),
            lambda: shutil.rmtree(os.path.dirname(victim)),
            *(lambda t=t: open(t, "w").write("pwned") for t in targets),
        ):
            try:
                attack()
            except OSError:
                pass
        assert open(victim).read() == "pwned" or all(os.path.exists(t) for t in targets)
        """
    )
    try:
        assert_attack_failed(program)
        assert victim.read_text() == "precious"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
        assert [t for t in targets if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)


@pytest.mark.parametrize("shared", ["/tmp", "/dev/shm"])
def test_world_writable_directories_are_out_of_reach(contained: None, shared: str) -> None:
    if not os.path.isdir(shared):
        pytest.skip(f"{shared} does not exist on this machine")
    # The canary proves the sample would be looking at the host's directory, not its own.
    canary = Path(shared) / f"albor-canary-{uuid.uuid4().hex}"
    dropped = Path(shared) / f"albor-dropped-{uuid.uuid4().hex}"
    canary.write_text("host")
    program = src(
        f"""
        import os
        try:
            open({str(dropped)!r}, "w").write("pwned")
        except OSError:
            pass
        assert os.path.exists({str(canary)!r}) and os.path.exists({str(dropped)!r})
        """
    )
    try:
        assert_attack_failed(program)
        assert not dropped.exists()
    finally:
        canary.unlink()
        dropped.unlink(missing_ok=True)


@pytest.fixture
def sibling() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A process of the host's with a secret in its environment."""
    secret = f"albor-sibling-secret-{uuid.uuid4().hex}"
    env = {**os.environ, "ALBOR_SIBLING_SECRET": secret}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env)
    try:
        yield proc, secret
    finally:
        proc.kill()
        proc.wait()


def test_other_processes_are_invisible(
    contained: None, sibling: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, secret = sibling
    me = os.getpid()
    # Something only this test process's environment holds (/proc shows the initial one).
    ours = Path(f"/proc/{me}/environ").read_bytes().split(b"\0")[0].decode()
    program = src(
        f"""
        import glob, os
        seen = []
        for path in [f"/proc/{{os.getppid()}}/environ", "/proc/{me}/environ",
                     "/proc/{proc.pid}/environ", *glob.glob("/proc/*/environ")]:
            try:
                data = open(path, "rb").read()
            except OSError:
                continue
            if {secret!r}.encode() in data or {ours!r}.encode() in data:
                seen.append(path)
        print("visible", [p for p in os.listdir("/proc") if p.isdigit()])
        assert seen or os.path.exists("/proc/{me}") or os.path.exists("/proc/{proc.pid}")
        """
    )
    r = assert_attack_failed(program)
    assert secret not in r.output and "visible" in r.output, r
    assert f"'{me}'" not in r.output and f"'{proc.pid}'" not in r.output, r


def test_signals_do_not_leave_the_sandbox(
    contained: None, sibling: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, _ = sibling
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda n, _: got.append(n))
    kill_them = src(
        f"""
        import os, signal
        hit = 0
        for pid, sig in (({os.getpid()}, signal.SIGUSR1), ({proc.pid}, signal.SIGKILL)):
            try:
                os.kill(pid, sig)
                hit += 1
            except OSError:
                pass
        assert hit == 2
        """
    )
    kill_parent = src(
        """
        import os, signal, time
        parent = os.getppid()
        os.kill(parent, signal.SIGKILL)
        time.sleep(0.3)
        assert os.getppid() != parent  # the parent is gone: the attack worked
        """
    )
    try:
        assert_attack_failed(kill_them)
        assert_attack_failed(kill_parent)
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert got == [] and proc.poll() is None
    assert box().run("pass\n").passed  # the sandbox itself is unharmed


def test_no_network(contained: None) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    program = src(
        f"""
        import socket
        names = [name for _, name in socket.if_nameindex()]
        s = socket.create_connection(("127.0.0.1", {port}), timeout=1)
        s.sendall(b"exfiltrated")
        """
    )
    try:
        r = assert_attack_failed(program)
        assert "OSError" in r.reason or "Error" in r.reason, r
        listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            listener.accept()
    finally:
        listener.close()
    only_lo = "import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']\n"
    assert box().run(only_lo).passed


def test_a_daemon_does_not_outlive_the_sample(contained: None, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    late = tmp_path / "late.txt"
    marker = f"albor-daemon-{uuid.uuid4().hex}"
    # The grandchild leaves the session and re-executes with the marker in its command line, so
    # the test can look for it among the host's processes afterwards.
    daemon = f"import time; time.sleep(1); open({str(late)!r}, 'w').write('pwned')"
    program = src(
        f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", {daemon!r}, {marker!r}])
            os._exit(0)
        assert os.path.isdir({str(tmp_path)!r})  # it could reach the host's directory
        """
    )
    assert_attack_failed(program)
    time.sleep(1.5)
    assert not late.exists()
    assert [p for p in _cmdlines() if marker in p] == []


def test_sleeping_children_are_killed_after_a_pass() -> None:
    program = src(
        """
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(600)
            os._exit(0)
        assert True
        """
    )
    assert box().run(program).passed
    time.sleep(0.1)
    assert sb.sandbox_processes() == []
    assert _own_tempdirs() == []


def _cmdlines() -> list[str]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                out.append(Path(f"/proc/{entry}/cmdline").read_bytes().decode("utf-8", "replace"))
    return out


def _own_tempdirs() -> list[str]:
    import tempfile

    root = Path(tempfile.gettempdir())
    lo = slot_uid(0)
    return [str(p) for p in root.glob("albor-sandbox-*") if lo <= p.stat().st_uid < lo + SLOTS]


def test_an_interpreter_that_lives_under_tmp_runs_in_the_sandbox(
    tmp_path: Path, contained: None
) -> None:
    """A virtual environment made under /tmp (as CI makes its fresh ones) must stay visible inside
    the sandbox, whose /tmp is its own."""
    venv = Path("/tmp") / f"albor-venv-{uuid.uuid4().hex[:8]}"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        code = src(
            """
            import json, sys
            from albor.evals.sandbox import Sandbox, isolation
            r = Sandbox(workers=1).run("import sys\\nprint(sys.prefix)")
            print(json.dumps([isolation().mode, r.passed, r.output.strip()]))
            """
        )
        # The parent finds albor and its dependencies on PYTHONPATH; the sandboxed interpreter
        # runs isolated (-I) and sees only its own prefix.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        done = subprocess.run(
            [venv / "bin" / "python", "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1]) == ["bwrap", True, str(venv)]
    finally:
        shutil.rmtree(venv, ignore_errors=True)
