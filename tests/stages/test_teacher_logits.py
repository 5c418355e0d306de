"""The teacher_logits stage: rows equal to the teacher's top-k of each aligned window, the
integrity check of every row, a plan that refuses what cannot work, and a resume that redoes
nothing finished. The fixtures here (a token artifact of several train shards in the tokenizer
of `trained_model`, and its teacher logits) also serve the offline tests of distill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from albor.artifact import read_manifest
from albor.data.shards import TokenIndex, open_split
from albor.data.windows import aligned_window, aligned_window_count
from albor.errors import DataError, PlanFailed, StageFailed
from albor.model.hf import load_pretrained
from albor.stage import load_stage, run_stage
from albor.stages import teacher_logits, tokenize
from albor.train.distill import TeacherLogitsSampler, topk_teacher, unpack_offline
from albor.train.teacher import (
    LogitsIndex,
    check_logit_rows,
    open_logits,
    row_mass_tolerance,
)

SEQ_LEN = 64
TOP_K = 16
# Small enough that the train split (53K tokens) spans several shards, the last one short.
SHARD_TOKENS = 20_000


@pytest.fixture(scope="session")
def small_data(token_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`token_data`'s splits, tokenizer (so `trained_model` is its teacher) and val split, with
    a train split of several shards of SHARD_TOKENS."""
    made = read_manifest(token_data)["config"]
    cfg = tokenize.Config(
        corpus=Path(made["corpus"]),
        tokenizer=Path(made["tokenizer"]),
        output=tmp_path_factory.mktemp("small_data") / "tokenize",
        shard_tokens=SHARD_TOKENS,
    )
    return run_stage(load_stage("tokenize"), cfg).output


def logits_config(data: Path, teacher: Path, out: Path, **kw: Any) -> teacher_logits.Config:
    base = dict(
        data=data,
        teacher=teacher,
        output=out,
        seq_len=SEQ_LEN,
        top_k=TOP_K,
        device="cpu",
        precision="fp32",
        micro_batch=8,
        threads=1,
    )
    return teacher_logits.Config.model_validate({**base, **kw})


