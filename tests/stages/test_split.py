from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from albor.artifact import read_manifest
from albor.config import validate
from albor.errors import ConfigError, PlanFailed
from albor.stage import load_stage, run_stage
from albor.stages import split


def test_plan_estimates_and_checks(corpus_artifact: Callable[..., Path], tmp_path: Path) -> None:
    src = corpus_artifact()
    cfg = split.Config(input=src, output=tmp_path / "out")
    p = split.plan(cfg)
    assert p.ok
    assert p.estimates["documents"]["val"] == 1
    assert not (tmp_path / "out").exists()  # plan is pure
    missing = split.plan(split.Config(input=tmp_path / "nope", output=tmp_path / "o"))
    assert not missing.ok and "not found" in missing.failures[0].detail


def test_fractions_validated() -> None:
    with pytest.raises(ConfigError, match="val"):
        validate(split.Config, {"val": 0.6, "test": 0.5}, "x.yaml")


def test_apply_is_deterministic_disjoint_and_idempotent(
    corpus_artifact: Callable[..., Path], tmp_path: Path, stdlib_texts: list[tuple[str, str]]
) -> None:
    # Duplicate every document: copies must land in the same split.
    src = corpus_artifact(stdlib_texts + [(f"copy/{p}", t) for p, t in stdlib_texts])
    cfg = split.Config(input=src, output=tmp_path / "out", val=0.2, test=0.2)
    result = run_stage(load_stage("split"), cfg)
    assert result.status == "ran"
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "test.parquet",
        "train.parquet",
        "val.parquet",
    ]
    hashes = {
        s: set(pq.read_table(out / f"{s}.parquet")["sha256"].to_pylist())
        for s in ("train", "val", "test")
    }
    assert not hashes["train"] & hashes["val"] and not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    m = read_manifest(out)
    assert m["counts"]["in"] == 2 * len(stdlib_texts)
    assert sum(m["metrics"]["documents"].values()) == 2 * len(stdlib_texts)
    again = run_stage(load_stage("split"), cfg)
    assert again.status == "up to date"
    # batch_rows changes how it runs, not what it writes: still up to date.
    cfg_rows = split.Config(input=src, output=tmp_path / "out", val=0.2, test=0.2, batch_rows=3)
    assert run_stage(load_stage("split"), cfg_rows).status == "up to date"
    cfg2 = split.Config(input=src, output=tmp_path / "out", val=0.2, test=0.2, seed="other")
    assert run_stage(load_stage("split"), cfg2).status == "ran"


def test_apply_refuses_failing_plan(tmp_path: Path) -> None:
    cfg = split.Config(input=tmp_path / "missing", output=tmp_path / "out")
    with pytest.raises(PlanFailed):
        run_stage(load_stage("split"), cfg)
    assert not (tmp_path / "out").exists()
