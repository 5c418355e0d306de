"""An ordered, bounded parallel map over record batches: how the data stages run `workers: N`.

`map_batches(fn, batches, workers)` yields `fn(batch)` for every batch, in input order. With
`workers == 1` (the default) it calls `fn` inline, with no pool and no pickling; otherwise a
`ProcessPoolExecutor` runs `fn` in `workers` processes while the caller consumes results. At most
`max_in_flight` batches (default `2 * workers`) are submitted and not yet consumed, so memory is
bounded by the batch size times that number, never by the length of the input: the next batch is
read only once the caller has taken a result.

`map_keyed(fn, items, workers, shared=...)` is the form the stages use: each item is a pair
(key, payload); only the payload crosses to a worker, the key stays in the parent and comes back
beside the result (typically the Arrow batch, to write out the rows `fn` decided to keep), and
`shared` (a filter list, a MinHash signer, a benchmark n-gram index) is pickled once per worker
through the pool's initializer rather than once per batch, then passed to `fn(shared, payload)`.

Workers are started with the `spawn` context, never `fork`. Forking copies only the calling thread
of a process whose other threads (Arrow's I/O and CPU thread pools, torch's intra-op pool, a rich
progress-bar refresher) may hold locks at that instant: the child inherits those locks held, by
threads that do not exist in it, and can deadlock on its first allocation or log line (Python 3.12
warns about forking a multi-threaded process for this reason). A spawned
worker is a fresh interpreter that imports what `fn` needs, so `fn` must be a top-level function
and the payloads, results and `shared` must pickle: plain lists of texts, tuples, numpy arrays;
and a script that runs a stage with `workers > 1` needs the usual `if __name__ == "__main__":`
guard, since a spawned worker imports the script's module again.

`corpus.iter_batches` is the bounded way to read the batches a map consumes (see its docstring).

A worker's exception is raised in the parent as `StageFailed`, naming the batch (by its index and,
with `describe`, by its rows), chained to the original with the worker's traceback.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import pickle
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, Field

from albor.config import parse_int
from albor.errors import StageFailed
from albor.plan import Plan

K = TypeVar("K")
P = TypeVar("P")
R = TypeVar("R")
S = TypeVar("S")

# The `shared` object of the pool this worker process belongs to, set by `_install`.
_shared: Any = None


def _parse_workers(value: Any) -> Any:
    """`auto` means one worker per CPU, as 0 does; shorthand numbers are accepted as elsewhere."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    parsed = parse_int(value)
    if isinstance(parsed, str):
        raise ValueError(f"'{value}' is not a number of processes: give 1, 2, ... or 0 / auto")
    return parsed


Workers = Annotated[int, BeforeValidator(_parse_workers), Field(ge=0)]
"""A `workers` config field: processes for the per-document work; 0 or `auto`: one per CPU."""


def workers_description(work: str) -> str:
    """The description of a stage's `workers` field, naming the work it spreads over processes."""
    return (
        f"Processes that {work}, batch by batch: 1 works in this process; 0 or `auto` starts "
        "one per CPU. Memory grows by about two batches per worker; the output is the same "
        "whatever the number."
    )


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_workers(workers: int) -> int:
    """The number of processes `workers` asks for: itself, or the CPU count for 0."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0 (0: one per CPU), got {workers}")
    return workers if workers > 0 else cpu_count()


def plan_workers(p: Plan, workers: int) -> int:
    """`workers` resolved for a plan: the count goes in its estimates, and more processes than
    CPUs is a warning (they would only take turns, each holding its batches). Returns how many
    can run at once, the most a wall-time estimate may divide by."""
    n = resolve_workers(workers)
    p.estimates["workers"] = n
    cpus = cpu_count()
    if n > cpus:
        p.add(
            "workers",
            "warn",
            f"workers: {n} processes on {cpus} CPU(s) run no faster than {cpus} and hold more "
            f"batches in memory: set `workers: {cpus}` or `auto`",
        )
    return min(n, cpus)


def _install(shared: Any) -> None:
    """Pool initializer: keep the map's `shared` object for every call in this worker."""
    global _shared
    _shared = shared


def _run(fn: Callable[[Any, Any], Any], payload: Any) -> Any:
    """What a worker runs per batch: `fn` with the pool's shared object."""
    return fn(_shared, payload)


def _call(fn: Callable[[Any], Any], payload: Any) -> Any:
    """`map_batches` in terms of `map_keyed`: the shared object is `fn` itself."""
    return fn(payload)


