"""Isolation modes of the sandbox: which one the machine allows (probed once per process), what
each leaves uncontained, and the command line that starts a sample's interpreter inside it.

Modes, strongest first:
- `bwrap` (bubblewrap, root or not): a new root filesystem that holds only the interpreter's files
  (sys.prefix, sys.base_prefix, the executable's directories) and the shared libraries (/usr/lib,
  /lib*), read-only, with site-packages hidden unless `site_packages` is on, an empty read-only
  /tmp, and the sample's own directory at its own path: its cwd, HOME and TMPDIR and the only
  place it can write. A fresh /dev and
  /proc, new network, PID, IPC, UTS (and cgroup) namespaces, no capabilities; as root, a dedicated
  unprivileged uid per worker slot besides (`setpriv` inside the sandbox: the kernel exempts uid 0
  from RLIMIT_NPROC even when it is mapped into a user namespace, so `--uid` would not do).
- `namespaces` (root): new network, PID and mount namespaces (`unshare`), then the dedicated uid
  (`setpriv`): files that uid may read stay readable, world-writable directories writable. Where the
  interpreter lives under a private home directory (/root/.pyenv) the uid keeps CAP_DAC_READ_SEARCH
  to reach it, and with it may read every file on the machine.
- `uid` (root without unshare): the uid drop alone.
- `userns` (not root, user namespaces allowed): network, PID and mount namespaces.
- `plain`: limits, a fresh directory and an empty environment only.
`Isolation.uncontained` names what a mode leaves open; every mode but `bwrap` leaves something.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import site
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from albor.errors import ConfigError

log = logging.getLogger("albor.evals.sandbox")

Mode = Literal["bwrap", "namespaces", "uid", "userns", "plain"]
MODES: tuple[Mode, ...] = ("bwrap", "namespaces", "uid", "userns", "plain")

# Dedicated uids for samples when albor runs as root: one per worker slot, in a block chosen by
# the parent's pid so that two albor processes on one machine do not share uids (RLIMIT_NPROC
# counts per uid, and leftovers are swept by uid). Far above any login or container uid range.
_UID_BASE = 0x5A00_0000
SLOTS = 0x200
_INSTALL_HINT = "install bubblewrap (apt-get install bubblewrap) to contain samples fully"
# Library directories bound read-only into a bwrap sandbox (those that exist; symlinks stay links).
_LIBRARY_DIRS = (
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib32",
    "/usr/libx32",
    "/lib",
    "/lib64",
    "/lib32",
    "/libx32",
    "/etc/ld.so.cache",
)


@dataclass(frozen=True)
class Isolation:
    """What the platform allowed, found once per process by `isolation()`."""

    mode: Mode
    network: bool  # new network namespace: no interfaces but a down loopback
    pid_namespace: bool  # the sample sees only its own processes, all killed with the harness
    dedicated_uid: bool  # runs as an unprivileged uid of its own
    process_limit: bool  # RLIMIT_NPROC binds the sample
    read_caps: bool  # kept CAP_DAC_READ_SEARCH to reach an interpreter in a private home dir
    private_root: bool  # sees only the interpreter, the libraries and its own directory
    uncontained: tuple[str, ...] = ()  # what the sample can still reach, empty for bwrap
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["uncontained"] = list(self.uncontained)
        return d


def _uncontained(iso: Isolation) -> tuple[str, ...]:
    """What a sample under `iso` can still read, write or reach on the host."""
    if iso.private_root:
        return ()
    out = ["host files readable"]
    if iso.read_caps or not iso.dedicated_uid:
        out.append("private host files readable")
    if not iso.dedicated_uid:
        out.append("host files writable")
    out += ["host /tmp writable", "host IPC shared"]
    if not iso.network:
        out.append("network")
    if not iso.pid_namespace:
        out.append("other processes visible")
        if not iso.dedicated_uid:
            out += ["other processes signalable", "daemons may outlive the sample"]
    if not iso.process_limit:
        out.append("no process limit")
    return tuple(out)


def _candidate(mode: Mode, *, ns: bool, uid: bool, nproc: bool, caps: bool = False) -> Isolation:
    iso = Isolation(mode, ns, ns, uid, nproc, caps, mode == "bwrap")
    return replace(iso, uncontained=_uncontained(iso))


def python_args(site_packages: bool) -> list[str]:
    return [sys.executable, "-I", "-B"] + ([] if site_packages else ["-S"])


def slot_uid(slot: int) -> int:
    return _UID_BASE + (os.getpid() % 0x8000) * SLOTS + slot % SLOTS


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


def _outermost(paths: set[str]) -> list[str]:
    """`paths` without those inside another of them, sorted."""
    kept: list[str] = []
    for p in sorted(paths):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return kept


def _mapped_library_dirs() -> set[str]:
    """Directories of the shared objects this interpreter has mapped, outside site-packages:
    where a conda or Nix Python finds libraries that are not under /usr/lib."""
    try:
        with open("/proc/self/maps") as f:
            files = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return set()
    return {
        os.path.dirname(os.path.realpath(p))
        for p in files
        if p.startswith("/") and ".so" in p and "-packages/" not in p and os.path.isfile(p)
    }


@functools.cache
def _bwrap_mounts() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(read-only binds, (target, link) symlinks, site-packages dirs) of a bwrap sandbox."""
    wanted = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        os.path.dirname(sys.executable),
        os.path.dirname(os.path.realpath(sys.executable)),
    ]
    binds: set[str] = set()
    links: dict[str, str] = {}
    for p in wanted:
        real = os.path.realpath(p)
        if real != "/" and os.path.isdir(real):
            binds.add(real)
            # A prefix reached through a symlink keeps its name inside the sandbox.
            if p != real and os.path.realpath(os.path.dirname(p)) == os.path.dirname(p):
                links[p] = real
    for p in _LIBRARY_DIRS:
        if os.path.islink(p):
            links[p] = os.readlink(p)
        elif os.path.exists(p):
            binds.add(p)
    binds |= {d for d in _mapped_library_dirs() if d != "/"}
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv:
            binds.add(os.path.realpath(setpriv))
    kept = _outermost(binds)
    prefixes = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    packages = sorted({os.path.realpath(d) for d in site.getsitepackages(prefixes)})
    return (
        tuple(kept),
        tuple(sorted((t, link) for link, t in links.items() if _outermost({*kept, link}) != kept)),
        tuple(d for d in packages if os.path.isdir(d)),
    )


