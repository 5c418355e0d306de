"""Benchmark contamination: an index of the n-grams of benchmark texts, and documents matched to it.

Tokens are the word runs of the text (`\\w+`: identifiers, keywords, numbers, and the words inside
strings and comments); whitespace, punctuation and operators are dropped. So re-indenting a
solution, adding blank lines, re-wrapping a docstring, switching quote style or adding trailing
commas cannot hide an overlap, and a string is never one opaque token (a re-indented docstring still
matches word for word). Keeping punctuation would make a 10-gram only about five words long: on
Python 3.11's stdlib, 10-grams with punctuation tie 135 of 1786 modules to HumanEval through
fragments such as `'a', 'b', 'c'`; word 10-grams tie 4. Matching is case-sensitive, as Python is.

Each n-gram is hashed to a 64-bit integer: every token gets a stable 64-bit hash (blake2b), and an
n-gram's hash is a polynomial in those (mod 2^64), computed for all positions of a document at once
with numpy. Hashes are stable across processes and machines, so counts and reports are reproducible.

Two rules keep the index to n-grams that are evidence of copying:
- an n-gram made only of numbers (`0 1 2 3 4 5 6 7 8 9`) is not indexed: number runs are common
  in any code and say nothing about a benchmark;
- a benchmark text with fewer than n tokens (`return x + y`) is `skip`ped by default: such a
  one-liner appears in ordinary code (that one alone ties 30 stdlib modules to HumanEval/53) and
  is no evidence of contamination. With `short_texts="whole"` its whole token sequence is indexed
  as one shorter n-gram instead, and documents are scanned for it too.

The `decontaminate` stage (which drops what matches) and `evaluate`'s contamination task (which
only reports it) both build their index with `index_benchmarks` (`check_benchmarks` in their
plans) and match documents with `scan`: the two cannot disagree on what "contaminated" means.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from albor.config import Int, StageConfig
from albor.errors import DataError
from albor.evals import benchmarks as bench
from albor.plan import Plan

ShortTexts = Literal["skip", "whole"]
# Below this, n-grams are short enough to tie ordinary code to a benchmark.
SHORT_NGRAM = 5
# The columns a stage's rejection report gives a text it dropped as contaminated.
CONTAMINATION_COLUMNS = (
    ("benchmarks", pa.list_(pa.string())),
    ("task_ids", pa.list_(pa.string())),
    ("shared_ngrams", pa.int64()),
)


class Decontamination(StageConfig):
    """The settings of a stage that drops texts sharing n-grams with benchmarks."""

    benchmarks: list[bench.BenchmarkConfig] = Field(
        default_factory=lambda: [bench.BenchmarkConfig(name=bench.HUMANEVAL)],
        min_length=1,
        description="Benchmarks to decontaminate against: {name: humaneval, fields: [...]} "
        "(built in) or {name: X, path: file.jsonl, id_field: task_id, fields: [...]}.",
    )
    ngram: Int = Field(default=10, ge=1, description="n-gram length, in code tokens.")
    min_matches: Int = Field(
        default=1,
        ge=1,
        description="Distinct benchmark n-grams a text must share to be dropped.",
    )
    short_texts: ShortTexts = Field(
        default="skip",
        description="Benchmark texts with fewer than `ngram` tokens: `skip` them (a one-liner "
        "such as `return x + y` appears in ordinary code), or index their `whole` token "
        "sequence as one shorter n-gram.",
    )

    def check_ngram(self, p: Plan, what: str) -> None:
        """The plan's word on the n-gram length: below 5 tokens, ordinary code matches."""
        p.warn_if(
            "ngram",
            self.ngram < SHORT_NGRAM,
            f"{self.ngram}-grams are short enough to match ordinary code: use {SHORT_NGRAM} or "
            "more",
            f"{self.ngram}-grams of code tokens, {self.min_matches} shared to drop a {what}",
        )

    @model_validator(mode="after")
    def _distinct_names(self) -> Decontamination:
        seen: set[str] = set()
        for i, b in enumerate(self.benchmarks):
            if b.name in seen:
                raise ValueError(
                    f"benchmarks[{i}]: name '{b.name}' is used twice; give each a distinct `name`"
                )
            seen.add(b.name)
        return self


_TOKEN = re.compile(r"\w+")
# Odd, and 3 mod 4, so that P - 1 has a single factor of two: two sequences that differ by a swap
# of adjacent tokens then collide only if their token hashes agree in 63 bits.
_P = np.uint64(0x9E3779B97F4A7C15 | 3)
_CACHE_LIMIT = 1 << 20
_token_cache: dict[str, int] = {}


