from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from albor.cli import ALIASES, cli
from albor.stage import DESCRIPTIONS, REGISTRY, TRAINING_STAGES, load_stage
from helpers import run, write_corpus_artifact


def test_verbs_match_registry() -> None:
    assert set(DESCRIPTIONS) == set(REGISTRY)
    for kind in [*REGISTRY, *ALIASES]:
        group = cli.commands[kind]
        # The training stages (and their aliases) have the crash-restarting supervisor.
        trains = ALIASES.get(kind, kind) in TRAINING_STAGES
        extra = {"watch"} if trains else set()
        assert set(group.commands) == {"plan", "apply", "keys", *extra}  # type: ignore[attr-defined]
    for kind in REGISTRY:
        module = load_stage(kind)
        assert kind == module.NAME
        # Every stage that composes the training settings is one the supervisor knows.
        assert (kind in TRAINING_STAGES) == ("max_steps" in module.Config.model_fields), kind
        assert not hasattr(module, "DESCRIPTION"), "stage.DESCRIPTIONS is the one table"
        for attr in ("Config", "plan", "apply", "INPUTS"):
            assert hasattr(module, attr), f"{kind} lacks {attr}"
        for field in module.INPUTS:
            assert field in module.Config.model_fields
        assert "output" in module.Config.model_fields
        for key, f in module.Config.model_fields.items():
            assert f.description, f"{kind}.{key} has no description"


