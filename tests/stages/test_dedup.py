"""dedup: exact and near duplicates collapse to one order-independent survivor; all is counted."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasketch import LeanMinHash, MinHashLSH

from albor.config import validate
from albor.data import minhash
from albor.errors import ConfigError, PlanFailed
from albor.stage import RunResult, run_stage
from albor.stages import dedup

Texts = list[tuple[str, str]]


def config(inp: Path, out: Path, **knobs: Any) -> dedup.Config:
    return validate(dedup.Config, {"input": str(inp), "output": str(out), **knobs}, "test.yaml")


def run(cfg: dedup.Config) -> RunResult:
    return run_stage(dedup, cfg)


def respaced(text: str) -> str:
    """The same code with more whitespace: wider assignments, trailing spaces, blank lines."""
    return "\n" + text.replace(" = ", "  =  ").replace("\n", " \t\n\n") + "\n\n"


def edited(text: str) -> str:
    """`text` with a few lines (every 40th non-blank one) replaced: a near-duplicate."""
    lines = text.splitlines(keepends=True)
    return "".join(
        "x_changed = 1\n" if i % 40 == 20 and line.strip() else line for i, line in enumerate(lines)
    )


@pytest.fixture
def dupes(stdlib_texts: Texts) -> Texts:
    """The conftest's stdlib sample, a whitespace variant of heapq.py and an edited fnmatch.py."""
    texts = dict(stdlib_texts)
    return [
        *stdlib_texts,
        ("respaced/heapq.py", respaced(texts["heapq.py"])),
        ("edited/fnmatch.py", edited(texts["fnmatch.py"])),
    ]


def outputs(out: Path) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """(paths of the survivors in order, {removed path: (reason, kept path)})."""
    kept = pq.read_table(out / "corpus.parquet")["path"].to_pylist()
    rejected = pq.read_table(out / "rejected.parquet").to_pylist()
    return kept, {r["path"]: (r["reason"], r["kept_path"]) for r in rejected}


def test_exact_and_near_duplicates_collapse(
    corpus_artifact: Callable[..., Path], dupes: Texts, tmp_path: Path
) -> None:
    original, changed = dict(dupes)["fnmatch.py"], dict(dupes)["edited/fnmatch.py"]
    # The premise: a near-duplicate above 0.7 and clearly below 0.99.
    assert (
        0.8 < minhash.Signer().minhash(original).jaccard(minhash.Signer().minhash(changed)) < 0.98
    )
    out = tmp_path / "out"
    result = run(config(corpus_artifact(dupes), out))
    assert {p.name for p in out.iterdir()} == {
        "corpus.parquet",
        "rejected.parquet",
        "report.json",
        "manifest.json",
    }
    kept, removed = outputs(out)
    # Survivor rule: the longest document; the whitespace variant has more bytes.
    assert removed == {
        "heapq.py": ("exact_duplicate", "respaced/heapq.py"),
        "edited/fnmatch.py": ("near_duplicate", "fnmatch.py"),
    }
    # Every unrelated stdlib file survives, in input order.
    assert kept == [p for p, _ in dupes if p not in removed]
    rows = pq.read_table(out / "rejected.parquet").to_pylist()
    sizes = {p: len(t.encode()) for p, t in dupes}
    assert all(r["bytes"] == sizes[r["path"]] and len(r["sha256"]) == 64 for r in rows)
    c = result.manifest["counts"]
    assert c == {"in": 22, "kept": 20, "rejected": {"exact_duplicate": 1, "near_duplicate": 1}}
    assert c["in"] == c["kept"] + sum(c["rejected"].values()) == len(kept) + len(rows)
    m = result.manifest["metrics"]
    assert m["clusters"] == 2 and m["duplicates_removed"] == 2
    assert m["bytes_removed"] == sizes["heapq.py"] + sizes["edited/fnmatch.py"]
    assert m["bytes_in"] == m["bytes_kept"] + m["bytes_removed"]
    report = json.loads((out / "report.json").read_text())
    assert report["clusters"]["count"] == 2
    assert report["clusters"]["size_histogram"] == {"2": 2}
    pairs = {p["removed_path"]: p for p in report["removed_pairs"]}
    assert pairs["heapq.py"]["jaccard"] == 1.0
    assert 0.7 <= pairs["edited/fnmatch.py"]["jaccard"] < 1.0
    assert pairs["edited/fnmatch.py"]["kept_path"] == "fnmatch.py"
    assert run(config(corpus_artifact(dupes), out)).status == "up to date"


def test_threshold_and_modes_decide_what_is_removed(
    corpus_artifact: Callable[..., Path], dupes: Texts, tmp_path: Path
) -> None:
    src = corpus_artifact(dupes)
    _, removed = outputs(run(config(src, tmp_path / "strict", threshold=0.99)).output)
    assert removed == {"heapq.py": ("exact_duplicate", "respaced/heapq.py")}
    _, removed = outputs(run(config(src, tmp_path / "exact", near=False)).output)
    assert removed == {"heapq.py": ("exact_duplicate", "respaced/heapq.py")}
    # Near alone still removes the whitespace variant: its shingles are the same (similarity 1).
    _, removed = outputs(run(config(src, tmp_path / "near", exact=False)).output)
    assert removed == {
        "heapq.py": ("near_duplicate", "respaced/heapq.py"),
        "edited/fnmatch.py": ("near_duplicate", "fnmatch.py"),
    }
    result = run(config(src, tmp_path / "none", exact=False, near=False))
    assert result.manifest["counts"] == {"in": 22, "kept": 22, "rejected": {}}
    assert any(c.status == "warn" and c.name == "modes" for c in result.plan.checks)