def tokens(text: str) -> list[str]:
    """The code tokens of `text`: its word runs, in order (see the module docstring)."""
    return _TOKEN.findall(text)


def _token_hash(token: str) -> int:
    h = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
    if len(_token_cache) >= _CACHE_LIMIT:
        # A corpus's identifier vocabulary is open-ended; a full reset keeps memory bounded and
        # costs only re-hashing the common tokens once.
        _token_cache.clear()
    _token_cache[token] = h
    return h


def token_hashes(toks: list[str]) -> np.ndarray:
    """The stable 64-bit hash of every token, as a uint64 array."""
    cache = _token_cache
    return np.array([cache[t] if t in cache else _token_hash(t) for t in toks], dtype=np.uint64)


def gram_hashes(hashes: np.ndarray, k: int) -> np.ndarray:
    """The hash of every k-gram of a token-hash array (position i covers tokens i..i+k-1).

    The seed depends on k, so that sequences of different lengths hash independently; uint64
    arithmetic wraps, which is the mod 2^64.
    """
    m = len(hashes) - k + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.full(m, k + 1, dtype=np.uint64)
    for j in range(k):
        acc = acc * _P + hashes[j : j + m]
    return acc


def _has_word(toks: list[str], k: int) -> np.ndarray:
    """For each k-gram, whether it holds a token that is not a number."""
    word = np.fromiter((not t[0].isdigit() for t in toks), dtype=np.int64, count=len(toks))
    cs = np.concatenate([[0], np.cumsum(word)])
    return np.asarray((cs[k:] - cs[:-k]) > 0)


@dataclass
class BenchmarkStats:
    """What one benchmark put in the index."""

    problems: int = 0
    texts: int = 0
    texts_short: int = 0  # fewer tokens than n: skipped, or indexed whole
    ngrams: int = 0  # distinct n-grams (hashes) of this benchmark in the index


@dataclass
class Hit:
    """The benchmark n-grams one document shares: in all, and with each (benchmark, task id),
    strongest match first (similar problems share n-grams, so the best one leads)."""

    shared: int
    by_problem: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def benchmarks(self) -> list[str]:
        return list(dict.fromkeys(b for b, _ in self.by_problem))

    @property
    def task_ids(self) -> list[str]:
        return list(dict.fromkeys(t for _, t in self.by_problem))


class NgramIndex:
    """The distinct n-gram hashes of benchmark texts, each with the problems it came from."""

    def __init__(self, n: int, short_texts: ShortTexts = "skip") -> None:
        if n < 1:
            raise ValueError(f"n-gram length must be at least 1, got {n}")
        self.n = n
        self.short_texts = short_texts
        self.problems: list[tuple[str, str]] = []  # (benchmark, task id), by owner number
        self._problem_ids: dict[tuple[str, str], int] = {}
        self._owners: dict[int, set[int]] = {}
        self._lengths: set[int] = set()  # gram lengths present: n, and shorter ones indexed whole
        self._sorted: np.ndarray | None = None
        self.stats: dict[str, BenchmarkStats] = {}

    def add(self, benchmark: str, task_id: str, text: str) -> int:
        """Index the n-grams of one benchmark text; returns how many distinct ones it holds."""
        key = (benchmark, task_id)
        stats = self.stats.setdefault(benchmark, BenchmarkStats())
        owner = self._problem_ids.get(key)
        if owner is None:
            owner = self._problem_ids[key] = len(self.problems)
            self.problems.append(key)
            stats.problems += 1
        stats.texts += 1
        toks = tokens(text)
        k = self.n
        if len(toks) < self.n:
            stats.texts_short += 1
            if self.short_texts == "skip" or not toks:
                return 0
            k = len(toks)
        grams = set(gram_hashes(token_hashes(toks), k)[_has_word(toks, k)].tolist())
        if grams:
            self._lengths.add(k)
        for g in grams:
            owners = self._owners.setdefault(g, set())
            if not any(self.problems[o][0] == benchmark for o in owners):
                stats.ngrams += 1
            owners.add(owner)
        self._sorted = None
        return len(grams)

    def __len__(self) -> int:
        return len(self._owners)

    def ngrams_per_benchmark(self) -> dict[str, int]:
        """Distinct n-grams each benchmark holds (a gram two benchmarks share counts for both)."""
        return {name: s.ngrams for name, s in self.stats.items()}

    def ready(self) -> NgramIndex:
        """This index, sorted for matching now rather than on the first match, so that a copy
        sent to each worker process (it pickles, sorted array included) arrives ready."""
        self._array()
        return self

    def _array(self) -> np.ndarray:
        if self._sorted is None:
            self._sorted = np.sort(np.fromiter(self._owners, dtype=np.uint64, count=len(self)))
        return self._sorted

    def shared(self, text: str) -> np.ndarray:
        """The distinct index n-gram hashes that occur in `text`."""
        index = self._array()
        if not len(index):
            return index
        toks = tokens(text)
        if len(toks) < min(self._lengths):
            return np.empty(0, dtype=np.uint64)
        hashes = token_hashes(toks)
        grams = np.concatenate([gram_hashes(hashes, k) for k in sorted(self._lengths)])
        pos = np.minimum(np.searchsorted(index, grams), len(index) - 1)
        return np.unique(grams[index[pos] == grams])

    def match(self, text: str) -> Hit:
        """What `text` shares with the index, per benchmark problem."""
        found = self.shared(text)
        by_problem: dict[tuple[str, str], int] = {}
        for g in found.tolist():
            for o in self._owners[g]:
                key = self.problems[o]
                by_problem[key] = by_problem.get(key, 0) + 1
        ranked = sorted(by_problem.items(), key=lambda item: (-item[1], item[0]))
        return Hit(shared=len(found), by_problem=dict(ranked))


