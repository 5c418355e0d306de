"""The written report: index.html, model-card.md, the PNGs and report.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from report_workdir import HOSTILE, HOSTILE_STAGE, build_workdir

from albor.report import collect, write_report
from albor.report.card import card_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def written(complete_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_report(collect(complete_workdir, skip="report"), out)
    return out


def test_exact_file_set_and_images(written: Path) -> None:
    assert sorted(p.name for p in written.iterdir()) == [
        "funnel.png",
        "index.html",
        "ladder.png",
        "loss.png",
        "model-card.md",
        "quality-latency.png",
        "report.json",
    ]
    for png in written.glob("*.png"):
        assert png.read_bytes().startswith(PNG_MAGIC)
    page = (written / "index.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == sorted(p.name for p in written.glob("*.png"))


def test_page_is_self_contained(written: Path) -> None:
    page = (written / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    # Summary first, then the plots, tables, contracts, funnel, provenance, timings.
    order = ["summary", "plots", "variants", "contracts", "funnel", "provenance", "timings"]
    positions = [page.index(f'id="{s}"') for s in order]
    assert positions == sorted(positions)
    assert "best variant by val bits/byte: <b>teacher</b>" in page
    assert "FALSIFY-ALBOR-009" in page and "<details>" in page
    assert 'id="problems"' not in page


def test_same_workdir_same_bytes(complete_workdir: Path, written: Path, tmp_path: Path) -> None:
    write_report(collect(complete_workdir, skip="report"), tmp_path)
    for f in written.iterdir():
        assert (tmp_path / f.name).read_bytes() == f.read_bytes(), f.name


def test_broken_workdir_renders_and_escapes(broken_workdir: Path, tmp_path: Path) -> None:
    report = collect(broken_workdir, skip="report")
    write_report(report, tmp_path)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    problems = page[page.index('id="problems"') : page.index('id="summary"')]
    assert "instruct" in problems and "failed" in problems and "out of memory" in problems
    assert "export" in problems and "missing" in problems
    # Markup from the workdir (description, config, error, a stage name) is text, not markup.
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert "eval-&lt;img src=x onerror=alert(1)&gt;" in page
    card = (tmp_path / "model-card.md").read_text(encoding="utf-8")
    assert HOSTILE not in card and HOSTILE_STAGE not in card
    assert "`instruct` (failed)" in card
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert data["problems"] == ["instruct", "export"]


def test_a_plot_without_data_is_not_drawn_and_the_page_says_why(tmp_path: Path) -> None:
    wd = build_workdir(tmp_path / "run", missing=("teacher", "distill", "instruct"))
    out = tmp_path / "out"
    drawn = write_report(collect(wd, skip="report"), out)
    loss = next(d for d in drawn if d.key == "loss")
    assert loss.file is None and "no training stage" in loss.reason
    assert not (out / "loss.png").exists()
    page = (out / "index.html").read_text(encoding="utf-8")
    assert "Not drawn: no training stage with a metrics.jsonl in this workdir." in page


def test_model_card_and_card_data(complete_workdir: Path, written: Path) -> None:
    card = (written / "model-card.md").read_text(encoding="utf-8")
    assert card.startswith("# ladder-test: pruned\n")
    for heading in (
        "## How it was made",
        "## Evaluation",
        "## Falsification contracts",
        "## Limitations",
        "## Provenance",
    ):
        assert heading in card
    assert "![The ladder: quality of every variant](ladder.png)" in card
    data = card_data(collect(complete_workdir, skip="report"))
    assert data["final_stage"] == "pruned" and data["variant"] == "pruned"
    values = {r["metric_name"]: r["metric_value"] for r in data["eval_results"]}
    assert values == {
        "val bits/byte": 1.5,
        "pairs bits/byte": 2.0,
        "HumanEval pass@1": 0.1,
        "infill exact match": 0.1,
    }
    row = data["eval_results"][0]
    assert set(row) == {
        "task_type",
        "dataset_type",
        "dataset_name",
        "metric_type",
        "metric_name",
        "metric_value",
    }


def test_without_the_contracts_module_the_page_says_so(
    complete_workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "albor.evals.contracts", None)  # an albor without it
    report = collect(complete_workdir, skip="report")
    assert report.contracts is None
    write_report(report, tmp_path)
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "contracts: unavailable" in page
    assert "contracts: unavailable" in (tmp_path / "model-card.md").read_text(encoding="utf-8")
