"""The distill stage: a plan that refuses a teacher of another tokenizer and says how it differs,
estimates that count the teacher, and an apply that trains a student toward the teacher and
resumes like pretraining; offline, from a teacher_logits artifact, the same, with a plan that
refuses logits of other data or windows and an apply that refuses a damaged logits file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from safetensors.torch import load_file
from test_teacher_logits import SEQ_LEN, TOP_K, logits_artifact, small_data

from albor.errors import ArtifactError
from albor.stage import load_stage, run_stage
from albor.stages import distill
from albor.train.teacher import tokenizer_differences
from helpers import crash_at_20_and_resume, pretrain_config

__all__ = ["logits_artifact", "small_data"]  # fixtures shared with the teacher_logits tests


def config(data: Path, teacher: Path, out: Path, **kw: Any) -> distill.Config:
    base = pretrain_config(data, out).model_dump(mode="json", exclude_none=True)
    return distill.Config.model_validate({**base, "teacher": teacher, **kw})


def checks(p: Any) -> dict[str, str]:
    return {c.name: f"{c.status}: {c.detail}" for c in p.checks}


def edited_tokenizer(source: Path, into: Path, edit: Any) -> Path:
    """A copy of `source`'s tokenizer.json in `into`, changed by `edit(json)`."""
    into.mkdir(parents=True, exist_ok=True)
    d = json.loads((source / "tokenizer.json").read_text())
    edit(d)
    (into / "tokenizer.json").write_text(json.dumps(d))
    return into


def test_the_same_tokenizer_has_no_differences(token_data: Path, trained_model: Path) -> None:
    assert tokenizer_differences(trained_model, token_data) == []


def swap_two_ids(d: dict[str, Any]) -> None:
    vocab = d["model"]["vocab"]
    a, b = list(vocab)[300], list(vocab)[301]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def drop_last_merge(d: dict[str, Any]) -> None:
    d["model"]["merges"] = d["model"]["merges"][:-1]


def move_a_special(d: dict[str, Any]) -> None:
    d["added_tokens"][0]["id"] += 1


def grow_vocab(d: dict[str, Any]) -> None:
    d["model"]["vocab"]["zzz-new"] = len(d["model"]["vocab"]) + 100


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (swap_two_ids, "2 tokens at other ids"),
        (drop_last_merge, "merges differ (1 of"),
        (move_a_special, "special-token ids differ (<|endoftext|> "),
        (grow_vocab, "vocabulary 513 vs 512 tokens"),
    ],
)
def test_each_kind_of_tokenizer_difference_is_named(
    token_data: Path, tmp_path: Path, edit: Any, said: str
) -> None:
    other = edited_tokenizer(token_data, tmp_path / "other", edit)
    found = tokenizer_differences(other, token_data)
    assert any(said in f for f in found), found


def test_plan_refuses_a_teacher_with_another_tokenizer_and_says_what_to_do(
    token_data: Path, trained_model: Path, tmp_path: Path
) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_model, teacher)
    edited_tokenizer(trained_model, teacher, drop_last_merge)
    p = distill.plan(config(token_data, teacher, tmp_path / "out"))
    found = checks(p)
    assert found["tokenizer"].startswith("fail: the teacher's tokenizer differs from the data's")
    assert "merges differ" in found["tokenizer"] and "adopt: TEACHER_DIR" in found["tokenizer"]
    assert not p.ok


def test_plan_counts_the_teacher_in_memory_and_time(
    token_data: Path, trained_model: Path, tmp_path: Path
) -> None:
    p = distill.plan(config(token_data, trained_model, tmp_path / "out", device="cpu"))
    assert p.ok, checks(p)
    found = checks(p)
    assert found["tokenizer"].startswith("ok") and found["teacher"].startswith("ok")
    assert "teacher" in p.estimates["memory"]
    assert any(a.startswith("distill into ") for a in p.actions)
    alone = load_stage("pretrain").plan(pretrain_config(token_data, tmp_path / "out2"))
    assert p.estimates["train_flops"] > alone.estimates["train_flops"]  # the teacher's forward


@pytest.mark.parametrize(
    ("kw", "check", "said"),
    [
        (dict(teacher="/nonexistent/teacher"), "teacher", "does not exist"),
        (dict(top_k=100_000), "top_k", "exceeds the vocabulary"),
    ],
)
def test_plan_rejects_bad_teacher_settings(
    token_data: Path, trained_model: Path, tmp_path: Path, kw: dict[str, Any], check: str, said: str
) -> None:
    cfg = config(token_data, kw.pop("teacher", trained_model), tmp_path / "out", **kw)
    found = checks(distill.plan(cfg))
    assert found[check].startswith("fail") and said in found[check], found


