"""The publish stage without a network: a plan that names every repository with its files and
bytes and says whether a token is set (never what it is), and fails naming a missing or wrong
input; an apply whose folders load with transformers, whose cards parse with huggingface_hub and
carry the evaluate stages' figures, whose manifests and publish.json hash every file; and a
re-run that refuses to replace an output someone changed or did not make, losing nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import ModelCard
from publish_workdir import EVAL_METRICS
from pydantic import ValidationError
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from albor.artifact import MANIFEST, find_artifacts, sha256_file
from albor.errors import PlanFailed
from albor.model.hf import load_pretrained
from albor.stage import PlanContext, load_stage, run_stage, verify_artifact
from albor.stages import publish
from helpers import run

VARIANTS = ["distill", "instruct", "merged", "pruned", "pruned-gguf"]
HF_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
    "manifest.json",
    "plots/loss.png",
    "plots/ladder.png",
}


def _config(workdir: Path, out: Path, **fields: Any) -> publish.Config:
    return publish.Config(
        models=[workdir / n for n in ("distill", "instruct", "merged", "pruned")],
        export=workdir / "export",
        quantize=workdir / "quantize",
        report=workdir / "report",
        output=out,
        **fields,
    )


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("published") / "publish"
    return run_stage(load_stage("publish"), _config(workdir, out)).output


def test_plan_names_every_repository_and_the_token_state(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    p = publish.plan(_config(workdir, tmp_path / "out", namespace="me"), PlanContext())
    assert p.ok, p.summary()
    repos = p.estimates["repos"]
    assert list(repos) == [f"me/albor-{v}" for v in VARIANTS]
    assert repos["me/albor-pruned"]["ggufs"] == ["model-f16.gguf"]
    assert repos["me/albor-distill"]["evaluations"] == ["eval-distill"]
    assert repos["me/albor-pruned-gguf"]["evaluations"] == ["eval-int8"]
    # The copied files' bytes, read from the inputs (the card and manifest come on top).
    distill = workdir / "distill"
    copied = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert repos["me/albor-distill"]["bytes"] > sum((distill / f).stat().st_size for f in copied)
    assert repos["me/albor-distill"]["files"] == len(HF_FILES)
    checks = {c.name: c for c in p.checks}
    assert checks["token"].status == "ok" and "upload: false" in checks["token"].detail
    assert any("no upload" in a for a in p.actions)

    p = publish.plan(_config(workdir, tmp_path / "out", upload=True), PlanContext())
    token = next(c for c in p.checks if c.name == "token")
    assert token.status == "warn" and "no token in $HF_TOKEN" in token.detail
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    p = publish.plan(_config(workdir, tmp_path / "out", upload=True), PlanContext())
    assert next(c for c in p.checks if c.name == "token").status == "ok"
    assert "hf_secret_value_123" not in json.dumps(p.to_json())
    assert any("upload" in a and "albor-pruned-gguf" in a for a in p.actions)


def test_plan_fails_naming_a_missing_or_wrong_input(workdir: Path, tmp_path: Path) -> None:
    cfg = publish.Config(models=[tmp_path / "nowhere"], output=tmp_path / "out")
    p = publish.plan(cfg, PlanContext())
    assert not p.ok and "nowhere" in p.summary() and "not found" in p.summary()
    cfg = publish.Config(models=[workdir / "export"], output=tmp_path / "out")
    assert "made by stage 'export'" in publish.plan(cfg, PlanContext()).summary()
    cfg = publish.Config(models=[workdir / "distill"], quantize=workdir / "distill")
    assert "expected quantize" in publish.plan(cfg, PlanContext()).summary()
    pending = publish.plan(cfg, PlanContext(pending={"quantize": "quantize"}))
    assert pending.ok
    with pytest.raises(ValidationError, match="nothing to publish"):
        publish.Config(output=tmp_path / "out")
    with pytest.raises(ValidationError, match="token_env"):
        publish.Config(models=[workdir / "distill"], token_env="hf_abc-123")


def test_folders_hold_exactly_the_hub_files_and_load_with_transformers(
    workdir: Path, built: Path
) -> None:
    assert sorted(p.name for p in built.iterdir()) == sorted([*VARIANTS, "publish.json", MANIFEST])
    for name in ("distill", "instruct", "merged"):
        assert _files(built / name) == HF_FILES
    assert _files(built / "pruned") == HF_FILES | {"generation_config.json", "model-f16.gguf"}
    assert _files(built / "pruned-gguf") == {
        "model-q8_0.gguf",
        "int8/config.json",
        "int8/model.safetensors",
        "int8/tokenizer.json",
        "int8/tokenizer_config.json",
        "int8/special_tokens_map.json",
        "README.md",
        "manifest.json",
        "plots/loss.png",
        "plots/ladder.png",
    }
    # Files are the artifacts' own bytes: the export's GGUF, the report's plots.
    assert sha256_file(built / "pruned" / "model-f16.gguf") == sha256_file(
        workdir / "export" / "model-f16.gguf"
    )
    assert sha256_file(built / "distill" / "plots" / "loss.png") == sha256_file(
        workdir / "report" / "plots" / "loss.png"
    )
    text = "def add(a, b):\n    return a + b\n"
    for name in ("distill", "pruned"):
        folder = built / name
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ours, _ = load_pretrained(workdir / name)
        ids = Tokenizer.from_file(str(workdir / name / "tokenizer.json")).encode(text).ids
        assert AutoTokenizer.from_pretrained(folder)(text)["input_ids"] == ids
        x = torch.tensor([ids])
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, ours.eval()(x), rtol=1e-4, atol=1e-4)


def test_cards_parse_and_carry_the_evaluations(built: Path) -> None:
    card = ModelCard.load(built / "distill" / "README.md")
    data = card.data
    assert data.model_name == "albor-distill"
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert data.language == "code" and "albor" in data.tags
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in data.eval_results}
    figures = EVAL_METRICS["distill"]
    assert results[("albor-corpus", "bits_per_byte")] == figures["perplexity"]["bits_per_byte"]
    assert results[("albor-pairs", "bits_per_byte")] == figures["pairs"]["bits_per_byte"]
    assert results[("openai_humaneval", "pass@1")] == figures["humaneval"]["pass@1"]
    assert results[("loubnabnl/humaneval_infilling", "exact_match")] == 0.2
    assert "3.25" in card.text  # decode ms/token: in the body, not in model-index
    assert "![loss](plots/loss.png)" in card.text
    assert "plots/unused.png" not in card.text

    instruct = ModelCard.load(built / "instruct" / "README.md").data
    assert instruct.base_model == "albor-distill"
    assert instruct.eval_results is None  # nothing scored it
    assert "No evaluate stage" in ModelCard.load(built / "instruct" / "README.md").text
    merged = ModelCard.load(built / "merged" / "README.md").data
    assert sorted(merged.base_model) == ["albor-distill", "albor-instruct"]

    gguf = ModelCard.load(built / "pruned-gguf" / "README.md")
    assert gguf.data.library_name == "gguf" and gguf.data.base_model == "albor-pruned"
    results = {r.metric_name: r.metric_value for r in gguf.data.eval_results}
    # eval-int8's figure, then quantize's own measurement of each variant it made.
    assert results == {
        "bits per byte (int8)": 1.5601,
        "bits per byte, as quantize measured it (int8)": 1.56,
        "bits per byte, as quantize measured it (gguf-q8_0)": 1.557,
    }
    assert "Quantized variants" in gguf.text and "model-q8_0.gguf" in gguf.text


def test_manifests_and_record_hash_every_file(workdir: Path, built: Path) -> None:
    record = json.loads((built / "publish.json").read_text())
    assert list(record) == VARIANTS
    for name, entry in record.items():
        folder = built / name
        assert entry["repo_id"] == f"albor-{name}" and entry["uploaded"] is False
        assert entry["url"] is None  # no namespace: the server picks it at upload
        assert {f["path"] for f in entry["files"]} == _files(folder)
        for f in entry["files"]:
            assert sha256_file(folder / f["path"]) == f["sha256"]
            assert (folder / f["path"]).stat().st_size == f["bytes"]
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["repo_id"] == entry["repo_id"]
        assert {i["name"] for i in manifest["inputs"]} >= {"report"}
    pruned = json.loads((built / "pruned" / MANIFEST).read_text())
    digests = {i["name"]: i["digest"] for i in pruned["inputs"]}
    export = json.loads((workdir / "export" / MANIFEST).read_text())
    assert digests["export"] == export["digest"]
    # `albor data verify` over the output: the stage's manifest and each folder's check out.
    found = find_artifacts(built.parent)  # as `albor data verify WORKDIR` walks it
    assert len(found) == 1 + len(VARIANTS)
    assert all(verify_artifact(a)["ok"] for a in found)


def test_a_changed_output_is_never_replaced(
    workdir: Path, built: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    out = tmp_path / "publish"
    shutil.copytree(built, out)
    card = out / "distill" / "README.md"
    card.write_text(card.read_text() + "\nA line written by hand.\n")
    (out / "pruned" / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(PlanFailed) as e:
        run_stage(load_stage("publish"), _config(workdir, out, license="mit"))
    message = str(e.value)
    assert "changed: distill/README.md" in message and "added: pruned/notes.txt" in message
    assert "nothing was changed" in message
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # A folder publish did not make.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"weights of someone else")
    code, _, err = run(
        ["publish", "apply", str(_yaml(workdir, tmp_path, theirs))],
        capsys,
    )
    assert code == 1 and "was not made by publish" in err and "Traceback" not in err
    assert (theirs / "model.safetensors").read_bytes() == b"weights of someone else"


def test_an_unchanged_output_is_rebuilt_in_place(
    workdir: Path, built: Path, tmp_path: Path
) -> None:
    import shutil

    out = tmp_path / "publish"
    shutil.copytree(built, out)
    result = run_stage(load_stage("publish"), _config(workdir, out, license="mit"))
    assert result.status == "ran"
    assert ModelCard.load(out / "distill" / "README.md").data.license == "mit"
    assert not (tmp_path / ".publish.partial").exists()


def _yaml(workdir: Path, tmp_path: Path, out: Path, **extra: Any) -> Path:
    import yaml

    cfg = {
        "models": [str(workdir / "distill")],
        "output": str(out),
        **extra,
    }
    path = tmp_path / f"publish-{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
