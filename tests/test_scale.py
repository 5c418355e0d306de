"""Scale: clean -> dedup -> decontaminate -> split stream a corpus several times larger than the
memory they may use.

The corpus is the stdlib 14 times over (about 440 MB of text), each copy perturbed so that copies
are not near-duplicates of one another, with exact and near duplicates and HumanEval solutions
planted. It is written a batch at a time, then the stages run through `run_stage` in a subprocess
(the first three with two workers), which reports its peak RSS over its baseline after the
imports (VmHWM), the peak of each stage and that of its workers; each must stay under `CAP_MB`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from albor.artifact import atomic_write_json, describe_outputs, outputs_digest
from albor.data import sources
from albor.data.corpus import CORPUS_FILE, CorpusWriter, document
from albor.evals import benchmarks as bench

pytestmark = pytest.mark.slow

COPIES = 14
# Peak RSS growth allowed over a process that has imported the stages. The corpus is 2.7 times
# this, so a stage that held the corpus, or even the texts of a third of it, fails. What may
# grow: dedup's per-document state (a 2 KB signature per exact group, about 50 MB here), batches
# in flight, one row group being read and written, and the allocators' retained pages (which
# alone come to 60-90 MB, however long the corpus: measured 90, 142 and 100 MB for clean, dedup
# and decontaminate at 14 copies, and 90, 122 and 99 at 10).
CAP_MB = 160
BATCH_ROWS = 16
# The 28 larger stdlib modules (6 of its 31 MB) are left out: one document's scratch (its AST,
# its token list) is a per-document peak that clean's `max_bytes` bounds, not what this measures.
MAX_DOC_BYTES = 128 * 1024
EXACT_EVERY = 40  # every 40th document of a copy gets a whitespace-only variant...
NEAR_EVERY = 45  # ...every 45th an edited one...
SOLUTIONS_PER_COPY = 3  # ...and three documents per copy carry a HumanEval solution

CHILD = r"""
import json, multiprocessing, sys, threading, time
from pathlib import Path

from albor import progress
from albor.stage import run_stage
from albor.stages import clean, dedup, decontaminate, split


def high_water_mb(pid="self"):
    # VmHWM, not ru_maxrss: ru_maxrss keeps the peak of the image before exec, which for a
    # process started by fork (or vfork) + exec is its parent's RSS.
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def reset_high_water():
    # Each stage's own peak, not the pipeline's so far (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def watch(peak, stop):
    # A worker's high-water mark, read while it lives (it is gone once the pool shuts down).
    while not stop.wait(0.1):
        for child in multiprocessing.active_children():
            peak[0] = max(peak[0], high_water_mb(child.pid))


def main():
    src, out, workers, batch_rows = Path(sys.argv[1]), Path(sys.argv[2]), *map(int, sys.argv[3:5])
    progress.quiet()
    baseline = high_water_mb()
    workers_peak, stop = [0.0], threading.Event()
    watcher = threading.Thread(target=watch, args=(workers_peak, stop), daemon=True)
    watcher.start()
    counts, metrics, peaks, inp = {}, {}, {}, src
    steps = (
        (clean, {"plan_sample_rows": 256, "workers": workers}),
        (dedup, {"workers": workers}),
        (decontaminate, {"workers": workers}),
        (split, {}),
    )
    for module, extra in steps:
        reset_high_water()
        cfg = module.Config(input=inp, output=out / module.NAME, batch_rows=batch_rows, **extra)
        result = run_stage(module, cfg)
        counts[module.NAME] = result.manifest["counts"]
        metrics[module.NAME] = result.manifest["metrics"]
        peaks[module.NAME] = high_water_mb()
        inp = result.output
    stop.set()
    watcher.join()
    print(json.dumps({
        "baseline_mb": baseline,
        "peak_mb": max(peaks.values()),
        "stage_peak_mb": peaks,
        "workers_peak_mb": workers_peak[0],
        "counts": counts,
        "lsh": metrics["dedup"]["lsh"],
    }))


if __name__ == "__main__":
    main()
"""


def stdlib_texts() -> list[tuple[str, str]]:
    """(path, text) of every stdlib module up to `MAX_DOC_BYTES` that decodes as UTF-8."""
    found = []
    for entry in sources.file_entries(sources.StdlibSource()):
        if not entry.listable or Path(entry.path).stat().st_size > MAX_DOC_BYTES:
            continue
        try:
            found.append((entry.rel, Path(entry.path).read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return found


def perturbed(text: str, copy: int) -> str:
    """`text` with a comment naming its copy at the end of each line (continuation lines left
    alone): two new tokens per line put about 60% of a module's 5-token shingles out of reach of
    every other copy, so copies are far below dedup's 0.7 threshold but stay valid Python."""
    return text.replace("\\\n", "\x00").replace("\n", f"  # c{copy}\n").replace("\x00", "\\\n")