def test_apply_distills_a_student_and_resumes_bit_for_bit(
    token_data: Path, trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw: dict[str, Any] = dict(
        max_steps=30, checkpoint_every=10, eval_every=10, log_every=1, threads=1, top_k=16
    )
    straight = tmp_path / "straight"
    m = run_stage(load_stage("distill"), config(token_data, trained_model, straight, **kw))
    metrics = m.manifest["metrics"]
    assert metrics["final_loss"] < metrics["first_loss"] - 0.5 and "val_bpb" in metrics
    assert m.manifest["inputs"] and (straight / "model.safetensors").is_file()

    cfg = config(token_data, trained_model, tmp_path / "out", **kw)
    resumed = crash_at_20_and_resume("distill", cfg, monkeypatch)
    assert resumed["resumed_from"] == 20
    wa, wb = (
        load_file(straight / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert all((wa[k] == wb[k]).all() for k in wa)


def offline_config(data: Path, logits: Path, out: Path, **kw: Any) -> distill.Config:
    base = pretrain_config(data, out, seq_len=SEQ_LEN).model_dump(mode="json", exclude_none=True)
    return distill.Config.model_validate({**base, "teacher_logits": logits, **kw})


def test_teacher_and_teacher_logits_are_exclusive(
    small_data: Path, logits_artifact: Path, trained_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="teacher and teacher_logits are both set"):
        offline_config(small_data, logits_artifact, tmp_path / "out", teacher=trained_model)
    cfg = offline_config(small_data, logits_artifact, tmp_path / "out", teacher_logits=None)
    found = checks(distill.plan(cfg))
    assert found["teacher"].startswith("fail: no teacher") and "teacher_logits:" in found["teacher"]


def test_offline_plan_takes_the_artifacts_settings_and_adds_no_teacher(
    small_data: Path, logits_artifact: Path, tmp_path: Path
) -> None:
    p = distill.plan(offline_config(small_data, logits_artifact, tmp_path / "out", device="cpu"))
    assert p.ok, checks(p)
    found = checks(p)
    assert found["teacher"].startswith("ok: offline") and f"top {TOP_K} of 512" in found["teacher"]
    assert "temperature and top_k are the artifact's" in found["teacher"]
    assert "teacher" not in p.estimates["memory"]
    alone = load_stage("pretrain").plan(
        pretrain_config(small_data, tmp_path / "out2", seq_len=SEQ_LEN)
    )
    assert p.estimates["train_flops"] == alone.estimates["train_flops"]


def edited_logits(source: Path, into: Path, edit: Any) -> Path:
    shutil.copytree(source, into)
    d = json.loads((into / "logits.json").read_text())
    edit(d)
    (into / "logits.json").write_text(json.dumps(d))
    return into


@pytest.mark.parametrize(
    ("edit", "kw", "check", "said"),
    [
        (lambda d: d.update(tokenizer_sha256="0" * 64), {}, "tokenizer", "their ids mean other"),
        (lambda d: d.update(data_digest="0" * 64), {}, "teacher_logits data", "another token"),
        (None, dict(seq_len=32), "seq_len", f"set seq_len: {SEQ_LEN}, or recompute"),
        (None, dict(temperature=3.0), "temperature", "remove temperature"),
        (None, dict(top_k=8), "top_k", "computed with 16"),
    ],
)
def test_offline_plan_refuses_logits_that_do_not_fit_the_run(
    small_data: Path,
    logits_artifact: Path,
    tmp_path: Path,
    edit: Any,
    kw: dict[str, Any],
    check: str,
    said: str,
) -> None:
    logits = (
        logits_artifact if edit is None else edited_logits(logits_artifact, tmp_path / "l", edit)
    )
    p = distill.plan(offline_config(small_data, logits, tmp_path / "out", **kw))
    found = checks(p)
    assert found[check].startswith("fail") and said in found[check], found
    assert not p.ok


def test_offline_apply_refuses_a_logits_file_with_a_changed_byte(
    small_data: Path, logits_artifact: Path, tmp_path: Path
) -> None:
    logits = tmp_path / "logits"
    shutil.copytree(logits_artifact, logits)
    damaged = logits / "train" / "shard-00001" / "logprobs.npy"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0x01
    damaged.write_bytes(bytes(data))
    cfg = offline_config(small_data, logits, tmp_path / "out", max_steps=5, threads=1)
    with pytest.raises(ArtifactError, match=r"shard-00001/logprobs\.npy: sha256 differs"):
        run_stage(load_stage("distill"), cfg)
    assert not (tmp_path / "out").exists()


def test_offline_apply_distills_and_resumes_bit_for_bit(
    small_data: Path, logits_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw: dict[str, Any] = dict(
        max_steps=30, checkpoint_every=10, eval_every=10, log_every=1, threads=1
    )
    straight = tmp_path / "straight"
    m = run_stage(
        load_stage("distill"), offline_config(small_data, logits_artifact, straight, **kw)
    )
    metrics = m.manifest["metrics"]
    assert metrics["final_loss"] < metrics["first_loss"] - 0.5 and "val_bpb" in metrics
    assert {e["name"] for e in m.manifest["inputs"]} == {"data", "teacher_logits"}

    cfg = offline_config(small_data, logits_artifact, tmp_path / "out", **kw)
    resumed = crash_at_20_and_resume("distill", cfg, monkeypatch)
    assert resumed["resumed_from"] == 20
    wa, wb = (
        load_file(straight / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert all((wa[k] == wb[k]).all() for k in wa)
