"""Shared fixtures: small real corpora built in the test, so every test is hermetic."""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
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


@pytest.fixture
def stdlib_texts() -> list[tuple[str, str]]:
    return [(name, (STDLIB / name).read_text(encoding="utf-8")) for name in STDLIB_SAMPLE]


@pytest.fixture
def corpus_artifact(tmp_path: Path, stdlib_texts: list[tuple[str, str]]) -> Callable[..., Path]:
    def make(texts: list[tuple[str, str]] | None = None, name: str = "corpus") -> Path:
        return write_corpus_artifact(tmp_path / name, texts if texts is not None else stdlib_texts)

    return make


@pytest.fixture(scope="session")
def token_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenize artifact (512-token BPE) built by the real stages from the stdlib sample."""
    from albor.stage import load_stage, run_stage
    from albor.stages import split, tokenize, tokenizer

    root = tmp_path_factory.mktemp("token_data")
    texts = [(name, (STDLIB / name).read_text(encoding="utf-8")) for name in STDLIB_SAMPLE]
    corpus = write_corpus_artifact(root / "corpus", texts)
    splits = run_stage(
        load_stage("split"), split.Config(input=corpus, output=root / "split", val=0.2, test=0.1)
    ).output
    tok = run_stage(
        load_stage("tokenizer"),
        tokenizer.Config(input=splits, output=root / "tokenizer", vocab_size=512),
    ).output
    return run_stage(
        load_stage("tokenize"),
        tokenize.Config(corpus=splits, tokenizer=tok, output=root / "tokenize"),
    ).output
