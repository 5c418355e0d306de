"""Helpers shared by the tests: real stdlib samples, corpus artifacts, the in-process CLI."""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from albor.artifact import atomic_write_json, describe_outputs, outputs_digest
from albor.data.corpus import CORPUS_FILE, CorpusWriter, document
from albor.stages import pretrain

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


def stdlib_texts(names: list[str]) -> list[tuple[str, str]]:
    """(name, source) of the stdlib modules `names`."""
    return [(name, (STDLIB / name).read_text(encoding="utf-8")) for name in names]


def mine_pairs(
    root: Path, texts: list[tuple[str, str]], val: float = 0.2, test: float = 0.1
) -> tuple[Path, Path]:
    """The split and pairs artifacts the real stages make of `texts` under `root`."""
    from albor.stage import load_stage, run_stage
    from albor.stages import pairs, split

    corpus = write_corpus_artifact(root / "corpus", texts)
    splits = run_stage(
        load_stage("split"), split.Config(input=corpus, output=root / "split", val=val, test=test)
    ).output
    found = run_stage(load_stage("pairs"), pairs.Config(input=splits, output=root / "pairs"))
    return splits, found.output


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    from albor.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return int(e.value.code or 0), captured.out, captured.err


def pretrain_config(data: Path, out: Path, **overrides: Any) -> pretrain.Config:
    """A pretrain config for the tiny preset that trains in seconds on `token_data`: the one
    place tests spell it; each test overrides what it is about."""
    from albor.stages import pretrain

    base: dict[str, Any] = dict(
        data=data,
        output=out,
        model="tiny",
        micro_batch=4,
        max_steps=30,
        warmup_steps=3,
        lr=3e-3,
        eval_every=10,
        eval_tokens=1024,
        checkpoint_every=10,
        log_every=5,
        seq_len=64,
    )
    return pretrain.Config.model_validate({**base, **overrides})


def crash_at_20_and_resume(stage: str, cfg: Any, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run training stage `stage` on `cfg`, crash it right after its step-20 checkpoint, run it
    again to the end: the resumed run's manifest metrics."""
    from albor.errors import StageFailed
    from albor.stage import load_stage, run_stage
    from albor.train import checkpoint

    real = checkpoint.save

    def crash_after_step_20(*args: Any, **kw: Any) -> Path:
        path = real(*args, **kw)
        if path.name == "step-0000020":
            raise StageFailed("simulated crash")
        return path

    monkeypatch.setattr(checkpoint, "save", crash_after_step_20)
    with pytest.raises(StageFailed, match="simulated crash"):
        run_stage(load_stage(stage), cfg)
    monkeypatch.setattr(checkpoint, "save", real)
    metrics: dict[str, Any] = run_stage(load_stage(stage), cfg).manifest["metrics"]
    return metrics


# ----- a stage applied by another process, killed and resumed --------------------------------


def apply_command(verb: str, cfg: Path) -> list[str]:
    """`python -m albor VERB apply CFG`, as a user runs it."""
    return [sys.executable, "-m", "albor", verb, "apply", str(cfg)]


def launch_apply(verb: str, cfg: Path) -> subprocess.Popen[str]:
    """`apply_command(verb, cfg)` in a child process, its output captured."""
    command = apply_command(verb, cfg)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str) -> None:
    """Poll `ready` until it holds; fail when `proc` ends first or after 120 s."""
    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} after 120 s"
        time.sleep(0.005)


def last_step(metrics: Path) -> int:
    """The newest step in a metrics file another process is writing (0 before the first)."""
    found = [0]
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            found += [int(n) for n in re.findall(r'^\{"step": (\d+), "loss"', line)]
    return max(found)
