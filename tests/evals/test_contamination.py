"""The n-gram matcher and the benchmark loaders: formatting cannot hide an overlap, every HumanEval
solution is found, ordinary code is not, and a broken benchmark file is named with its line."""

from __future__ import annotations

import gzip
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from albor.errors import DataError
from albor.evals import benchmarks as bench
from albor.evals.contamination import (
    NgramIndex,
    build_index,
    check_benchmarks,
    gram_hashes,
    index_benchmarks,
    scan,
    token_hashes,
    tokens,
)


@pytest.fixture(scope="module")
def humaneval() -> bench.Benchmark:
    return bench.load(bench.BenchmarkConfig(name="humaneval"))


def reformat(code: str) -> str:
    """The same code as another hand would write it: 2-space indents, blank lines, CRLF."""
    out = []
    for line in textwrap.dedent(code).splitlines():
        stripped = line.lstrip(" ")
        depth = (len(line) - len(stripped)) // 4
        out += ["  " * depth + stripped, ""]
    return "\r\n".join(out)


def test_tokens_ignore_formatting_and_split_strings() -> None:
    a = 'def f(x):\n    """Add one\n    to x."""\n    return x+1\n'
    b = "def f( x ) :\n\n  '''Add one to x.'''\n\n\n  return x + 1  \n"
    assert tokens(a) == tokens(b) == ["def", "f", "x", "Add", "one", "to", "x", "return", "x", "1"]


def test_gram_hashes_are_the_polynomial_mod_2_64() -> None:
    toks = tokens("for idx, elem in enumerate(numbers): total += elem * 2")
    h = token_hashes(toks)
    p = 0x9E3779B97F4A7C15 | 3
    expected = []
    for i in range(len(toks) - 3 + 1):
        acc = 4  # the seed is k + 1
        for j in range(3):
            acc = (acc * p + int(h[i + j])) % 2**64
        expected.append(acc)
    assert gram_hashes(h, 3).tolist() == expected
    assert gram_hashes(h, len(toks) + 1).size == 0
    assert token_hashes(["numbers"]).tolist() == token_hashes(["numbers"]).tolist()


def test_humaneval_loads_all_problems(humaneval: bench.Benchmark) -> None:
    assert len(humaneval.problems) == 164
    assert humaneval.fields == ("prompt", "canonical_solution")
    assert [p.task_id for p in humaneval.problems] == [f"HumanEval/{i}" for i in range(164)]
    assert "def has_close_elements" in humaneval.problems[0].texts["prompt"]


def test_every_canonical_solution_is_found_and_stdlib_is_clean(
    humaneval: bench.Benchmark, stdlib_texts: list[tuple[str, str]]
) -> None:
    whole = build_index(humaneval.texts(), 10, short_texts="whole")
    skip = build_index(humaneval.texts(), 10)
    short = []
    for p in humaneval.problems:
        solution = reformat(p.texts["canonical_solution"])
        assert p.task_id in whole.match(solution).task_ids
        if len(tokens(solution)) < 10:
            short.append(p.task_id)
            assert skip.match(solution).shared == 0
        else:
            assert p.task_id in skip.match(solution).task_ids
        # The reference function as a whole is found in either mode, through its prompt.
        full = reformat(p.texts["prompt"] + p.texts["canonical_solution"])
        assert p.task_id in skip.match(full).task_ids
    # One-line solutions such as `return x + y`: the only texts under 10 tokens.
    assert len(short) == skip.stats["humaneval"].texts_short == 19
    assert "HumanEval/53" in short
    assert len(whole) > len(skip) > 10_000
    for name, text in stdlib_texts:
        assert whole.match(text).shared == 0, name
        assert skip.match(text).shared == 0, name


def test_counts_distinct_shared_ngrams_per_problem() -> None:
    index = NgramIndex(3)
    index.add("b", "t1", "alpha beta gamma delta")  # 2 trigrams
    index.add("b", "t2", "gamma delta epsilon")  # 1 new, "gamma delta" shared only as a bigram
    index.add("c", "u1", "alpha beta gamma")  # the same trigram as t1's first
    assert len(index) == 3
    assert index.ngrams_per_benchmark() == {"b": 3, "c": 1}
    hit = index.match("x = alpha(beta, gamma) + delta.epsilon; alpha beta gamma")
    assert hit.shared == 3
    assert hit.by_problem == {("b", "t1"): 2, ("b", "t2"): 1, ("c", "u1"): 1}
    assert next(iter(hit.by_problem)) == ("b", "t1")  # strongest first
    assert hit.benchmarks == ["b", "c"] and hit.task_ids == ["t1", "t2", "u1"]
    assert index.match("gamma delta").shared == 0