def _bwrap(uid: int, root: bool, work: str, site_packages: bool) -> list[str]:
    binds, links, packages = _bwrap_mounts()
    cmd = [shutil.which("bwrap") or "bwrap"]
    cmd += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
    cmd += ["--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    # The harness is PID 1 (see the package docstring); bwrap's own init would wait for every
    # process in the namespace, a daemon included, instead of ending them with the harness.
    cmd += ["--as-pid-1", "--cap-drop", "ALL"]
    if root:
        # Only for `setpriv`, which drops them all with the uid before the interpreter starts.
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        cmd += ["--unshare-user"]
    # A private /tmp first: an interpreter that lives under /tmp (a virtual environment made
    # there) is bound on top of it below instead of hidden by it. It is made read-only at the end,
    # so the sample writes only its own directory, which keeps its host path (under /tmp, or
    # wherever the host's TMPDIR is) and holds nothing but what the sample wrote.
    cmd += ["--tmpfs", "/tmp"]
    # bwrap makes the parents of a mount point 0700; the dedicated uid must traverse them.
    parents = {os.path.dirname(p) for p in [*binds, *(link for _, link in links), work]}
    ancestors: set[str] = set()
    for p in parents:
        while p not in ("/", ""):
            ancestors.add(p)
            p = os.path.dirname(p)
    for d in sorted(ancestors):
        cmd += ["--perms", "0755", "--dir", d]
    for p in binds:
        cmd += ["--ro-bind", p, p]
    for target, link in links:
        cmd += ["--symlink", target, link]
    if not site_packages:
        for d in packages:
            cmd += ["--tmpfs", d, "--remount-ro", d]
    cmd += ["--bind", work, work, "--dev", "/dev", "--proc", "/proc"]
    # No --chdir: the harness enters its directory itself (see there).
    cmd += ["--remount-ro", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/", "--"]
    if root:
        cmd += _setpriv(uid, read_caps=False)
    return cmd


def command(iso: Isolation, uid: int, work: str, site_packages: bool) -> list[str]:
    """The command line of an interpreter under `iso` for work dir `work`; append its arguments."""
    root = os.geteuid() == 0
    if iso.mode == "bwrap":
        prefix = _bwrap(uid, root, work, site_packages)
    elif iso.mode == "namespaces":
        prefix = _unshare(user=False) + _setpriv(uid, iso.read_caps)
    elif iso.mode == "uid":
        prefix = _setpriv(uid, iso.read_caps)
    elif iso.mode == "userns":
        prefix = _unshare(user=True)
    else:
        prefix = []
    return [*prefix, *python_args(site_packages)]


def _probe(iso: Isolation) -> str | None:
    """Run a trivial interpreter under `iso`; None when it works, else why not."""
    if iso.mode == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap not found"
    uid = slot_uid(SLOTS - 1)
    work = tempfile.mkdtemp(prefix="albor-sandbox-probe-")
    try:
        if iso.dedicated_uid:
            os.chown(work, uid, uid)
        # The interpreter must find its own files: an interpreter that cannot read its prefix
        # (one under a private home directory, for a dedicated uid) falls back to another
        # Python's standard library, or to none, so the probe compares where it landed.
        code = "import json, os, sys; print(json.dumps([sys.prefix, sys.version, os.getuid()]))"
        cmd = [*command(iso, uid, work, True), "-c", code]
        here = work
        try:
            done = subprocess.run(
                cmd,
                cwd=work,
                env={"HOME": here, "LANG": "C.UTF-8"},
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
            prefix, version, ran_as = json.loads(done.stdout)
        except ValueError:
            return f"unexpected probe output {done.stdout[:200]!r}"
        if [prefix, version] != [sys.prefix, sys.version]:
            return f"the interpreter did not find its own files (prefix {prefix}, not {sys.prefix})"
        if iso.dedicated_uid and ran_as != uid:
            return f"the sample ran as uid {ran_as}, not the dedicated uid {uid}"
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def isolation(mode: Mode | None = None) -> Isolation:
    """The strongest isolation this machine allows (or `mode`, checked), probed once.

    Falls back in order and says why in `detail`; `plain` always works. A mode that leaves
    anything uncontained is logged as a warning (once per process), naming what.
    """
    return _resolve(mode)


@functools.cache
def _resolve(mode: Mode | None) -> Isolation:
    root = os.geteuid() == 0
    if mode is not None and mode not in MODES:
        raise ConfigError(f"sandbox isolation '{mode}' is unknown: use one of {', '.join(MODES)}")
    candidates = [_candidate("bwrap", ns=True, uid=root, nproc=True)]
    if root:
        for caps in (False, True):
            candidates.append(_candidate("namespaces", ns=True, uid=True, nproc=True, caps=caps))
        for caps in (False, True):
            candidates.append(_candidate("uid", ns=False, uid=True, nproc=True, caps=caps))
    else:
        candidates.append(_candidate("userns", ns=True, uid=False, nproc=True))
    # As root a plain run is exempt from RLIMIT_NPROC; otherwise it counts all the user's processes
    # and the harness sets the limit relative to their number.
    candidates.append(_candidate("plain", ns=False, uid=False, nproc=not root))
    tried: list[str] = []
    for iso in candidates:
        if mode is not None and iso.mode != mode:
            continue
        why = None if iso.mode == "plain" else _probe(iso)
        if why is None:
            found = replace(iso, detail="; ".join(tried) if tried else "strongest available")
            if found.uncontained:
                if mode is not None:
                    hint = f"asked for by `isolation: {mode}`"
                else:
                    hint = _INSTALL_HINT if shutil.which("bwrap") is None else "bwrap failed"
                log.warning(
                    "sandbox isolation '%s' does not contain: %s (%s; %s)",
                    found.mode,
                    ", ".join(found.uncontained),
                    hint,
                    found.detail,
                )
            return found
        how = " (with read caps)" if iso.read_caps else " (no read caps)" if root else ""
        tried.append(f"{iso.mode}{'' if iso.mode == 'bwrap' else how}: {why}")
    raise ConfigError(
        f"sandbox isolation '{mode}' is not available here "
        f"({'; '.join(tried) or ('not as root' if root else 'it needs root')}); "
        "set `isolation: auto` to use the strongest available"
    )
