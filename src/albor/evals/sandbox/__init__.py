"""Run untrusted programs (a benchmark prompt + a model's completion + the tests) one subprocess
per sample, pooled over the cores, with limits, and score them so that exiting early or printing
"passed" can never count as a pass.

Each sample gets:
- limits set with `resource.setrlimit` by the harness before the sample runs: CPU seconds, address
  space, processes, file size, no core files; a wall-clock timeout after which the whole process
  group is SIGKILLed;
- a fresh temporary directory as cwd, HOME and TMPDIR (removed afterwards), an environment of a
  few locale variables (no PATH, nothing inherited: no secrets), `python -I` (isolated mode);
- the strongest isolation the platform allows, detected once per process (`isolation()`, modes in
  `isolation.py`): with bubblewrap (`bwrap`), a root filesystem of the interpreter, its libraries
  and the sample's directory alone, no network, its own PID namespace and, as root, a dedicated
  uid; weaker modes where bwrap does not work, each logged as a warning that names what it leaves
  uncontained (`Isolation.uncontained`). `SampleResult.network_isolated` says whether the network
  was cut.

The verdict cannot be forged by exiting or printing: the parent hands the harness a random nonce
on a pipe, and the harness reads it and writes it back on a second pipe only after the whole
program, `check(...)` included, has returned. `sys.exit(0)` is caught as a failure,
`os._exit(0)` leaves no nonce, and stdout is never read for the verdict. (A sample written to
attack this harness from inside the same interpreter could read the pipe itself; it could as well
return objects whose `__eq__` is always true. The verdict guards against accidents, the
isolation against harm.)

Processes: parent -> `bwrap` or `unshare` (session leader, its own process group) -> `setpriv`
(exec, as root) -> harness (PID 1 of the new PID namespace) -> runner (forked; runs the sample).
The harness stays as PID 1 because the kernel drops default-action signals to a namespace's init,
which would make RLIMIT_CPU's SIGXCPU a no-op for the sample; when PID 1 exits the kernel kills
everything else in the namespace, including processes that left the process group.
"""

from albor.evals.sandbox.harness import HARNESS
from albor.evals.sandbox.isolation import MODES, Isolation, Mode, isolation
from albor.evals.sandbox.runner import (
    SampleResult,
    Sandbox,
    SandboxConfig,
    Status,
    sandbox_processes,
    uid_processes,
)

__all__ = [
    "HARNESS",
    "MODES",
    "Isolation",
    "Mode",
    "SampleResult",
    "Sandbox",
    "SandboxConfig",
    "Status",
    "isolation",
    "sandbox_processes",
    "uid_processes",
]
