"""albor.report.collect: a workdir read into the report's data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from report_workdir import (
    COUNTS,
    EVALS,
    HOSTILE,
    LADDER,
    QUANT_VARIANTS,
    build_workdir,
    model_parameters,
)

from albor.errors import ConfigError
from albor.report.collect import collect, safetensors_parameters


def test_complete_workdir(complete_workdir: Path) -> None:
    report = collect(complete_workdir)
    # The report and what comes after it (publish) are not expected to have run.
    assert [s.name for s in report.stages] == [n for n in LADDER if n not in ("report", "publish")]
    assert report.problems == []
    assert [c.stage for c in report.curves] == ["teacher", "distill", "instruct"]
    teacher = report.curves[0]
    assert teacher.train[0] == (10, 6.0 - 10 / 40) and teacher.val_loss == [(40, 5.0)]
    assert teacher.val_bpb == [(40, 1.4)]
    by_name = {v.name: v for v in report.variants}
    assert list(by_name) == ["teacher", "distill", "pruned", "int8"]
    t = by_name["teacher"]
    figures = EVALS["eval-teacher"]
    assert t.val_bpb == figures["perplexity"]["bits_per_byte"]
    assert t.pairs_bpb == figures["pairs"]["bits_per_byte"]
    assert t.pass_at_1 == figures["humaneval"]["pass@1"]
    assert t.infill_em == figures["humaneval-infill"]["single-line"]["psm"]["exact_match"]
    assert t.decode_ms == figures["speed"]["decode_ms_per_token"]
    assert t.parameters == model_parameters("teacher")
    assert t.size_bytes == (complete_workdir / "teacher" / "model.safetensors").stat().st_size
    # A quantize variant: named by its eval stage, parameters of the quantize stage's source.
    int8 = by_name["int8"]
    assert int8.model_stage == "quantize:int8"
    assert int8.parameters == model_parameters("pruned")
    assert int8.pass_at_1 is None
    assert [q.name for q in report.quantize] == list(QUANT_VARIANTS)
    assert report.quantize[2].bytes_disk == QUANT_VARIANTS["gguf-q4_k_m"]["bytes_disk"]
    assert report.best_variant() is by_name["teacher"]
    assert report.final_model == "pruned"  # export's model
    assert {p.name for p in report.provenance} == {s.name for s in report.stages}
    prov = next(p for p in report.provenance if p.name == "distill")
    assert [i["name"] for i in prov.inputs] == ["data", "teacher"]
    assert all(len(p.digest) == 64 for p in report.provenance)


def test_funnel_arithmetic(complete_workdir: Path) -> None:
    funnel = collect(complete_workdir).funnel
    assert [f.stage for f in funnel] == list(COUNTS)
    for f in funnel:
        assert f.docs_in == f.kept + sum(f.rejected.values())
        assert f.balanced and f.note == ""
    clean = funnel[1]
    assert clean.bytes_in == clean.bytes_kept + sum(clean.rejected_bytes.values())
    split = funnel[2]
    assert split.bytes_kept == split.bytes_in == 800_000  # per split, nothing rejected
    assert funnel[0].unit == "files"


def test_funnel_that_does_not_add_up_is_flagged(tmp_path: Path) -> None:
    funnel = collect(build_workdir(tmp_path / "run", unbalanced=True)).funnel
    clean = next(f for f in funnel if f.stage == "clean")
    assert not clean.balanced
    assert clean.note == "counts do not add up: in 95 != kept 83 + rejected 15"


def test_failed_and_missing_stages_are_listed(broken_workdir: Path) -> None:
    report = collect(broken_workdir, skip="report")
    problems = {s.name: s for s in report.problems}
    assert set(problems) == {"instruct", "export"}
    assert problems["instruct"].status == "failed"
    assert "out of memory" in problems["instruct"].detail
    assert problems["export"].status == "missing"
    assert "never ran" in problems["export"].detail
    # Everything else is still read; the final model falls back to the last model stage.
    assert len(report.variants) == 5 and report.final_model == "pruned"
    assert [c.stage for c in report.curves] == ["teacher", "distill"]


def test_partial_and_damaged_stages(tmp_path: Path) -> None:
    wd = build_workdir(tmp_path / "run")
    shutil.move(wd / "merged", wd / ".merged.partial")
    (wd / "quantize" / "manifest.json").write_text("{not json", encoding="utf-8")
    report = collect(wd, skip="report")
    status = {s.name: s.status for s in report.problems}
    assert status == {"merged": "partial", "quantize": "partial"}
    assert report.quantize == []
    # The evaluate stage of a quantize variant still reads; its size comes from the files.
    assert any(v.name == "int8" for v in report.variants)


def test_without_pipeline_json_stages_are_found_in_run_order(tmp_path: Path) -> None:
    wd = build_workdir(tmp_path / "run", layout=False)
    names = [s.name for s in collect(wd).stages]
    assert names == [n for n in LADDER if n not in ("report", "publish")]


def test_hostile_text_is_kept_as_data(broken_workdir: Path) -> None:
    report = collect(broken_workdir)
    assert HOSTILE in report.description
    teacher = next(p for p in report.provenance if p.name == "teacher")
    assert teacher.config["model"] == HOSTILE


@pytest.mark.parametrize("make", ["absent", "empty"])
def test_no_workdir_or_no_stage_is_a_config_error(tmp_path: Path, make: str) -> None:
    wd = tmp_path / "run"
    if make == "empty":
        wd.mkdir()
    with pytest.raises(ConfigError, match="workdir" if make == "absent" else "holds no stage"):
        collect(wd)


def test_safetensors_parameters_reads_headers(complete_workdir: Path) -> None:
    assert safetensors_parameters(complete_workdir / "distill") == model_parameters("distill")
    assert safetensors_parameters(complete_workdir / "tokenize") is None


def test_contracts_are_judged(complete_workdir: Path) -> None:
    report = collect(complete_workdir)
    assert report.contracts is not None
    assert [c.id for c in report.contracts] == [f"FALSIFY-ALBOR-00{i}" for i in range(1, 10)]
    assert all(c.status in {"holds", "fails", "not run", "tested"} for c in report.contracts)
