"""The report over a workdir of real stages run by `albor pipeline apply`: the stage in the
pipeline (waiting on its `needs`, leaving itself out), and `albor report` after a failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import albor.cli  # noqa: F401  (built before `fake` joins the registry: it has no CLI group)
import fakestage
from albor.errors import DataError
from albor.pipeline import apply_pipeline, load_pipeline
from albor.report import collect
from albor.stage import REGISTRY
from helpers import STDLIB, STDLIB_SAMPLE, run

PIPELINE = """
name: tiny
description: three data stages and a report
workdir: {work}
stages:
  ingest:
    uses: ingest
    with: {{sources: [{{type: dir, path: {src}}}]}}
  clean:
    uses: clean
    needs: [ingest]
  split:
    uses: split
    needs: [clean]
    with: {{val: 0.2, test: 0.2}}
  report:
    uses: report
    needs: {{stages: [split]}}
  broken:
    uses: fake
    needs: {{input: clean}}
    with: {{fail: {fail}}}
"""


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setitem(REGISTRY, "fake", "fakestage")
    fakestage.RUNS.clear()
    src = tmp_path / "src"
    src.mkdir()
    for name in STDLIB_SAMPLE:
        shutil.copy(STDLIB / name, src / name)
    (src / "empty.py").write_text("")  # ingest rejects it: the funnel has a reason
    (src / "broken.py").write_text("def f(:\n    x = 1\n")  # clean rejects it
    return src


def write(tmp_path: Path, src: Path, fail: bool) -> Path:
    path = tmp_path / "pipe.yaml"
    body = PIPELINE.format(work=tmp_path / "work", src=src, fail=str(fail).lower())
    path.write_text(body)
    return path


def test_report_stage_in_a_pipeline(tmp_path: Path, pipeline: Path) -> None:
    apply_pipeline(load_pipeline(write(tmp_path, pipeline, fail=False)))
    work = tmp_path / "work"
    data = json.loads((work / "report" / "report.json").read_text())
    # The report left itself out; `broken` (after it in the order, not downstream) is expected.
    names = [s["name"] for s in data["stages"]]
    assert "report" not in names and names[:3] == ["ingest", "clean", "split"]
    funnel = {f["stage"]: f for f in data["funnel"]}
    assert funnel["ingest"]["rejected"] == {"empty": 1}
    assert funnel["clean"]["rejected"].get("syntax_error") == 1
    assert all(f["balanced"] for f in funnel.values())
    assert data["name"] == "tiny"
    manifest = json.loads((work / "report" / "manifest.json").read_text())
    assert manifest["stage"] == "report"
    assert [i["path"] for i in manifest["inputs"]] == [str(work / "split")]
    page = (work / "report" / "index.html").read_text()
    assert "three data stages and a report" in page


def test_report_after_a_failed_stage(
    tmp_path: Path, pipeline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(DataError):
        apply_pipeline(load_pipeline(write(tmp_path, pipeline, fail=True)))
    work = tmp_path / "work"
    report = collect(work)
    problems = {s.name: s for s in report.problems}
    assert problems["broken"].status == "failed"
    assert "asked to fail" in problems["broken"].detail
    code, _, err = run(["report", str(work), "--out", str(tmp_path / "out")], capsys)
    assert code == 0
    assert "broken (failed)" in err
    page = (tmp_path / "out" / "index.html").read_text()
    assert "broken: asked to fail" in page