def build_index(
    texts: Iterable[tuple[str, str, str]], n: int, short_texts: ShortTexts = "skip"
) -> NgramIndex:
    """An index of (benchmark, task id, text) triples."""
    index = NgramIndex(n, short_texts)
    for benchmark, task_id, text in texts:
        index.add(benchmark, task_id, text)
    return index


def index_benchmarks(
    specs: Sequence[bench.BenchmarkConfig], n: int, short_texts: ShortTexts = "skip"
) -> tuple[NgramIndex, dict[str, bench.Benchmark]]:
    """Load every benchmark (DataError naming file, line and fix) and index the n-grams of its
    texts; (index, benchmarks by name)."""
    return _index(specs, n, short_texts, None)


def check_benchmarks(
    specs: Sequence[bench.BenchmarkConfig], n: int, short_texts: ShortTexts = "skip"
) -> tuple[NgramIndex, dict[str, bench.Benchmark], list[tuple[str, bool, str]]]:
    """`index_benchmarks` for a plan: a benchmark that cannot be read is left out instead of
    raising, and every benchmark gets a (name, ok, detail) check, in order, so that the plan
    reports every problem at once. Not ok too: a benchmark none of whose texts reaches `n`
    tokens, since nothing could ever match it."""
    errors: dict[str, str] = {}
    index, loaded = _index(specs, n, short_texts, errors)
    checks = []
    for spec in specs:
        b = loaded.get(spec.name)
        if b is None:
            checks.append((spec.name, False, errors[spec.name]))
            continue
        stats = index.stats[b.name]
        detail = (
            f"{b.path.name}: {stats.problems} problems, fields {', '.join(b.fields)}, "
            f"{stats.ngrams} {n}-grams indexed"
        )
        if stats.ngrams == 0:
            detail += (
                f": every text is shorter than {n} tokens; lower `ngram` or set "
                "`short_texts: whole`"
            )
        elif stats.texts_short:
            verb = "skipped" if short_texts == "skip" else "indexed whole"
            detail += f"; {stats.texts_short} text(s) under {n} tokens {verb}"
        checks.append((spec.name, stats.ngrams > 0, detail))
    return index, loaded, checks


def _index(
    specs: Sequence[bench.BenchmarkConfig],
    n: int,
    short_texts: ShortTexts,
    errors: dict[str, str] | None,
) -> tuple[NgramIndex, dict[str, bench.Benchmark]]:
    index = NgramIndex(n, short_texts)
    loaded: dict[str, bench.Benchmark] = {}
    for spec in specs:
        try:
            b = bench.load(spec)
        except DataError as e:
            if errors is None:
                raise
            errors[spec.name] = str(e)
            continue
        for name, task_id, text in b.texts():
            index.add(name, task_id, text)
        loaded[spec.name] = b
    return index, loaded


def scan(index: NgramIndex, texts: Iterable[str], min_matches: int = 1) -> list[tuple[int, Hit]]:
    """The documents among `texts` sharing at least `min_matches` distinct benchmark n-grams, as
    (position in `texts`, what they share)."""
    found: list[tuple[int, Hit]] = []
    for offset, text in enumerate(texts):
        hit = index.match(text)
        if hit.shared and hit.shared >= min_matches:
            found.append((offset, hit))
    return found