def test_number_runs_and_short_texts() -> None:
    index = NgramIndex(4)
    assert index.add("b", "nums", "[0, 1, 2, 3, 4, 5, 6]") == 0
    assert index.add("b", "short", "return x + y") == 0
    assert index.stats["b"].texts_short == 1 and len(index) == 0
    assert index.match("0 1 2 3 4 5 6").shared == 0
    whole = NgramIndex(4, short_texts="whole")
    assert whole.add("b", "short", "return x + y") == 1
    assert whole.match("def add(x, y):\n    return x+y\n").task_ids == ["short"]
    assert whole.match("return x - z").shared == 0
    assert whole.add("b", "digits", "1 2") == 0  # numbers only, even when indexed whole


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_benchmark(tmp_path: Path) -> None:
    rows = [
        {"id": 7, "text": "Sum the squares", "tests": ["assert f(2) == 4", "assert f(0) == 0"]},
        {"id": "b", "text": "Reverse a string", "tests": []},
    ]
    plain = write_jsonl(tmp_path / "mine.jsonl", rows)
    packed = tmp_path / "mine.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write(plain.read_text() + "\n\n")
    for path in (plain, packed):
        b = bench.load(
            bench.BenchmarkConfig(name="mine", path=path, id_field="id", fields=["text", "tests"])
        )
        assert [p.task_id for p in b.problems] == ["7", "b"]
        assert b.problems[0].texts["tests"] == "assert f(2) == 4\nassert f(0) == 0"
        assert next(iter(b.texts())) == ("mine", "7", "Sum the squares")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"task_id": "a", "prompt": "x"}\n{"task_id": "b", "prompt": \n',
            r"bad\.jsonl:2: not JSON",
        ),
        ('{"task_id": "a", "prompt": "x"}\n[1, 2]\n', r"bad\.jsonl:2: a JSON list, not an object"),
        (
            '{"task_id": "a", "text": "x"}\n',
            r"bad\.jsonl:1: no field 'prompt' \(keys: task_id, text\)",
        ),
        ('{"id": "a", "prompt": "x"}\n', r"bad\.jsonl:1: no 'task_id' \(keys: id, prompt\)"),
        ('{"task_id": 1, "prompt": "x"}\n\n{"task_id": "1", "prompt": "y"}\n', r":3: .*line 1"),
        ('{"task_id": "a", "prompt": 3}\n', r"bad\.jsonl:1: field 'prompt' is int, not text"),
        ("\n\n", r"bad\.jsonl: no problems"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        bench.load(bench.BenchmarkConfig(name="bad", path=path, fields=["prompt"]))


def test_missing_file_and_config_rules(tmp_path: Path) -> None:
    cfg = bench.BenchmarkConfig(name="gone", path=tmp_path / "gone.jsonl", fields=["prompt"])
    with pytest.raises(DataError, match=r"gone\.jsonl: benchmark file not found"):
        bench.load(cfg)
    assert bench.state(cfg) == "unreadable"
    with pytest.raises(ValidationError, match="'mbpp' is not built in"):
        bench.BenchmarkConfig(name="mbpp")
    with pytest.raises(ValidationError, match="`fields:` is required"):
        bench.BenchmarkConfig(name="mbpp", path=tmp_path / "m.jsonl")
    assert bench.BenchmarkConfig(name="humaneval", fields=["test"]).text_fields() == ("test",)


def test_index_arrays_are_uint64() -> None:
    index = build_index([("b", "t", "one two three four five")], 2)
    shared = index.shared("three four five six")
    assert shared.dtype == np.uint64 and len(shared) == 2


def test_index_check_and_scan_benchmark_files(tmp_path: Path) -> None:
    mine = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"task_id": "1", "prompt": "def spread_the_butter(knife, bread): return knife"},
            {"task_id": "2", "prompt": "return x + y"},  # under 5 tokens
        ],
    )
    short = write_jsonl(tmp_path / "short.jsonl", [{"task_id": "s", "prompt": "pass"}])
    specs = [
        bench.BenchmarkConfig(name="mine", path=mine, fields=["prompt"]),
        bench.BenchmarkConfig(name="gone", path=tmp_path / "gone.jsonl", fields=["prompt"]),
        bench.BenchmarkConfig(name="short", path=short, fields=["prompt"]),
    ]
    with pytest.raises(DataError, match=r"gone\.jsonl: benchmark file not found"):
        index_benchmarks(specs, 5)
    index, loaded, checks = check_benchmarks(specs, 5)
    assert list(loaded) == ["mine", "short"]
    # One check per benchmark, in the config's order; a benchmark nothing can match fails.
    assert [(name, ok) for name, ok, _ in checks] == [
        ("mine", True),
        ("gone", False),
        ("short", False),
    ]
    assert "2 problems" in checks[0][2] and "1 text(s) under 5 tokens skipped" in checks[0][2]
    assert "benchmark file not found" in checks[1][2]
    assert "lower `ngram` or set `short_texts: whole`" in checks[2][2]
    docs = [
        "x = 1",
        "def spread_the_butter(knife, bread):\n    return knife  # copied",
        "spread the butter with a knife and bread",  # the words, not the identifier
    ]
    found = scan(index.ready(), docs)
    assert [(offset, hit.task_ids) for offset, hit in found] == [(1, ["1"])]
    assert found[0][1].shared == 2  # 6 tokens (an identifier is one): 2 distinct 5-grams
    assert scan(index, docs, min_matches=3) == []
