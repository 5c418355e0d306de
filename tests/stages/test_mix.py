"""mix: weighted corpora by repetition factor or byte share, deterministic in the seed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from albor.artifact import atomic_write_json, describe_outputs, outputs_digest, sha256_file
from albor.config import validate
from albor.data.corpus import CORPUS_FILE, CorpusWriter, document
from albor.errors import ConfigError
from albor.stage import PlanContext, run_stage
from albor.stages import mix
from helpers import STDLIB

FILES = sorted(p for p in STDLIB.glob("*.py"))


def corpus(directory: Path, texts: list[tuple[str, str]], source: str) -> Path:
    """A corpus artifact whose rows carry `source`, with the manifest ingest would write."""
    directory.mkdir(parents=True)
    with CorpusWriter(directory / CORPUS_FILE) as w:
        for path, text in texts:
            w.write(document(text, path, source))
        size = w.bytes
    outputs = describe_outputs(directory)
    atomic_write_json(
        directory / "manifest.json",
        {
            "stage": "ingest",
            "digest": outputs_digest(outputs),
            "config": {},
            "inputs": [],
            "outputs": outputs,
            "counts": {"in": len(texts), "kept": len(texts), "rejected": {}},
            "metrics": {"bytes_kept": size},
        },
    )
    return directory


def sample(start: int, n: int, limit: int = 3000) -> list[tuple[str, str]]:
    """`n` stdlib modules from `start`, cut to `limit` characters so no document dominates."""
    return [(p.name, p.read_text(encoding="utf-8")[:limit]) for p in FILES[start : start + n]]


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Path, Path]:
    return corpus(tmp_path / "a", sample(0, 20), "tier1"), corpus(
        tmp_path / "b", sample(20, 12), "web"
    )


def rows(directory: Path) -> list[dict[str, object]]:
    table = pq.read_table(directory / CORPUS_FILE)
    return table.to_pylist()


def config(inputs: list[Path], out: Path, **kw: object) -> mix.Config:
    return validate(mix.Config, {"inputs": [str(p) for p in inputs], "output": str(out), **kw}, "t")


def test_config_errors_name_the_field(sources: tuple[Path, Path]) -> None:
    a, b = sources
    with pytest.raises(ConfigError, match=r"weights: 1 weight\(s\) for 2 input\(s\)"):
        config([a, b], a, weights=[1.0], weighting="upsample")
    with pytest.raises(ConfigError, match=r"weights\[1\]: Input should be greater than 0"):
        config([a, b], a, weights=[1.0, 0], weighting="upsample")
    with pytest.raises(ConfigError, match="weighting: required key is missing"):
        config([a, b], a, weights=[1.0, 1.0])
    with pytest.raises(ConfigError, match="weighting: Input should be 'upsample' or 'share'"):
        config([a, b], a, weights=[1.0, 1.0], weighting="both")
    with pytest.raises(ConfigError, match="total_bytes: only means something with"):
        config([a, b], a, weights=[1.0, 1.0], weighting="upsample", total_bytes="1M")
    with pytest.raises(ConfigError, match=r"inputs\[1\]: same directory as inputs\[0\]"):
        config([a, a], a, weights=[1.0, 1.0], weighting="upsample")
    one = config([a], a, weights=[2], weighting="upsample")
    assert one.inputs == [a] and one.total_bytes is None
    assert mix.Config(inputs=str(a), weights=[1], weighting="share").inputs == [a]


def test_plan_shows_before_and_after(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = sources
    p = mix.plan(config([a, b], tmp_path / "out", weights=[3, 1], weighting="upsample"))
    assert p.ok, p.summary()
    assert not (tmp_path / "out").exists()  # plan is pure
    table = p.estimates["sources"]
    bytes_a, bytes_b = table["a"]["bytes"], table["b"]["bytes"]
    assert (table["a"]["documents"], table["b"]["documents"]) == (20, 12)
    assert table["a"]["share"] == round(bytes_a / (bytes_a + bytes_b), 4)
    assert (table["a"]["documents_after"], table["b"]["documents_after"]) == (60, 12)
    assert table["a"]["bytes_after"] == 3 * bytes_a
    assert table["a"]["share_after"] == round(3 * bytes_a / (3 * bytes_a + bytes_b), 4)
    assert p.estimates["documents"] == 72 and p.estimates["documents_in"] == 32
    assert p.estimates["disk_bytes"] > 0 and p.estimates["weighting"] == "upsample"

    share = mix.plan(config([a, b], tmp_path / "o", weights=[0.8, 0.2], weighting="share"))
    assert share.ok, share.summary()
    t = share.estimates["sources"]
    assert (t["a"]["share_after"], t["b"]["share_after"]) == pytest.approx((0.8, 0.2), abs=1e-3)
    largest = "a" if bytes_a >= bytes_b else "b"
    assert t[largest]["factor"] == 1.0  # the largest input is used once
    # Shares that need many copies of the small input warn.
    heavy = mix.plan(config([a, b], tmp_path / "o", weights=[0.05, 0.95], weighting="share"))
    assert heavy.ok and any(c.status == "warn" and "copies" in c.name for c in heavy.checks)

    missing = mix.plan(
        config([a, tmp_path / "nope"], tmp_path / "o", weights=[1, 1], weighting="upsample")
    )
    assert [c.name for c in missing.failures] == ["inputs[1]"]
    assert "not found" in missing.failures[0].detail
    pending = mix.plan(
        config([a, tmp_path / "nope"], tmp_path / "o", weights=[1, 1], weighting="upsample"),
        PlanContext(pending={"inputs": "clean"}),
    )
    assert pending.ok and "sources" not in pending.estimates
    empty = mix.plan(mix.Config(weights=[], weighting="upsample", output=tmp_path / "o"))
    assert [c.name for c in empty.failures] == ["inputs"]


def test_upsample_repeats_each_document(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = sources
    out = tmp_path / "mixed"
    cfg = config([a, b], out, weights=[3, 1], weighting="upsample")
    result = run_stage(mix, cfg)
    assert result.status == "ran"
    assert sorted(p.name for p in out.iterdir()) == [CORPUS_FILE, "manifest.json"]
    got = rows(out)
    src_a, src_b = rows(a), rows(b)
    assert len(got) == 3 * len(src_a) + len(src_b) == 72
    seen = Counter(r["sha256"] for r in got)
    assert all(seen[r["sha256"]] == 3 for r in src_a)
    assert all(seen[r["sha256"]] == 1 for r in src_b)
    # Rows are copied unchanged (source, path, sha256), pass by pass: copies never adjacent.
    assert got[:20] == src_a and got[20:40] == src_a and got[40:60] == src_a
    assert got[60:] == src_b and {r["source"] for r in got} == {"tier1", "web"}
    m = result.manifest
    assert m["counts"] == {"in": 32, "kept": 32, "rejected": {}}
    assert m["metrics"]["documents_written"] == 72
    assert m["metrics"]["bytes_kept"] == sum(int(r["bytes"]) for r in got)
    assert m["metrics"]["sources"]["a"]["documents_written"] == 60
    assert [i["path"] for i in m["inputs"]] == [str(a), str(b)]
    assert run_stage(mix, cfg).status == "up to date"


def test_fractional_weights_are_seeded(sources: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = sources

    def run(seed: int, name: str, weights: list[float]) -> tuple[Path, dict[str, object]]:
        cfg = config([a, b], tmp_path / name, weights=weights, weighting="upsample", seed=seed)
        result = run_stage(mix, cfg)
        return result.output, result.manifest

    out1, m1 = run(0, "s0", [1.5, 0.5])
    out2, _ = run(0, "s0-again", [1.5, 0.5])
    out3, _ = run(1, "s1", [1.5, 0.5])
    assert sha256_file(out1 / CORPUS_FILE) == sha256_file(out2 / CORPUS_FILE)  # same bytes

    def doubled(out: Path) -> set[object]:
        return {k for k, n in Counter(r["sha256"] for r in rows(out)).items() if n == 2}

    # 1.5: every document once, exactly half of them twice; 0.5: exactly half of B, once.
    assert len(doubled(out1)) == 10 and len(rows(out1)) == 30 + 6
    assert doubled(out1) != doubled(out3)  # another seed, another subset
    assert m1["counts"] == {"in": 32, "kept": 26, "rejected": {"downsampled": 6}}
    c = m1["counts"]
    assert c["in"] == c["kept"] + sum(c["rejected"].values())


@pytest.mark.parametrize("weights", [[0.8, 0.2], [0.3, 0.7]])
def test_share_lands_on_the_byte_shares(tmp_path: Path, weights: list[float]) -> None:
    a = corpus(tmp_path / "a", sample(0, 40), "tier1")
    b = corpus(tmp_path / "b", sample(40, 40), "web")
    out = tmp_path / "out"
    result = run_stage(mix, config([a, b], out, weights=weights, weighting="share", seed=3))
    got = rows(out)
    by_source = Counter()
    for r in got:
        by_source[r["source"]] += r["bytes"]
    total = sum(by_source.values())
    assert by_source["tier1"] / total == pytest.approx(weights[0], abs=0.02)
    assert by_source["web"] / total == pytest.approx(weights[1], abs=0.02)
    sources = result.manifest["metrics"]["sources"]
    size = {"a": sources["a"]["bytes_in"], "b": sources["b"]["bytes_in"]}
    largest = max(size, key=lambda k: size[k])
    assert sources[largest]["factor"] == 1.0
    assert sources[largest]["documents_written"] == 40  # the largest input used exactly once
    # With a byte target, the output size follows it.
    sized = run_stage(
        mix,
        config([a, b], tmp_path / "sized", weights=weights, weighting="share", total_bytes=50_000),
    ).manifest
    assert sized["metrics"]["bytes_kept"] == pytest.approx(50_000, rel=0.05)
