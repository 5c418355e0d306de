"""parallel: results come back in input order, at most `max_in_flight` batches are read ahead, the
shared object reaches every worker once, a failure names its batch, and one worker (or one batch)
starts no pool."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from albor.data import parallel
from albor.data.corpus import iter_batches
from albor.errors import StageFailed
from albor.plan import Plan


def slow_square(x: int) -> int:
    """Earlier items take longer, so a pool finishes them out of order."""
    time.sleep(max(0, 5 - x) * 0.02)
    return x * x


def pid_of(_: int) -> int:
    return os.getpid()


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"cannot take {x}")
    return x


def die(_: int) -> int:
    os._exit(3)


def fail_on_three_shared(_: None, x: int) -> int:
    return fail_on_three(x)


def scaled(shared: dict[str, int], x: int) -> tuple[int, int]:
    return shared["factor"] * x, os.getpid()


def test_results_come_back_in_input_order() -> None:
    items = list(range(8))
    expected = [x * x for x in items]
    assert list(parallel.map_batches(slow_square, items)) == expected
    assert list(parallel.map_batches(slow_square, items, workers=2)) == expected
    assert list(parallel.map_batches(slow_square, iter(items), 2, max_in_flight=1)) == expected


@pytest.mark.parametrize(("workers", "max_in_flight"), [(1, None), (2, None), (2, 3)])
def test_reads_at_most_max_in_flight_ahead(workers: int, max_in_flight: int | None) -> None:
    pulled = 0

    def source() -> Iterator[int]:
        nonlocal pulled
        for x in range(12):
            pulled += 1
            yield x

    limit = max_in_flight or 2 * workers
    results = parallel.map_batches(slow_square, source(), workers, max_in_flight)
    for consumed, _ in enumerate(results, 1):
        # Batches read and not yet handed back, besides the one the caller holds.
        assert pulled - consumed < max(limit, 2)  # the first two are read to decide on a pool
    assert pulled == 12


def test_one_worker_or_one_batch_runs_inline() -> None:
    assert set(parallel.map_batches(pid_of, range(3))) == {os.getpid()}
    assert list(parallel.map_batches(pid_of, [0], workers=2)) == [os.getpid()]
    assert os.getpid() not in set(parallel.map_batches(pid_of, range(4), workers=2))


def test_shared_reaches_the_workers_and_keys_stay_here() -> None:
    lock = threading.Lock()  # cannot be pickled: proof that keys never leave this process
    items = [((lock, x), x) for x in range(6)]
    for workers in (1, 2):
        out = list(parallel.map_keyed(scaled, items, workers, shared={"factor": 3}))
        assert [key for key, _ in out] == [(lock, x) for x in range(6)]
        assert [value for _, (value, _) in out] == [3 * x for x in range(6)]
        pids = {pid for _, (_, pid) in out}
        assert (pids == {os.getpid()}) == (workers == 1)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_names_its_batch(workers: int) -> None:
    items = [(f"rows {4 * x}-{4 * x + 3}", x) for x in range(6)]
    found = parallel.map_keyed(
        fail_on_three_shared, items, workers, shared=None, what="demo", describe=str
    )
    with pytest.raises(
        StageFailed, match=r"^demo: batch 3 \(rows 12-15\) failed: ValueError: "
    ) as e:
        list(found)
    assert isinstance(e.value.__cause__, ValueError)  # chained, with the worker's traceback


def test_a_dead_worker_and_a_local_function_are_named() -> None:
    with pytest.raises(StageFailed, match="a worker process died while working on batch 0"):
        list(parallel.map_batches(die, range(3), workers=2, what="demo"))
    with pytest.raises(StageFailed, match="cannot start a worker process"):
        list(parallel.map_batches(lambda x: x, range(3), workers=2))
    with pytest.raises(StageFailed, match="cannot be sent to a worker process"):
        list(parallel.map_keyed(lambda _, x: x, [(0, 0), (1, 1)], 2, shared=None))


def test_workers_field_and_plan() -> None:
    class Cfg(BaseModel):
        workers: parallel.Workers = 1

    assert Cfg(workers="auto").workers == 0 and Cfg(workers="2").workers == 2
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Cfg(workers=-1)
    with pytest.raises(ValueError, match="not a number of processes"):
        Cfg(workers="many")
    assert parallel.resolve_workers(0) == parallel.cpu_count() >= 1
    assert parallel.resolve_workers(3) == 3
    p = Plan("demo")
    assert parallel.plan_workers(p, 1) == 1 and p.estimates["workers"] == 1 and not p.checks
    many = parallel.cpu_count() + 1
    assert parallel.plan_workers(p, many) == parallel.cpu_count()
    assert p.checks[-1].status == "warn" and "workers" in p.checks[-1].detail


def test_read_batches_stays_within_row_groups(tmp_path: Path) -> None:
    from albor.data.corpus import CORPUS_FILE, CorpusWriter, document

    path = tmp_path / CORPUS_FILE
    with CorpusWriter(path, batch_rows=5) as w:
        for i in range(12):
            w.write(document(f"x = {i}\n", f"{i}.py", "t"))
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    batches = list(iter_batches(path, ["path"], batch_rows=2))
    assert [b.num_rows for b in batches] == [2, 2, 1, 2, 2, 1, 2]
    joined = pa.Table.from_batches(batches)["path"].to_pylist()
    assert joined == [f"{i}.py" for i in range(12)]