def test_survivors_do_not_depend_on_input_order(
    corpus_artifact: Callable[..., Path], dupes: Texts, stdlib_texts: Texts, tmp_path: Path
) -> None:
    # More copies of heapq.py, an exact copy of bisect.py (same bytes and sha256: the path decides)
    # and a cluster of three around textwrap.py: its survivors must come out the same whatever
    # order the rows arrive in.
    texts = dict(stdlib_texts)
    corpus = [
        *dupes,
        ("copy/heapq.py", texts["heapq.py"]),
        ("copy2/heapq.py", texts["heapq.py"]),
        ("a/bisect.py", texts["bisect.py"]),
        ("edited/textwrap.py", edited(texts["textwrap.py"])),
        ("longer/textwrap.py", texts["textwrap.py"] + "\n# One more comment makes this longest.\n"),
    ]
    results = []
    for seed in range(3):
        shuffled = list(corpus)
        random.Random(seed).shuffle(shuffled)
        out = tmp_path / f"out{seed}"
        run(config(corpus_artifact(shuffled, name=f"corpus{seed}"), out))
        kept, removed = outputs(out)
        assert kept == [p for p, _ in shuffled if p not in removed]  # input order
        report = json.loads((out / "report.json").read_text())
        results.append((set(kept), removed, report["clusters"], report["removed_pairs"]))
    assert results[0] == results[1] == results[2]
    _, removed, _, _ = results[0]
    assert removed["copy/heapq.py"] == ("exact_duplicate", "respaced/heapq.py")
    assert removed["copy2/heapq.py"] == ("exact_duplicate", "respaced/heapq.py")
    assert removed["bisect.py"] == ("exact_duplicate", "a/bisect.py")
    assert {p for p, (_, k) in removed.items() if k == "longer/textwrap.py"} == {
        "textwrap.py",
        "edited/textwrap.py",
    }


def test_plan_is_pure_and_estimates(
    corpus_artifact: Callable[..., Path], dupes: Texts, tmp_path: Path
) -> None:
    src = corpus_artifact(dupes)
    p = dedup.plan(config(src, tmp_path / "out"))
    assert p.ok
    e = p.estimates
    assert e["documents"] == 22
    assert e["lsh"]["bands"] == 25 and e["lsh"]["rows"] == 10
    assert e["wall_time_s"] >= 0 and e["disk_bytes"] > 0 and e["memory_bytes"] > 22 * 256 * 8
    assert e["input_mb"] == pytest.approx(sum(len(t.encode()) for _, t in dupes) / 1e6, abs=0.01)
    assert not (tmp_path / "out").exists()
    # Near 1, two long bands miss some pairs above the threshold: said, not refused.
    weak = dedup.plan(config(src, tmp_path / "out", threshold=0.99))
    assert weak.ok and any(c.name == "lsh recall" and c.status == "warn" for c in weak.checks)
    assert "lsh" not in dedup.plan(config(src, tmp_path / "out", near=False)).estimates


def test_missing_input_fails_the_plan(tmp_path: Path) -> None:
    cfg = config(tmp_path / "nope", tmp_path / "out")
    p = dedup.plan(cfg)
    assert not p.ok and "not found" in p.failures[0].detail
    with pytest.raises(PlanFailed):
        run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"threshold": 0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"num_perm": 8}, "num_perm"),
        ({"num_perm": "4K"}, "num_perm"),
        ({"shingle_size": 0}, "shingle_size"),
        ({"treshold": 0.8}, "did you mean 'threshold'"),
    ],
)
def test_config_validation(tmp_path: Path, knobs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(tmp_path, tmp_path, **knobs)
    assert config(tmp_path, tmp_path, num_perm="0.5K", threshold=1.0).num_perm == 512


def test_workers_change_nothing_in_the_output(
    corpus_artifact: Callable[..., Path], dupes: Texts, tmp_path: Path
) -> None:
    # Duplicates across batches (heapq.py and its variant) and within one (the copies at the end).
    texts = dict(dupes)
    corpus = [
        *dupes,
        ("copy/fnmatch.py", texts["fnmatch.py"]),
        ("copy2/fnmatch.py", texts["fnmatch.py"]),
    ]
    src = corpus_artifact(corpus)
    one, two = (
        run(config(src, tmp_path / f"w{w}", workers=w, batch_rows=3)).manifest for w in (1, 2)
    )
    for name in ("corpus.parquet", "rejected.parquet", "report.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert one["counts"] == two["counts"]
    assert one["counts"]["rejected"] == {"exact_duplicate": 3, "near_duplicate": 1}
    assert one["metrics"] == two["metrics"]


def test_lsh_candidates_are_datasketchs() -> None:
    """The sorted-band LSH finds exactly the pairs `MinHashLSH` with the same bands returns, and
    `similarities` is `MinHash.jaccard`."""
    rng = np.random.default_rng(0)
    # Values from a tiny range collide often, so many pairs share a band (some several).
    signatures = rng.integers(0, 3, size=(80, 32), dtype=np.uint64)
    bands, rows = 8, 4
    lsh = MinHashLSH(threshold=0.5, num_perm=32, params=(bands, rows))
    sketches = [LeanMinHash(seed=1, hashvalues=s, scheme=minhash.SCHEME) for s in signatures]
    for i, m in enumerate(sketches):
        lsh.insert(i, m)
    expected = sorted(
        {(min(i, j), max(i, j)) for i, m in enumerate(sketches) for j in lsh.query(m) if j != i}
    )
    pairs = minhash.candidate_pairs(signatures, bands, rows)
    assert len(expected) > 50
    assert [tuple(p) for p in pairs.tolist()] == expected
    assert minhash.similarities(signatures, pairs).tolist() == [
        sketches[i].jaccard(sketches[j]) for i, j in expected
    ]
    assert minhash.candidate_pairs(signatures[:1], bands, rows).shape == (0, 2)