def map_batches(
    fn: Callable[[P], R],
    batches: Iterable[P],
    workers: int = 1,
    max_in_flight: int | None = None,
    *,
    what: str = "parallel map",
) -> Iterator[R]:
    """`fn(batch)` for every batch, in input order, in `workers` processes (see the module
    docstring); `what` names the work in an error."""
    items = ((None, batch) for batch in batches)
    for _, result in map_keyed(_call, items, workers, max_in_flight, shared=fn, what=what):
        yield result


def map_keyed(
    fn: Callable[[S, P], R],
    items: Iterable[tuple[K, P]],
    workers: int = 1,
    max_in_flight: int | None = None,
    *,
    shared: S,
    what: str = "parallel map",
    describe: Callable[[K], str] | None = None,
) -> Iterator[tuple[K, R]]:
    """(key, `fn(shared, payload)`) for every (key, payload) item, in input order.

    Keys stay in this process; payloads go to the workers. `describe(key)` says where a batch came
    from (its rows, its file) when `fn` fails on it. With fewer than two items no pool is started:
    it would cost a process start for nothing.
    """
    workers = resolve_workers(workers)
    limit = 2 * workers if max_in_flight is None else max_in_flight
    if limit < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {limit}")
    it = iter(items)
    head = list(itertools.islice(it, 2))
    source = itertools.chain(head, it)
    if workers == 1 or len(head) < 2:
        del head
        for index, (key, payload) in enumerate(source):
            try:
                result = fn(shared, payload)
            except Exception as e:
                raise _failed(what, index, key, describe, e) from e
            yield key, result
        return
    del head
    yield from _pooled(fn, source, workers, limit, shared, what, describe)


def _pooled(
    fn: Callable[[S, P], R],
    source: Iterator[tuple[K, P]],
    workers: int,
    limit: int,
    shared: S,
    what: str,
    describe: Callable[[K], str] | None,
) -> Iterator[tuple[K, R]]:
    try:
        # Fails here, once and clearly, rather than as a pickling error on every batch.
        pickle.dumps(fn)
    except Exception as e:
        raise StageFailed(
            f"{what}: {fn!r} cannot be sent to a worker process ({e}); it must be a top-level "
            "function (this is a bug in albor; run with `workers: 1` meanwhile)"
        ) from e
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_install,
        initargs=(shared,),
    )
    pending: deque[tuple[int, K, Future[R]]] = deque()
    try:
        for index, (key, payload) in enumerate(source):
            try:
                future = pool.submit(_run, fn, payload)
            except (pickle.PicklingError, AttributeError, TypeError) as e:
                # Submitting starts a worker when one is missing, and so pickles `shared`.
                raise StageFailed(
                    f"{what}: cannot start a worker process: {e} (what a worker receives must "
                    "pickle: top-level functions, plain data; this is a bug in albor, run with "
                    "`workers: 1` meanwhile)"
                ) from e
            pending.append((index, key, future))
            # The pool holds the payload until a worker takes it; this frame need not.
            del payload
            if len(pending) >= limit:
                yield _collect(pending.popleft(), what, describe)
        while pending:
            yield _collect(pending.popleft(), what, describe)
    finally:
        # Also reached when the caller stops early or a batch failed: queued batches are
        # dropped, running ones (at most one per worker) finish, and no process is left behind.
        pool.shutdown(wait=True, cancel_futures=True)


def _collect(
    entry: tuple[int, K, Future[R]], what: str, describe: Callable[[K], str] | None
) -> tuple[K, R]:
    index, key, future = entry
    try:
        return key, future.result()
    except BrokenProcessPool as e:
        where = _where(index, key, describe)
        raise StageFailed(
            f"{what}: a worker process died while working on {where} (killed for memory, or a "
            "crash in native code): lower `workers` or `batch_rows`, or run with `workers: 1` "
            "to see the error in this process"
        ) from e
    except Exception as e:
        raise _failed(what, index, key, describe, e) from e


def _where(index: int, key: Any, describe: Callable[[Any], str] | None) -> str:
    shown = f"batch {index}"
    if describe is not None:
        shown += f" ({describe(key)})"
    return shown


def _failed(
    what: str, index: int, key: Any, describe: Callable[[Any], str] | None, e: Exception
) -> StageFailed:
    return StageFailed(f"{what}: {_where(index, key, describe)} failed: {type(e).__name__}: {e}")
