"""decontaminate: exactly the documents that copy a benchmark are dropped, and the report says which
problem each one copied; a broken benchmark fails the plan with its file and line."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from albor.config import validate
from albor.errors import ConfigError, DataError, PlanFailed
from albor.evals import benchmarks as bench
from albor.stage import RunResult, run_stage
from albor.stages import decontaminate

# HumanEval/0's canonical solution, as another hand would write it: 2-space indents, blank lines,
# a different function name and signature, inside a module with other code.
EMBED = """\
import math


def close_pairs(numbers, threshold):

  for idx, elem in enumerate(numbers):

    for idx2, elem2 in enumerate(numbers):
      if idx != idx2:

        distance = abs(elem - elem2)
        if distance < threshold:
          return True
  return False


def area(r):
    return math.pi * r ** 2
"""
SNIPPET = "def show(n):\n    for i in range(n):\n        print(i)\n"


def config(inp: Path, out: Path, **knobs: Any) -> decontaminate.Config:
    data = {"input": str(inp), "output": str(out), **knobs}
    return validate(decontaminate.Config, data, "test.yaml")


def run(cfg: decontaminate.Config) -> RunResult:
    return run_stage(decontaminate, cfg)


def test_drops_exactly_the_embedded_solution(
    corpus_artifact: Callable[..., Path], stdlib_texts: list[tuple[str, str]], tmp_path: Path
) -> None:
    src = corpus_artifact([*stdlib_texts, ("embed.py", EMBED), ("snippet.py", SNIPPET)])
    out = tmp_path / "out"
    result = run(config(src, out))
    assert {p.name for p in out.iterdir()} == {
        "corpus.parquet",
        "rejected.parquet",
        "report.json",
        "manifest.json",
    }
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    assert len(rejected) == 1
    row = rejected[0]
    assert row["path"] == "embed.py" and row["reason"] == "contaminated"
    # HumanEval/20's solution walks pairs the same way, so it shares some n-grams too; the
    # problem the file copied leads with all of them.
    assert row["benchmarks"] == ["humaneval"]
    assert row["task_ids"] == ["HumanEval/0", "HumanEval/20"]
    assert row["bytes"] == len(EMBED.encode()) and len(row["sha256"]) == 64
    kept = pq.read_table(out / "corpus.parquet")["path"].to_pylist()
    assert sorted(kept) == sorted([name for name, _ in stdlib_texts] + ["snippet.py"])

    report = json.loads((out / "report.json").read_text())
    [dropped] = report["dropped"]
    assert dropped["path"] == "embed.py" and dropped["shared_ngrams"] == row["shared_ngrams"] > 0
    first, second = dropped["matches"]
    assert first == {"benchmark": "humaneval", "task_id": "HumanEval/0", "ngrams": 17}
    assert second["task_id"] == "HumanEval/20" and 0 < second["ngrams"] < first["ngrams"]
    assert row["shared_ngrams"] == 17
    he = report["benchmarks"]["humaneval"]
    assert he["problems"] == 164 and he["documents_dropped"] == 1
    assert he["fields"] == ["prompt", "canonical_solution"]

    c = result.manifest["counts"]
    assert c == {"in": 22, "kept": 21, "rejected": {"contaminated": 1}}
    m = result.manifest["metrics"]
    assert m["documents_dropped"] == {"humaneval": 1}
    assert m["ngrams_indexed"] == {"humaneval": he["ngrams_indexed"]} and he["ngrams_indexed"] > 0
    assert m["bytes_in"] == m["bytes_kept"] + row["bytes"]
    assert "1 contaminated (humaneval: 1)" in result.manifest["summary"]
    assert run(config(src, out)).status == "up to date"


def test_every_humaneval_solution_is_dropped_and_stdlib_kept(
    corpus_artifact: Callable[..., Path], stdlib_texts: list[tuple[str, str]], tmp_path: Path
) -> None:
    problems = bench.load(bench.BenchmarkConfig(name="humaneval")).problems
    solutions = [
        (f"sol_{i}.py", textwrap.indent(textwrap.dedent(p.texts["canonical_solution"]), "\t"))
        for i, p in enumerate(problems)
    ]
    src = corpus_artifact(stdlib_texts + solutions)
    out = tmp_path / "out"
    # `whole` indexes the 19 one-line solutions too, so every one of the 164 is caught.
    result = run(config(src, out, short_texts="whole"))
    report = json.loads((out / "report.json").read_text())
    found = {d["path"]: [m["task_id"] for m in d["matches"]] for d in report["dropped"]}
    assert set(found) == {path for path, _ in solutions}
    assert all(f"HumanEval/{path[4:-3]}" in ids for path, ids in found.items())
    assert result.manifest["counts"]["kept"] == len(stdlib_texts)
    assert report["benchmarks"]["humaneval"]["texts_under_ngram"] == 19


def test_custom_jsonl_benchmark_and_min_matches(
    corpus_artifact: Callable[..., Path], tmp_path: Path
) -> None:
    path = tmp_path / "mine.jsonl"
    rows = [
        {"id": "mine/1", "solution": "total = sum(v * v for v in values if v % 2 == 0)\n"},
        {"id": "mine/2", "solution": "print('nothing to see here at all today')\n"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    doc = "def even_squares(values):\n    total = sum(v*v for v in values if v%2==0)\n"
    src = corpus_artifact([("a.py", doc), ("b.py", SNIPPET)])
    spec = {"name": "mine", "path": str(path), "id_field": "id", "fields": ["solution"]}
    out = tmp_path / "out"
    result = run(config(src, out, benchmarks=[spec], ngram=5))
    [row] = pq.read_table(out / "rejected.parquet").to_pylist()
    assert row["path"] == "a.py" and row["benchmarks"] == ["mine"]
    assert row["task_ids"] == ["mine/1"] and row["shared_ngrams"] == 8
    assert result.manifest["metrics"]["documents_dropped"] == {"mine": 1}
    # Fewer shared n-grams than min_matches: kept.
    kept = run(config(src, tmp_path / "lenient", benchmarks=[spec], ngram=5, min_matches=9))
    assert kept.manifest["counts"] == {"in": 2, "kept": 2, "rejected": {"contaminated": 0}}
    # A changed benchmark file re-runs the stage.
    assert run(config(src, out, benchmarks=[spec], ngram=5)).status == "up to date"
    path.write_text(json.dumps(rows[1]) + "\n", encoding="utf-8")
    again = run(config(src, out, benchmarks=[spec], ngram=5))
    assert again.status == "ran" and again.manifest["counts"]["kept"] == 2


def test_plan_estimates_without_writing(
    corpus_artifact: Callable[..., Path], tmp_path: Path
) -> None:
    src = corpus_artifact()
    p = decontaminate.plan(config(src, tmp_path / "out"))
    assert p.ok, p.summary()
    assert p.estimates["documents_in"] == 20
    assert p.estimates["ngrams_indexed"]["humaneval"] > 10_000
    assert p.estimates["input_mb"] > 0 and p.estimates["disk_bytes"] > 0
    assert "wall_time_s" in p.estimates
    [check] = [c for c in p.checks if c.name == "benchmark humaneval"]
    assert "164 problems" in check.detail and "19 text(s) under 10 tokens skipped" in check.detail
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"nope\.jsonl: benchmark file not found; fix `path:` of benchmark 'bad'"),
        ('{"task_id": "a", "prompt": "x"}\nnot json\n', r"nope\.jsonl:2: not JSON"),
        ('{"task_id": "a", "question": "x"}\n', r"nope\.jsonl:1: no field 'prompt'"),
    ],
)
def test_bad_benchmark_fails_the_plan(
    corpus_artifact: Callable[..., Path], tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "nope.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    spec = {"name": "bad", "path": str(path), "fields": ["prompt"]}
    cfg = config(corpus_artifact(), tmp_path / "out", benchmarks=[spec])
    p = decontaminate.plan(cfg)
    assert not p.ok
    [failure] = p.failures
    assert failure.name == "benchmark bad"
    assert re.search(message, failure.detail), failure.detail
    with pytest.raises(PlanFailed, match=message):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_all_contaminated_is_an_error(corpus_artifact: Callable[..., Path], tmp_path: Path) -> None:
    src = corpus_artifact([("embed.py", EMBED)])
    with pytest.raises(DataError, match="every one of the 1 documents"):
        run(config(src, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'mbpp' is not built in"):
        config(tmp_path, tmp_path, benchmarks=[{"name": "mbpp"}])
    with pytest.raises(ConfigError, match=r"benchmarks\[0\]\.feilds: unknown key"):
        config(tmp_path, tmp_path, benchmarks=[{"name": "humaneval", "feilds": ["prompt"]}])
    with pytest.raises(ConfigError, match="name 'humaneval' is used twice"):
        config(tmp_path, tmp_path, benchmarks=[{"name": "humaneval"}, {"name": "humaneval"}])
    with pytest.raises(ConfigError, match="ngram"):
        config(tmp_path, tmp_path, ngram=0)
    with pytest.raises(ConfigError, match="short_texts"):
        config(tmp_path, tmp_path, short_texts="some")
    assert config(tmp_path, tmp_path, ngram="1e1").ngram == 10


def test_workers_change_nothing_in_the_output(
    corpus_artifact: Callable[..., Path], stdlib_texts: list[tuple[str, str]], tmp_path: Path
) -> None:
    texts = [*stdlib_texts[:8], ("embed.py", EMBED), *stdlib_texts[8:], ("snippet.py", SNIPPET)]
    src = corpus_artifact(texts)
    one, two = (
        run(config(src, tmp_path / f"w{w}", workers=w, batch_rows=3)).manifest for w in (1, 2)
    )
    for name in ("corpus.parquet", "rejected.parquet", "report.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert one["counts"] == two["counts"] == {"in": 22, "kept": 21, "rejected": {"contaminated": 1}}
    assert one["metrics"] == two["metrics"]
