"""`albor report WORKDIR` and the `report` stage (`albor report plan|apply|keys`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from report_workdir import EVALS, build_workdir

from albor.artifact import read_manifest
from albor.stage import load_stage, run_stage
from albor.stages import report as report_stage
from helpers import run

FILES = [
    "funnel.png",
    "index.html",
    "ladder.png",
    "loss.png",
    "model-card.md",
    "quality-latency.png",
    "report.json",
]


def test_report_workdir_writes_the_report(
    complete_workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["report", str(complete_workdir), "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == FILES
    assert "5 variants" not in out and "4 variants" in out
    assert err == ""


def test_options_before_the_workdir_and_json(
    complete_workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["report", "--json", "--out", str(tmp_path), str(complete_workdir)], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["out"] == str(tmp_path) and sorted(data["files"]) == FILES
    assert [v["name"] for v in data["report"]["variants"]] == [
        "teacher",
        "distill",
        "pruned",
        "int8",
    ]


def test_default_out_is_workdir_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wd = build_workdir(tmp_path / "run")
    code, _, err = run(["report", str(wd)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (wd / "report").iterdir()) == FILES


def test_missing_stages_exit_0_and_are_named_on_stderr(
    broken_workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["report", str(broken_workdir), "--out", str(tmp_path)], capsys)
    assert code == 0
    assert "2 stage(s) missing or failed: instruct (failed), export (missing)" in err
    assert (tmp_path / "index.html").is_file()


@pytest.mark.parametrize("make", ["absent", "empty"])
def test_bad_workdir_exits_2_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: str
) -> None:
    wd = tmp_path / "run"
    if make == "empty":
        wd.mkdir()
    code, _, err = run(["report", str(wd)], capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (wd / "report").exists()


def test_stage_subcommands_are_kept(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["report", "keys"], capsys)
    assert code == 0 and "stages" in out and "workdir" in out
    code, out, _ = run(["report", "--help"], capsys)
    assert code == 0 and "WORKDIR" in out and "plan" in out


def test_stage_plan_and_apply(
    complete_workdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wd = tmp_path / "run"
    shutil.copytree(complete_workdir, wd)
    stages = [wd / n for n in EVALS]
    cfg = report_stage.Config(stages=stages, output=wd / "report")
    plan = report_stage.plan(cfg)
    assert plan.ok, plan.summary()
    assert plan.estimates["variants"] == 4
    assert set(plan.estimates["files"]) == set(FILES)
    result = run_stage(load_stage("report"), cfg, name="report")
    assert result.status == "ran"
    manifest = read_manifest(wd / "report")
    assert sorted(o["path"] for o in manifest["outputs"]) == FILES
    assert manifest["metrics"]["problems"] == {}  # publish comes after the report
    assert manifest["metrics"]["best_variant"] == "teacher"
    assert run_stage(load_stage("report"), cfg, name="report").status == "up to date"
    # The same stage from the command line, through a stage config file (without `stages:`,
    # which the CLI takes for a pipeline manifest's).
    config = tmp_path / "report.yaml"
    config.write_text(yaml.safe_dump({"workdir": str(wd), "output": str(tmp_path / "out")}))
    code, out, err = run(["report", "plan", str(config)], capsys)
    assert code == 0, out + err
    code, out, err = run(["report", "apply", str(config)], capsys)
    assert code == 0, out + err
    assert sorted(o["path"] for o in read_manifest(tmp_path / "out")["outputs"]) == FILES


def test_stage_plan_fails_on_a_missing_input(tmp_path: Path) -> None:
    wd = build_workdir(tmp_path / "run", missing=("eval-int8",))
    cfg = report_stage.Config(stages=[wd / "eval-teacher", wd / "eval-int8"], output=wd / "report")
    plan = report_stage.plan(cfg)
    assert not plan.ok
    assert "albor report" in plan.summary()
    assert any(c.status == "warn" and "eval-int8" in c.name for c in plan.checks)
