from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import fakestage
from albor.errors import ConfigError, DataError, PreflightFailed
from albor.pipeline import (
    apply_pipeline,
    free_disk,
    load_pipeline,
    plan_pipeline,
    status_pipeline,
)
from albor.stage import REGISTRY


@pytest.fixture(autouse=True)
def fake_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "fake", "fakestage")
    fakestage.RUNS.clear()


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(f"workdir: {tmp_path / 'work'}\n" + body)
    return path


CHAIN = """
stages:
  a:
    uses: fake
    with: {texts: ["a = 1\\n", "b = 2\\n"]}
  b:
    uses: split
    needs: [a]
    with: {val: 0.1, test: 0.1}
  c:
    uses: fake
    needs: {input: a}
"""


def test_plan_apply_skip_and_rerun_on_change(tmp_path: Path) -> None:
    path = write(tmp_path, CHAIN)
    pipe = load_pipeline(path)
    assert pipe.order.index("a") < pipe.order.index("b")
    pp = plan_pipeline(pipe)
    assert pp.ok
    assert [(s.name, s.run) for s in pp.stages] == [("a", True), ("b", True), ("c", True)]
    assert pp.stages[1].reason == "upstream a will run"
    assert pp.totals()["wall_time_s"] == 2.0
    assert pp.unestimated("wall_time_s") == ["b"]  # split estimates none: said, not summed as 0
    assert not (tmp_path / "work").exists()  # plan writes nothing
    events = apply_pipeline(pipe)
    assert [e.status for e in events if e.status != "start"] == ["ran", "ran", "ran"]
    assert (tmp_path / "work" / "b" / "train.parquet").exists()
    # The DAG as applied, for a report over the workdir to know what was expected.
    layout = json.loads((tmp_path / "work" / "pipeline.json").read_text())
    assert layout["stages"] == [
        {"name": "a", "uses": "fake", "needs": []},
        {"name": "b", "uses": "split", "needs": ["a"]},
        {"name": "c", "uses": "fake", "needs": ["a"]},
    ]
    assert layout["source"] == str(path)
    again = apply_pipeline(load_pipeline(path))
    assert [e.status for e in again if e.status != "start"] == ["up to date"] * 3
    assert [s.run for s in plan_pipeline(load_pipeline(path)).stages] == [False, False, False]
    # Change a's config: a runs, then b and c because their input changed.
    changed = load_pipeline(path, ["a.texts=['x = 3\\n', 'y = 4\\n', 'z = 5\\n']"])
    pp = plan_pipeline(changed)
    assert pp.stages[0].reason.startswith("config changed (texts)")
    assert [s.run for s in pp.stages] == [True, True, True]
    fakestage.RUNS.clear()
    apply_pipeline(changed)
    assert fakestage.RUNS == ["a", "c"]


def test_failure_then_resume_at_failed_stage(tmp_path: Path) -> None:
    path = write(tmp_path, CHAIN)
    with pytest.raises(DataError):
        apply_pipeline(load_pipeline(path, ["c.fail=true"]))
    assert (tmp_path / "work" / "b" / "manifest.json").exists()  # finished stages intact
    rows = {r["name"]: r for r in status_pipeline(load_pipeline(path, ["c.fail=true"]))}
    assert rows["c"]["last_status"] == "failed" and "asked to fail" in rows["c"]["error"]
    pp = plan_pipeline(load_pipeline(path))
    assert [s.run for s in pp.stages] == [False, False, True]
    assert pp.stages[2].reason.startswith("failed last time: c: asked to fail")
    fakestage.RUNS.clear()
    apply_pipeline(load_pipeline(path))
    assert fakestage.RUNS == ["c"]


def test_only_from_force(tmp_path: Path) -> None:
    path = write(tmp_path, CHAIN)
    apply_pipeline(load_pipeline(path))
    fakestage.RUNS.clear()
    apply_pipeline(load_pipeline(path), only=("c",), force=True)
    assert fakestage.RUNS == ["c"]
    fakestage.RUNS.clear()
    pp = plan_pipeline(load_pipeline(path), start="a")
    assert [s.run for s in pp.stages] == [True, True, True]
    pp = plan_pipeline(load_pipeline(path), start="b")
    assert [(s.name, s.run) for s in pp.stages] == [("a", False), ("b", True), ("c", False)]
    with pytest.raises(ConfigError, match="unknown stage 'zz'"):
        plan_pipeline(load_pipeline(path), only=("zz",))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("stages:\n  a: {uses: fake, needs: [b]}\n  b: {uses: fake, needs: [a]}\n", "cycle"),
        ("stages:\n  a: {uses: nosuch}\n", "unknown stage type 'nosuch'"),
        ("stages:\n  a: {uses: fake, needs: [zz]}\n", "unknown stage 'zz'"),
        ("stages:\n  a: {uses: fake, needs: {nope: a}}\n", "'nope' is not an input"),
        ("stages:\n  a: {uses: fake, with: {bogus: 1}}\n", "stages.a.with: bogus: unknown key"),
        ("stages:\n  a: {uses: fake, wiht: {}}\n", "unknown key"),
        ("stages:\n  a: {uses: fake, needs: [a]}\n", "cannot need itself"),
    ],
)
def test_manifest_errors_at_plan_time(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write(tmp_path, body))