def edited(text: str) -> str:
    """`text` with every 40th non-blank line replaced: a near-duplicate."""
    lines = text.splitlines(keepends=True)
    return "".join(
        "x_changed = 1\n" if i % 40 == 20 and line.strip() else line for i, line in enumerate(lines)
    )


def documents(texts: list[tuple[str, str]], solutions: list[str]) -> Iterator[tuple[str, str, str]]:
    """(path, text, kind) of the synthetic corpus, one document at a time."""
    for copy in range(COPIES):
        for n, (path, text) in enumerate(texts):
            body = perturbed(text, copy)
            name = f"copy{copy}/{path}"
            if n < SOLUTIONS_PER_COPY:
                yield name, body + "\n\n" + solutions[copy * SOLUTIONS_PER_COPY + n], "solution"
                continue
            yield name, body, "original"
            if n % EXACT_EVERY == 0:
                yield f"respaced/{name}", "\n" + body.replace("\n", " \n") + "\n", "exact"
            elif n % NEAR_EVERY == 0 and text.count("\n") > 200:
                yield f"edited/{name}", edited(body), "near"


def write_corpus(directory: Path) -> dict[str, Any]:
    """A corpus artifact of the synthetic documents, written a batch at a time."""
    texts = stdlib_texts()
    problems = bench.load(bench.BenchmarkConfig(name="humaneval")).problems
    solutions = [p.texts["prompt"] + p.texts["canonical_solution"] for p in problems]
    kinds: dict[str, int] = {}
    directory.mkdir(parents=True)
    with CorpusWriter(directory / CORPUS_FILE, BATCH_ROWS) as w:
        for path, text, kind in documents(texts, solutions):
            w.write(document(text, path, "synthetic"))
            kinds[kind] = kinds.get(kind, 0) + 1
        rows, nbytes = w.rows, w.bytes
    outputs = describe_outputs(directory)
    atomic_write_json(
        directory / "manifest.json",
        {
            "stage": "ingest",
            "name": "ingest",
            "fingerprint": "scale",
            "digest": outputs_digest(outputs),
            "config": {},
            "inputs": [],
            "outputs": outputs,
            "counts": {"in": rows, "kept": rows, "rejected": {}},
            "metrics": {"bytes_kept": nbytes},
        },
    )
    return {"rows": rows, "bytes": nbytes, "kinds": kinds}


def test_stages_stream_a_corpus_larger_than_their_memory(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus")
    assert corpus["bytes"] > 2.5 * CAP_MB * 1e6, "the corpus must dwarf the cap to prove anything"
    # Arrow's default allocator, mimalloc, keeps freed pages for reuse: another 60-100 MB on top,
    # whatever the corpus's size, that would hide what the stages hold. The system allocator
    # returns them, as it does for any run started with this variable set.
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system"}
    argv = [str(tmp_path / "corpus"), str(tmp_path), "2", str(BATCH_ROWS)]
    child = subprocess.run(
        [sys.executable, "-c", CHILD, *argv],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    growth = report["peak_mb"] - report["baseline_mb"]
    shown = {"corpus_mb": round(corpus["bytes"] / 1e6), "cap_mb": CAP_MB, "growth_mb": growth}
    print(json.dumps({**shown, **report}))  # shown with -s: the margin left under the cap
    assert growth < CAP_MB, report
    # A worker imports no more than its parent, and holds a batch or two at a time.
    assert report["workers_peak_mb"] < report["baseline_mb"] + CAP_MB, report
    counts = report["counts"]
    assert counts["clean"]["in"] == corpus["rows"]
    removed = counts["dedup"]["rejected"]
    # Planted duplicates of documents that clean rejects go with them; most survive to dedup.
    assert removed["exact_duplicate"] >= 0.75 * corpus["kinds"]["exact"]
    assert removed["near_duplicate"] >= corpus["kinds"]["near"]
    # Copies of one module are not near-duplicates of each other: dedup keeps most documents.
    assert counts["dedup"]["kept"] >= 0.9 * counts["dedup"]["in"]
    assert counts["decontaminate"]["rejected"]["contaminated"] >= corpus["kinds"]["solution"]
    assert counts["split"]["in"] == counts["split"]["kept"] == counts["decontaminate"]["kept"]
