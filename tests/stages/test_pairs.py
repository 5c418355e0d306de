"""pairs: docstring -> body pairs keep the split of their file, every candidate is counted (kept or
rejected by reason), bad JSONL lines are listed with their line numbers, and a planted HumanEval
solution is dropped as contaminated."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from albor.config import validate
from albor.data import pairs as mining
from albor.data.corpus import draw_split
from albor.errors import ConfigError, DataError, PlanFailed
from albor.evals import benchmarks as bench
from albor.stage import RunResult, load_stage, run_stage
from albor.stages import pairs, split

FILES = {"train.parquet", "val.parquet", "test.parquet", "rejected.parquet", "manifest.json"}
DOCUMENTED = '''\
def scale(values, k):
    """Multiply every value by k."""
    return [v * k for v in values]


def untold(x):
    return x
'''


def config(inp: Path, out: Path, **knobs: Any) -> pairs.Config:
    return validate(pairs.Config, {"input": str(inp), "output": str(out), **knobs}, "test.yaml")


def split_of(corpus: Path, out: Path, **knobs: Any) -> Path:
    cfg = split.Config(input=corpus, output=out, **knobs)
    return run_stage(load_stage("split"), cfg).output


def rows(out: Path, name: str) -> list[dict[str, Any]]:
    return pq.read_table(out / name).to_pylist()


def all_pairs(out: Path) -> list[dict[str, Any]]:
    return [r for s in ("train", "val", "test") for r in rows(out, f"{s}.parquet")]


def check_counts(result: RunResult) -> None:
    c, m = result.manifest["counts"], result.manifest["metrics"]
    assert c["in"] == c["kept"] + sum(c["rejected"].values())
    assert c["in"] == m["functions"] + m["unparsable_files"] + m["jsonl_records"]
    assert c["kept"] == sum(m["pairs"].values())


def test_stdlib_pairs_keep_the_split_of_their_file(
    corpus_artifact: Callable[..., Path], stdlib_texts: list[tuple[str, str]], tmp_path: Path
) -> None:
    splits = split_of(corpus_artifact(), tmp_path / "split", val=0.2, test=0.2)
    out = tmp_path / "pairs"
    result = run_stage(load_stage("pairs"), config(splits, out))
    assert {p.name for p in out.iterdir()} == FILES
    check_counts(result)
    m = result.manifest["metrics"]
    assert all(n > 0 for n in m["pairs"].values()), m["pairs"]
    assert sum(m["files"].values()) == len(stdlib_texts) and m["unparsable_files"] == 0

    file_split = {
        path: s
        for s in ("train", "val", "test")
        for path in pq.read_table(splits / f"{s}.parquet")["path"].to_pylist()
    }
    sources = dict(stdlib_texts)
    found = all_pairs(out)
    assert len(found) == result.manifest["counts"]["kept"]
    seen_in: dict[str, set[str]] = {}
    for r in found:
        seen_in.setdefault(r["path"], set()).add(r["split"])
        assert r["split"] == file_split[r["path"]]
        assert r["prompt"] + r["completion"] in sources[r["path"]]
        assert r["completion"].strip() and r["completion"].endswith("\n")
        assert r["sha256"] == mining.pair_sha256(r["prompt"], r["completion"])
        assert r["meta"] is None
    assert all(len(s) == 1 for s in seen_in.values())  # no file gives pairs to two splits
    assert len({r["sha256"] for r in found}) == len(found)
    names = {(r["path"], r["name"]) for r in found}
    assert ("textwrap.py", "TextWrapper.wrap") in names
    assert ("heapq.py", "merge") in names
    rejected = result.manifest["counts"]["rejected"]
    assert rejected["no_docstring"] > 0 and rejected.get("contaminated", 0) == 0
    assert run_stage(load_stage("pairs"), config(splits, out)).status == "up to date"


def test_jsonl_bad_lines_are_counted_by_reason(
    corpus_artifact: Callable[..., Path], tmp_path: Path
) -> None:
    splits = split_of(corpus_artifact([("doc.py", DOCUMENTED)]), tmp_path / "s", val=0, test=0)
    jsonl = tmp_path / "extra.jsonl"
    good = [
        {"prompt": f"def f{i}(x):\n    '''Add {i}.'''\n", "completion": f"    return x + {i}\n"}
        for i in range(40)
    ]
    good[0]["source"] = "hand-written"
    lines = [json.dumps(g).encode() for g in good[:20]]
    lines += [
        b"not json at all",
        b'["a", "list"]',
        b'{"prompt": "p"}',
        b'{"prompt": "p", "completion": 7}',
        b'{"prompt": "", "completion": "c"}',
        b"",
        b'{"prompt": "\xff", "completion": "c"}',
        json.dumps(good[1]).encode(),  # a repeat
    ]
    lines += [json.dumps(g).encode() for g in good[20:]]
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    result = run_stage(pairs, config(splits, out, jsonl=[str(jsonl)], val=0.25, test=0.25))
    check_counts(result)
    c = result.manifest["counts"]
    assert c["rejected"] == {
        "jsonl_not_json": 1,
        "jsonl_not_object": 1,
        "jsonl_missing_key": 1,
        "jsonl_not_text": 1,
        "jsonl_empty": 1,
        "jsonl_not_utf8": 1,
        "duplicate": 1,
        "no_docstring": 1,
    }
    assert result.manifest["metrics"]["jsonl_records"] == 47  # the blank line holds no record
    assert c["kept"] == 41
    bad = {r["reason"]: r for r in rows(out, "rejected.parquet")}
    assert bad["jsonl_not_json"]["lineno"] == 21 and bad["jsonl_not_utf8"]["lineno"] == 27
    assert bad["jsonl_missing_key"]["path"] == str(jsonl)
    assert "no 'completion'" in bad["jsonl_missing_key"]["detail"]
    assert bad["duplicate"]["lineno"] == 28 and bad["duplicate"]["split"] is not None
    found = all_pairs(out)
    records = [r for r in found if r["path"] == str(jsonl)]
    assert {r["split"] for r in records} == {"train", "val", "test"}
    # A record's split is a draw from its prompt: the same whatever else the file holds.
    for r in records:
        key = hashlib.sha256(r["prompt"].encode()).hexdigest()
        assert r["split"] == draw_split(key, "albor", 0.25, 0.25)
    [meta] = [r["meta"] for r in records if r["meta"] is not None]
    assert json.loads(meta) == {"source": "hand-written"}
    [mined] = [r for r in found if r["path"] == "doc.py"]
    assert mined["name"] == "scale" and mined["split"] == "train" and mined["lineno"] == 1
    # A changed JSONL file re-runs the stage.
    jsonl.write_bytes(json.dumps(good[0]).encode() + b"\n")
    again = run_stage(pairs, config(splits, out, jsonl=[str(jsonl)], val=0.25, test=0.25))
    assert again.status == "ran" and again.manifest["counts"]["kept"] == 2


def test_planted_humaneval_solution_is_contaminated(
    corpus_artifact: Callable[..., Path], tmp_path: Path
) -> None:
    [problem] = bench.load(bench.BenchmarkConfig(name="humaneval")).problems[:1]
    planted = problem.texts["prompt"] + problem.texts["canonical_solution"]
    docs = [
        ("planted.py", planted),
        ("doc.py", DOCUMENTED),
        ("copy.py", "import os\n\n\n" + DOCUMENTED),
        ("broken.py", "def f(:\n    pass\n"),
    ]
    splits = split_of(corpus_artifact(docs), tmp_path / "s", val=0, test=0)
    out = tmp_path / "out"
    result = run_stage(pairs, config(splits, out))
    check_counts(result)
    assert result.manifest["counts"]["rejected"] == {
        "contaminated": 1,
        "duplicate": 1,
        "no_docstring": 2,
        "unparsable_file": 1,
    }
    by_reason = {r["reason"]: r for r in rows(out, "rejected.parquet")}
    hit = by_reason["contaminated"]
    assert hit["path"] == "planted.py" and hit["name"] == "has_close_elements"
    assert hit["benchmarks"] == ["humaneval"] and hit["task_ids"][0] == problem.task_id
    assert hit["shared_ngrams"] > 0
    assert by_reason["unparsable_file"]["path"] == "broken.py"
    assert "SyntaxError" in by_reason["unparsable_file"]["detail"]
    assert by_reason["duplicate"]["path"] == "copy.py"
    assert [r["path"] for r in all_pairs(out)] == ["doc.py"]
    assert result.manifest["metrics"]["pairs_contaminated"] == {"humaneval": 1}
    # The plan does not decontaminate: a corpus of benchmark copies alone fails at apply.
    alone = split_of(corpus_artifact([docs[0]], name="alone"), tmp_path / "s2", val=0, test=0)
    with pytest.raises(DataError, match=r"none of 1 candidates .*'contaminated': 1"):
        run_stage(pairs, config(alone, tmp_path / "o2"))


def test_limits_reject_by_reason(corpus_artifact: Callable[..., Path], tmp_path: Path) -> None:
    long_body = "def big():\n    '''Big.'''\n" + "    x = 1\n" * 50
    docs = [("doc.py", DOCUMENTED), ("big.py", long_body)]
    splits = split_of(corpus_artifact(docs), tmp_path / "s", val=0, test=0)
    result = run_stage(pairs, config(splits, tmp_path / "out", max_completion_chars=200))
    assert result.manifest["counts"]["rejected"]["completion_too_long"] == 1
    short = run_stage(pairs, config(splits, tmp_path / "o2", min_completion_lines=2))
    assert short.manifest["counts"]["rejected"]["completion_too_short"] == 1
    # The plan mines the (small) corpus: limits no pair fits fail before apply writes anything.
    with pytest.raises(PlanFailed, match="2 pairs in 2 documents, none within the limits"):
        run_stage(pairs, config(splits, tmp_path / "o3", max_prompt_chars=5))
    assert not (tmp_path / "o3").exists()


def test_plan_fails_on_a_corpus_without_documented_functions(
    corpus_artifact: Callable[..., Path], tmp_path: Path
) -> None:
    docs = [
        ("a.py", "def f(x):\n    return x\n"),
        ("b.py", 'class A:\n    """A class docstring gives no pair."""\n    x = 1\n'),
        ("c.py", 'def g():\n    """Stub."""\n    ...\n'),
    ]
    splits = split_of(corpus_artifact(docs), tmp_path / "s", val=0, test=0)
    p = pairs.plan(config(splits, tmp_path / "out"))
    [failure] = p.failures
    assert failure.name == "pairs" and str(splits) in failure.detail
    assert "none with a docstring and a body" in failure.detail
    assert "no_docstring 1, stub_body 1" in failure.detail and "point `input:` at" in failure.detail
    # JSONL records may still give pairs: then it is a warning, and apply decides.
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"prompt": "def f():\n", "completion": "    return 1\n"}))
    assert pairs.plan(config(splits, tmp_path / "out", jsonl=[str(records)])).ok


def test_plan_checks_without_writing(corpus_artifact: Callable[..., Path], tmp_path: Path) -> None:
    corpus = corpus_artifact()
    splits = split_of(corpus, tmp_path / "split", val=0.2, test=0.2)
    p = pairs.plan(config(splits, tmp_path / "out"))
    assert p.ok, p.summary()
    assert sum(p.estimates["documents"].values()) == 20
    assert p.estimates["pair_text_mb"] > 0 and p.estimates["ngrams_indexed"]["humaneval"] > 0
    assert not (tmp_path / "out").exists()
    # A corpus is not a split artifact: the failure names the path and the fix.
    wrong = pairs.plan(config(corpus, tmp_path / "out"))
    [failure] = wrong.failures
    assert failure.name == "input" and str(corpus) in failure.detail
    assert "point it at the output of split" in failure.detail
    missing = tmp_path / "missing.jsonl"
    bad = pairs.plan(config(splits, tmp_path / "out", jsonl=[str(missing)]))
    [failure] = bad.failures
    assert failure.name == "jsonl[0]" and f"{missing}: JSONL file not found" in failure.detail
    with pytest.raises(PlanFailed, match="JSONL file not found"):
        run_stage(pairs, config(splits, tmp_path / "out", jsonl=[str(missing)]))
    assert not (tmp_path / "out").exists()


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="val"):
        config(tmp_path, tmp_path, val=0.6, test=0.5)
    with pytest.raises(ConfigError, match="max_prompt_chars"):
        config(tmp_path, tmp_path, max_prompt_chars=0)
    assert config(tmp_path, tmp_path, max_completion_chars="8K").max_completion_chars == 8192
