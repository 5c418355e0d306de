"""Helpers shared by the tests: real stdlib samples, corpus artifacts, the in-process CLI."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from albor.artifact import atomic_write_json, describe_outputs, outputs_digest
from albor.data.corpus import CORPUS_FILE, CorpusWriter, document

STDLIB = Path(sysconfig.get_paths()["stdlib"])

# A handful of real stdlib modules: small, valid Python, varied.
STDLIB_SAMPLE = [
    "bisect.py",
    "colorsys.py",
    "keyword.py",
    "heapq.py",
    "fnmatch.py",
    "glob.py",
    "shlex.py",
    "textwrap.py",
    "string.py",
    "copy.py",
    "abc.py",
    "numbers.py",
    "queue.py",
    "sched.py",
    "this.py",
    "token.py",
    "stat.py",
    "graphlib.py",
    "contextvars.py",
    "reprlib.py",
]


def write_corpus_artifact(
    directory: Path, texts: list[tuple[str, str]], stage: str = "ingest"
) -> Path:
    """An artifact dir holding corpus.parquet of (path, text) rows + manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    with CorpusWriter(directory / CORPUS_FILE) as w:
        for path, text in texts:
            w.write(document(text, path, "test"))
    outputs = describe_outputs(directory)
    n = len(texts)
    atomic_write_json(
        directory / "manifest.json",
        {
            "stage": stage,
            "name": stage,
            "fingerprint": "test",
            "digest": outputs_digest(outputs),
            "config": {},
            "inputs": [],
            "outputs": outputs,
            "counts": {"in": n, "kept": n, "rejected": {}},
            "metrics": {},
        },
    )
    return directory


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from albor.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(e.value.code or 0), captured.out, captured.err