@pytest.fixture(scope="session")
def logits_artifact(
    small_data: Path, trained_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """`trained_model`'s top-TOP_K logits on `small_data`'s windows of SEQ_LEN. Read-only."""
    out = tmp_path_factory.mktemp("teacher_logits") / "logits"
    return run_stage(
        load_stage("teacher_logits"), logits_config(small_data, trained_model, out)
    ).output


def checks(p: Any) -> dict[str, str]:
    return {c.name: f"{c.status}: {c.detail}" for c in p.checks}


def test_the_fixture_spans_several_train_shards(small_data: Path) -> None:
    shards = TokenIndex.load(small_data).splits["train"].shards
    assert len(shards) >= 3 and shards[-1].tokens < SHARD_TOKENS


def test_apply_writes_the_teachers_top_k_of_every_aligned_window(
    small_data: Path, trained_model: Path, logits_artifact: Path
) -> None:
    manifest = read_manifest(logits_artifact)
    index = LogitsIndex.load(logits_artifact)
    data = open_split(small_data, "train")
    counts = [aligned_window_count(len(s), SEQ_LEN) for s in data]
    expected = {"logits.json"} | {
        f"train/shard-{i:05d}/{name}"
        for i, n in enumerate(counts)
        if n
        for name in ("ids.npy", "logprobs.npy")
    }
    assert {o["path"] for o in manifest["outputs"]} == expected
    assert [s.windows for s in index.shards] == counts and index.windows == sum(counts)
    assert (index.top_k, index.seq_len, index.temperature) == (TOP_K, SEQ_LEN, 1.0)
    assert index.vocab_size == 512 and index.ids_dtype == "uint16"
    assert index.tokenizer_sha256 == TokenIndex.load(small_data).tokenizer_sha256
    assert index.teacher_path == str(trained_model) and len(index.teacher_digest) == 64
    assert index.row_mass_tolerance == row_mass_tolerance(TOP_K)

    teacher, _ = load_pretrained(trained_model)
    for s, pair in enumerate(open_logits(logits_artifact, index)):
        assert pair is not None
        ids, lps = pair
        assert ids.dtype == np.uint16 and lps.dtype == np.float16
        assert ids.shape == lps.shape == (counts[s], SEQ_LEN, TOP_K)
        for w in (0, counts[s] - 1):
            window = torch.from_numpy(aligned_window(data[s], w, SEQ_LEN))
            # The teacher reads tokens 0..T-1 of the window: row t is its distribution of t+1.
            with torch.no_grad():
                logits = teacher(window[None, :-1])[0]
            want_ids, want_lp = topk_teacher(logits, TOP_K, index.temperature)
            got_ids = torch.from_numpy(ids[w].astype(np.int64))
            got_lp = torch.from_numpy(lps[w].astype(np.float32))
            torch.testing.assert_close(got_lp, want_lp, atol=2e-3, rtol=2e-3)
            # Ids by their log-probability, so that two near-equal tokens may swap places.
            full = torch.log_softmax(logits / index.temperature, dim=-1)
            torch.testing.assert_close(full.gather(-1, got_ids), want_lp, atol=2e-3, rtol=2e-3)
            assert (got_ids[:, 0] == want_ids[:, 0]).float().mean() > 0.95


def test_integrity_check_accepts_true_rows_and_names_a_corrupt_one() -> None:
    gen = torch.Generator().manual_seed(0)
    _, lp = topk_teacher(torch.randn(6, 10, 512, generator=gen) * 4, TOP_K, 2.0)
    values = lp.to(torch.float16).numpy()
    tol = row_mass_tolerance(TOP_K)
    assert check_logit_rows(values, tol, where="shard 0") <= 1 + tol

    bad = values.copy()
    bad[4, 3, 7] = np.nan
    with pytest.raises(DataError, match=r"train shard 2 \(x\): window 9, position 3: .*non-finite"):
        check_logit_rows(bad, tol, where="train shard 2 (x)", first_window=5)
    bad = values.copy()
    bad[1, 8] = np.log(1.2 / TOP_K)  # k tokens at 1.2 / k each: 1.2 in all
    with pytest.raises(DataError, match=r"window 1, position 8: .*summing to 1\.(19|20)"):
        check_logit_rows(bad, tol, where="shard 0")


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(1, 256),
    temperature=st.floats(0.5, 4.0),
    scale=st.floats(0.1, 20.0),
)
def test_true_fp16_rows_pass_the_integrity_tolerance(
    seed: int, k: int, temperature: float, scale: float
) -> None:
    """The tolerance covers fp16 rounding: no row of a real softmax is ever refused."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 256, generator=gen) * scale
    _, lp = topk_teacher(logits, k, temperature)
    check_logit_rows(lp.to(torch.float16).numpy()[None], row_mass_tolerance(k), where="x")


def test_sampler_draws_aligned_windows_with_their_rows_as_a_function_of_the_step(
    small_data: Path, logits_artifact: Path
) -> None:
    index = LogitsIndex.load(logits_artifact)
    shards = open_split(small_data, "train")
    logits = open_logits(logits_artifact, index)
    sampler = TeacherLogitsSampler(shards, logits, SEQ_LEN, seed=3)
    batch = sampler.batch(7, 1, 5)
    assert batch.shape == (5, 1 + 2 * TOP_K, SEQ_LEN + 1) and batch.dtype == torch.int64
    assert torch.equal(batch, sampler.batch(7, 1, 5))
    assert not torch.equal(batch, sampler.batch(8, 1, 5))
    inputs, targets, ids, lps = unpack_offline(batch)
    for row, (s, w) in enumerate(sampler.windows.draw(7, 1, 5)):
        window = torch.from_numpy(aligned_window(shards[s], w, SEQ_LEN))
        assert torch.equal(inputs[row], window[:-1]) and torch.equal(targets[row], window[1:])
        pair = logits[s]
        assert pair is not None
        assert torch.equal(ids[row], torch.from_numpy(pair[0][w].astype(np.int64)))
        assert torch.equal(lps[row], torch.from_numpy(np.array(pair[1][w])))
    assert sampler.tokens == index.windows * SEQ_LEN


def test_plan_estimates_disk_and_refuses_too_little(
    small_data: Path, trained_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = logits_config(small_data, trained_model, tmp_path / "out")
    p = teacher_logits.plan(cfg)
    assert p.ok, checks(p)
    windows = sum(
        aligned_window_count(s.tokens, SEQ_LEN)
        for s in TokenIndex.load(small_data).splits["train"].shards
    )
    assert p.estimates["disk_bytes"] == windows * SEQ_LEN * TOP_K * (2 + 2)
    assert {"teacher", "logits", "total"} <= set(p.estimates["memory"])
    assert p.estimates["teacher_flops"] > 0 and "wall_time_s" in p.estimates

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1000))
    p = teacher_logits.plan(cfg)
    found = checks(p)
    assert found["disk"].startswith("fail: the logits need") and "lower top_k" in found["disk"]
    assert not p.ok


def test_plan_refuses_another_tokenizer_and_a_window_past_the_context(
    small_data: Path, trained_model: Path, tmp_path: Path
) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_model, teacher)
    d = json.loads((teacher / "tokenizer.json").read_text())
    d["model"]["merges"] = d["model"]["merges"][:-1]
    (teacher / "tokenizer.json").write_text(json.dumps(d))
    found = checks(teacher_logits.plan(logits_config(small_data, teacher, tmp_path / "a")))
    assert found["tokenizer"].startswith("fail: the teacher's tokenizer differs from the data's")

    found = checks(
        teacher_logits.plan(logits_config(small_data, trained_model, tmp_path / "b", seq_len=200))
    )
    assert found["seq_len"].startswith("fail: seq_len 200 exceeds the teacher's context 128")
    found = checks(
        teacher_logits.plan(logits_config(small_data, trained_model, tmp_path / "c", top_k=600))
    )
    assert found["top_k"].startswith("fail: top_k 600 exceeds")


def test_plan_refuses_a_teacher_without_a_row_for_every_data_id_and_a_file(
    small_data: Path, trained_model: Path, tmp_path: Path
) -> None:
    """A teacher with the data's tokenizer.json but fewer embedding rows would index past its
    table on the first window; a file where a directory belongs is named as a file."""
    teacher = tmp_path / "teacher"
    shutil.copytree(trained_model, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["vocab_size"] = 400
    (teacher / "config.json").write_text(json.dumps(config))
    p = teacher_logits.plan(logits_config(small_data, teacher, tmp_path / "a"))
    found = checks(p)
    assert found["teacher vocab"].startswith(f"fail: the teacher {teacher} has 400 ids")
    assert "data's tokenizer 512" in found["teacher vocab"] and not p.ok

    a_file = trained_model / "config.json"
    found = checks(teacher_logits.plan(logits_config(small_data, a_file, tmp_path / "b")))
    assert found["teacher"] == (
        f"fail: teacher {a_file} is a file: point teacher at the checkpoint directory that "
        "holds config.json, model.safetensors and tokenizer.json"
    )


def test_a_killed_run_resumes_without_redoing_a_finished_shard(
    small_data: Path,
    trained_model: Path,
    logits_artifact: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = teacher_logits._compute_shard
    calls: list[str] = []

    def killed_at_second_shard(*args: Any, **kw: Any) -> float:
        if calls:
            raise StageFailed("simulated kill")
        calls.append(str(args[3]))
        return real(*args, **kw)

    cfg = logits_config(small_data, trained_model, tmp_path / "out")
    monkeypatch.setattr(teacher_logits, "_compute_shard", killed_at_second_shard)
    with pytest.raises(StageFailed, match="simulated kill"):
        run_stage(load_stage("teacher_logits"), cfg)
    partial = tmp_path / ".out.partial" / "train"
    finished = sorted(p.name for p in partial.iterdir() if not p.name.startswith("."))
    assert finished == ["shard-00000"]
    first = partial / "shard-00000" / "ids.npy"
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)

    def counted(*args: Any, **kw: Any) -> float:
        calls.append(str(args[3]))
        return real(*args, **kw)

    calls.clear()
    monkeypatch.setattr(teacher_logits, "_compute_shard", counted)
    m = run_stage(load_stage("teacher_logits"), cfg).manifest
    shards = len(LogitsIndex.load(logits_artifact).shards)
    assert len(calls) == shards - 1 and not any("shard-00000" in c for c in calls)
    assert m["metrics"]["shards_resumed"] == 1
    again = tmp_path / "out" / "train" / "shard-00000" / "ids.npy"
    assert (again.stat().st_ino, again.stat().st_mtime_ns) == stamp
    # The resumed artifact is the uninterrupted one, file for file.
    straight = {o["path"]: o["sha256"] for o in read_manifest(logits_artifact)["outputs"]}
    assert {o["path"]: o["sha256"] for o in m["outputs"]} == straight


def test_apply_refuses_without_a_plan(small_data: Path, tmp_path: Path) -> None:
    cfg = logits_config(small_data, tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(PlanFailed, match="teacher"):
        run_stage(load_stage("teacher_logits"), cfg)
