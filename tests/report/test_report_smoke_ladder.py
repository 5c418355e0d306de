"""The whole ladder end to end, as a user runs it: `albor pipeline apply smoke` (the packaged
small ladder) in a fresh process, then `albor report WORKDIR`; every stage done, the contracts
decided from the run, the Hub-ready folders loadable by transformers, the page rendered by a
real browser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cdp_client import Browser, find_browser

from albor.pipeline import load_pipeline

pytestmark = pytest.mark.slow


def albor(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "albor", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )


def test_the_smoke_ladder_runs_end_to_end_and_reports(tmp_path: Path) -> None:
    work = tmp_path / "run"
    done = albor("pipeline", "apply", "smoke", "--workdir", str(work), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    expected = load_pipeline("smoke", workdir=work).order
    state = json.loads((work / ".albor-pipeline.json").read_text())
    assert {name: state[name]["status"] for name in expected} == {n: "done" for n in expected}

    # The report stage's page and the CLI's over the same workdir.
    report = json.loads((work / "report" / "report.json").read_text())
    contracts = {c["id"]: c for c in report["contracts"]}
    assert len(contracts) == 9
    for cid in ("001", "002", "004", "006", "007", "008", "009"):
        assert contracts[f"FALSIFY-ALBOR-{cid}"]["status"] == "holds", contracts
    # Same student, same steps: decided by the run, whichever way it falls.
    assert contracts["FALSIFY-ALBOR-005"]["status"] in ("holds", "fails")
    variants = {v["name"] for v in report["variants"]}
    assert {"teacher", "base", "distill", "instruct", "merged", "pruned", "int8", "int4"} <= (
        variants
    )
    out = tmp_path / "cli-report"
    again = albor("report", str(work), "--out", str(out), "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (out / "index.html").is_file() and (out / "model-card.md").is_file()

    # Hub-ready folders: the final model loads in transformers with its tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = work / "publish" / "pruned"
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == model.config.vocab_size
    assert (folder / "README.md").read_text().startswith("---\n")
    assert list((work / "publish" / "pruned-gguf").glob("*.gguf"))

    browser = find_browser()
    if browser is None:
        pytest.skip("no chromium to open the page in (apt-get install chromium)")
    with Browser(browser) as b:
        page = b.visit(work / "report" / "index.html")
    assert page.errors == []
    assert page.images and all(i["complete"] and i["naturalWidth"] > 0 for i in page.images)