def test_stage_plan_apply_json_and_exit_codes(
    corpus_artifact: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus_artifact()
    cfg = tmp_path / "split.yaml"
    cfg.write_text(f"input: {src}\noutput: {tmp_path / 'out'}\n")
    code, out, _ = run(["split", "plan", str(cfg), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["ok"] and data["stage"] == "split"
    assert set(data) == {"stage", "ok", "checks", "estimates", "actions"}
    assert all(set(c) == {"name", "status", "detail"} for c in data["checks"])
    assert not (tmp_path / "out").exists()
    code, out, _ = run(["split", "apply", str(cfg)], capsys)
    assert code == 0 and "split: done" in out
    code, out, _ = run(["split", "apply", str(cfg)], capsys)
    assert code == 0 and "up to date" in out
    code, out, _ = run(["split", "apply", str(cfg), "--json", "--force"], capsys)
    assert code == 0 and json.loads(out)["status"] == "ran"
    # An invalid plan: exit 1, the failing check shown, nothing written.
    code, out, err = run(["split", "plan", str(cfg), "--set", f"input={tmp_path / 'nope'}"], capsys)
    assert code == 1 and "not found" in out
    code, _, err = run(
        [
            "split",
            "apply",
            str(cfg),
            "--set",
            f"input={tmp_path / 'nope'}",
            "--set",
            f"output={tmp_path / 'o2'}",
        ],
        capsys,
    )
    assert code == 1 and "plan failed" in err and "Traceback" not in err
    assert not (tmp_path / "o2").exists()


def test_config_errors_exit_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "split.yaml"
    cfg.write_text("inptu: x\n")
    code, _, err = run(["split", "plan", str(cfg)], capsys)
    assert code == 2 and "inptu: unknown key (did you mean 'input'?)" in err
    cfg.write_text("val: lots\n")
    code, _, err = run(["split", "plan", str(cfg)], capsys)
    assert code == 2 and "val" in err and "Traceback" not in err
    code, _, err = run(["split", "plan", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "no such file" in err
    code, _, err = run(["split", "plan"], capsys)
    assert code == 2 and "Missing argument" in err
    code, _, err = run(["nosuchverb"], capsys)
    assert code == 2


def test_recipes_lists_packaged_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["recipes", "--json"], capsys)
    names = {r["name"]: r for r in json.loads(out)["recipes"]}
    assert code == 0 and {"default", "pretrain-350m"} <= set(names)
    assert Path(names["default"]["path"]).is_file()


def test_350m_recipe_plans_398_5m(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(["train", "plan", "pretrain-350m", "--json"], capsys)
    data = json.loads(out)
    assert data["estimates"]["parameters"] == {"total": 398_509_056, "human": "398.5M"}
    assert data["estimates"]["tokens_per_step"] == 4 * 128 * 1024
    assert data["estimates"]["total_tokens"] == 4 * 128 * 1024 * 5000
    assert data["estimates"]["warmup_fraction"] == 0.1
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["architecture"]["status"] == "ok"
    assert "memory" in data["estimates"] and "checkpoints" in data["estimates"]
    assert code in (0, 1)  # data may be pending or missing depending on the workdir


def test_bad_source_fails_cleanly_and_keeps_the_old_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.py").write_text("def f(x):\n    return x + 1\n")
    (tmp_path / "nopy").mkdir()
    (tmp_path / "nopy" / "notes.txt").write_text("hello\n")
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text(f"sources: [{{type: dir, path: {good}}}]\noutput: {tmp_path / 'out'}\n")
    code, _, err = run(["ingest", "apply", str(cfg)], capsys)
    assert code == 0, err
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    for source, message in [
        (tmp_path / "nopy", "no file matches **/*.py"),
        (tmp_path / "missing", "directory not found"),
    ]:
        code, _, err = run(
            ["ingest", "apply", str(cfg), "--set", f"sources=[{{type: dir, path: {source}}}]"],
            capsys,
        )
        assert code == 1 and message in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        assert (tmp_path / "out" / "manifest.json").read_bytes() == before


def test_data_verify_finds_drift(
    corpus_artifact: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = corpus_artifact()
    cfg = tmp_path / "split.yaml"
    cfg.write_text(f"input: {src}\noutput: {tmp_path / 'work' / 'split'}\n")
    assert run(["split", "apply", str(cfg)], capsys)[0] == 0
    code, out, _ = run(["data", "verify", str(tmp_path / "work"), "--json"], capsys)
    assert code == 0 and json.loads(out)["ok"]
    split_dir = tmp_path / "work" / "split"
    (split_dir / "val.parquet").write_bytes(b"tampered")
    (split_dir / "test.parquet").unlink()
    (split_dir / "notes.txt").write_text("extra")
    code, out, _ = run(["data", "verify", str(split_dir), "--json"], capsys)
    art = json.loads(out)["artifacts"][0]
    assert code == 1 and not art["ok"]
    assert (art["modified"], art["missing"], art["extra"]) == (
        ["val.parquet"],
        ["test.parquet"],
        ["notes.txt"],
    )
    code, _, err = run(["data", "verify", str(tmp_path / "empty-nothing")], capsys)
    assert code == 2 and "not a directory" in err
    # The upstream corpus is re-made with other content: the split no longer derives from it.
    (split_dir / "notes.txt").unlink()
    run(["split", "apply", str(cfg), "--force"], capsys)
    write_corpus_artifact(src, [("x.py", "x = 1\n")])
    code, out, _ = run(["data", "verify", str(split_dir), "--json"], capsys)
    art = json.loads(out)["artifacts"][0]
    assert code == 1 and art["inputs"] == [f"{src} (changed since this artifact was made)"]


def test_data_verify_notices_changed_ingest_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("def f(x):\n    return x + 1\n")
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text(f"sources: [{{type: dir, path: {src}}}]\noutput: {tmp_path / 'out'}\n")
    assert run(["ingest", "apply", str(cfg)], capsys)[0] == 0
    assert run(["data", "verify", str(tmp_path / "out")], capsys)[0] == 0
    (src / "b.py").write_text("y = 2\n")
    code, out, _ = run(["data", "verify", str(tmp_path / "out"), "--json"], capsys)
    assert code == 1 and json.loads(out)["artifacts"][0]["sources"] == [f"dir: {src} (changed)"]


def test_keys_lists_nested_settings_under_their_parent(capsys: pytest.CaptureFixture[str]) -> None:
    """`keys` shows what a config can hold below its top level: the architecture's fields, and
    each kind of evaluate task with its own keys (a `limit` a user would otherwise not find)."""
    code, output, _ = run(["pretrain", "keys"], capsys)
    assert code == 0 and "architecture.hidden_size (default None)" in output, output
    code, output, _ = run(["evaluate", "keys"], capsys)
    assert code == 0, output
    lines = output.splitlines()
    start = lines.index("  tasks entries with task: humaneval")
    after = lines[start + 1 : lines.index("  tasks entries with task: custom")]
    assert any(line.startswith("    limit (default None):") for line in after)
    assert "  tasks entries with task: pairs" in lines