def test_set_override_must_name_a_stage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"STAGE\.KEY=VALUE"):
        load_pipeline(write(tmp_path, CHAIN), ["texts=1"])


def test_default_manifest_loads_and_plans() -> None:
    pipe = load_pipeline(None, workdir=Path("/nonexistent-albor-workdir"))
    # The ladder: every stage of the specification, the report and the folders last.
    kinds = {n: pipe.nodes[n].kind for n in pipe.order}
    assert set(kinds.values()) == {
        "ingest",
        "clean",
        "dedup",
        "decontaminate",
        "split",
        "tokenizer",
        "tokenize",
        "pretrain",
        "distill",
        "pairs",
        "finetune",
        "merge",
        "prune",
        "quantize",
        "evaluate",
        "export",
        "report",
        "publish",
    }
    assert pipe.order[-2:] == ["report", "publish"]
    evaluated = set()
    for n in pipe.order:
        if kinds[n] == "evaluate":
            variant = getattr(pipe.nodes[n].config, "variant", None)
            evaluated.add(pipe.nodes[n].upstream["model"][0] + (f"/{variant}" if variant else ""))
    assert evaluated == {
        "teacher",
        "base",
        "distill",
        "instruct",
        "merged",
        "pruned",
        "quantize/int8",
        "quantize/int4",
    }
    # base and distill: the same student, the same steps and tokens (FALSIFY-ALBOR-005).
    base, distill = (pipe.nodes[n].config for n in ("base", "distill"))
    for key in ("architecture", "max_steps", "micro_batch", "seq_len", "seed"):
        assert getattr(base, key) == getattr(distill, key), key


def test_the_smoke_ladder_has_the_default_ladders_stages() -> None:
    default = load_pipeline(None, workdir=Path("/nonexistent-albor-workdir"))
    smoke = load_pipeline("smoke", workdir=Path("/nonexistent-albor-workdir"))
    assert smoke.order == default.order
    assert {n: smoke.nodes[n].upstream for n in smoke.order} == {
        n: default.nodes[n].upstream for n in default.order
    }


def test_a_list_input_needs_several_stages(tmp_path: Path) -> None:
    body = """
stages:
  a: {uses: fake, with: {texts: ["a = 1\\n"]}}
  b: {uses: fake, with: {texts: ["b = 2\\n"]}}
  m:
    uses: mix
    needs: [a, b]
    with: {weights: [2, 1], weighting: upsample}
  m2:
    uses: mix
    needs: {inputs: [b, a]}
    with: {weights: [1, 1], weighting: upsample}
"""
    pipe = load_pipeline(write(tmp_path, body))
    assert pipe.nodes["m"].upstream == {"inputs": ["a", "b"]}
    assert [p.name for p in pipe.nodes["m2"].config.inputs] == ["b", "a"]  # type: ignore[attr-defined]
    pp = plan_pipeline(pipe)
    assert pp.ok and pp.stages[-1].reason.startswith("upstream")
    apply_pipeline(pipe)
    assert pq.read_table(tmp_path / "work" / "m" / "corpus.parquet").num_rows == 3


def test_a_problem_in_the_last_stage_stops_the_run_before_the_first(tmp_path: Path) -> None:
    path = write(tmp_path, CHAIN)
    pipe = load_pipeline(path, ["c.texts=[]"])
    with pytest.raises(PreflightFailed, match=r"nothing ran: 1 problem.*\n  - c: texts: no texts"):
        apply_pipeline(pipe)
    assert fakestage.RUNS == []
    assert not (tmp_path / "work").exists()  # not even the workdir was made


def test_the_disk_the_plans_estimate_is_checked_against_the_free_disk(tmp_path: Path) -> None:
    path = write(tmp_path, CHAIN)
    pp = plan_pipeline(load_pipeline(path, ["a.disk_bytes=1000"]))
    assert pp.ok and pp.checks[0].name == "disk" and pp.checks[0].status == "ok"
    assert "estimated by a (not yet known for b, c" in pp.checks[0].detail
    huge = load_pipeline(path, [f"c.disk_bytes={free_disk(tmp_path) + (1 << 30)}"])
    assert not plan_pipeline(huge).ok
    with pytest.raises(
        PreflightFailed, match=r"disk: .* GiB free: free some space or set --workdir"
    ):
        apply_pipeline(huge)
    assert fakestage.RUNS == []


def test_the_default_pipeline_stops_at_once_without_a_package_its_last_stage_needs(
    tmp_path: Path,
) -> None:
    """A real `albor pipeline apply` in a fresh process where transformers cannot be imported:
    the export stage's check fails before ingest starts, naming the stage, the package and the
    fix, with no traceback and nothing written."""
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from albor.cli import main\n"
        f"main(['pipeline', 'apply', '--workdir', {str(tmp_path / 'run')!r}])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "nothing ran" in done.stderr and "export: transformers:" in done.stderr
    assert "Traceback" not in done.stderr
    assert "→ ingest" not in done.stderr and "re-run" not in done.stderr
    assert not (tmp_path / "run").exists()
