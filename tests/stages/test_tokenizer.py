from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from albor.artifact import read_manifest
from albor.config import validate
from albor.data.bpe import (
    ALBOR_SPECIAL_TOKENS,
    ROLES_KEY,
    SPECIAL_TOKENS,
    load_tokenizer,
    plain_text,
    special_tokens,
)
from albor.data.corpus import CorpusWriter, document
from albor.errors import ArtifactError, PlanFailed, StageFailed
from albor.stage import ApplyContext, PlanContext, load_stage, run_stage
from albor.stages import split, tokenizer


@pytest.fixture
def splits_artifact(corpus_artifact: Callable[..., Path], tmp_path: Path) -> Path:
    cfg = split.Config(input=corpus_artifact(), output=tmp_path / "splits", val=0.2, test=0.1)
    return run_stage(load_stage("split"), cfg).output


def test_config_shorthand() -> None:
    cfg = validate(tokenizer.Config, {"vocab_size": "32K", "max_train_bytes": "1M"}, "t.yaml")
    assert cfg.vocab_size == 32768 and cfg.max_train_bytes == 1 << 20


def test_plan_ok_and_pure(splits_artifact: Path, tmp_path: Path) -> None:
    cfg = tokenizer.Config(input=splits_artifact, output=tmp_path / "tok", max_train_bytes=100_000)
    p = tokenizer.plan(cfg)
    assert p.ok, p.summary()
    assert p.estimates["train_bytes_used"] == 100_000 < p.estimates["train_bytes"]
    assert any("will train on 0.1 MB of the" in c.detail for c in p.checks)
    assert p.estimates["wall_time_s"] > 0
    assert not (tmp_path / "tok").exists()
    pending = tokenizer.plan(
        tokenizer.Config(input=tmp_path / "later", output=tmp_path / "tok"),
        PlanContext(pending={"input": "split"}),
    )
    assert pending.ok


def test_plan_rejects_tiny_vocab_with_fix(splits_artifact: Path, tmp_path: Path) -> None:
    p = tokenizer.plan(tokenizer.Config(input=splits_artifact, vocab_size=100, output=tmp_path))
    assert not p.ok
    [fail] = p.failures
    assert fail.name == "vocab_size" and "at least 261" in fail.detail
    with pytest.raises(PlanFailed, match="vocab_size"):
        run_stage(
            load_stage("tokenizer"),
            tokenizer.Config(input=splits_artifact, vocab_size=100, output=tmp_path / "tok"),
        )
    missing = tokenizer.plan(tokenizer.Config(input=tmp_path / "nope", output=tmp_path / "o"))
    assert not missing.ok and "not found" in missing.failures[0].detail


def test_apply_trains_verifies_and_is_idempotent(splits_artifact: Path, tmp_path: Path) -> None:
    cfg = tokenizer.Config(
        input=splits_artifact, output=tmp_path / "tok", vocab_size=1024, max_train_bytes=60_000
    )
    result = run_stage(load_stage("tokenizer"), cfg)
    assert result.status == "ran"
    out = tmp_path / "tok"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    m = read_manifest(out)["metrics"]
    val_docs = pq.read_table(splits_artifact / "val.parquet").num_rows
    assert val_docs > 0 and m["val_round_trip_documents"] == val_docs
    assert m["vocab_size"] == 1024 == m["vocab_size_requested"]
    assert 60_000 - 4 < m["train_bytes"] <= 60_000 and m["train_truncated"]
    assert 2.0 < m["bytes_per_token"] < 8.0
    tok = load_tokenizer(out)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    # albor's own layout is implied, not recorded: its files are what they were before adoption.
    assert ROLES_KEY not in (out / "tokenizer_config.json").read_text()
    assert special_tokens(out) == ALBOR_SPECIAL_TOKENS
    assert special_tokens(out).fim_ids == {"prefix": 1, "middle": 2, "suffix": 3}
    assert run_stage(load_stage("tokenizer"), cfg).status == "up to date"


def test_small_corpus_reports_vocab_shortfall(
    corpus_artifact: Callable[..., Path], tmp_path: Path
) -> None:
    texts = [(f"m{i}.py", f"x{i} = {i}\n") for i in range(30)]
    splits = run_stage(
        load_stage("split"),
        split.Config(input=corpus_artifact(texts, name="small"), output=tmp_path / "s", val=0.3),
    ).output
    cfg = tokenizer.Config(input=splits, output=tmp_path / "tok", vocab_size=4096)
    result = run_stage(load_stage("tokenizer"), cfg)
    assert result.manifest["metrics"]["vocab_size"] < 4096
    assert "below the requested 4096" in result.manifest["summary"]


def test_round_trip_failure_names_the_document(
    splits_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tokenizer that loses a character must be caught: simulate one by corrupting decode.
    from tokenizers import Tokenizer

    cfg = tokenizer.Config(input=splits_artifact, output=tmp_path / "tok", vocab_size=300)
    real_plain = plain_text

    class Lossy:
        def __init__(self, tok: Tokenizer) -> None:
            self.tok = real_plain(tok)

        def encode_batch_fast(self, texts: list[str], **kw: bool) -> object:
            return self.tok.encode_batch_fast(texts, **kw)

        def decode_batch(self, ids: list[list[int]], **kw: bool) -> list[str]:
            return [s.replace("\n", "", 1) for s in self.tok.decode_batch(ids, **kw)]

    monkeypatch.setattr(tokenizer, "plain_text", Lossy)
    val = splits_artifact / "val.parquet"
    first = pq.read_table(val).column("path")[0].as_py()
    (tmp_path / "tok").mkdir()
    with pytest.raises(StageFailed, match=f"val document '{first}'"):
        tokenizer.apply(cfg, ApplyContext(out=tmp_path / "tok", name="tokenizer", fingerprint=""))


def test_empty_train_split_fails(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    for s in ("train", "val", "test"):
        with CorpusWriter(d / f"{s}.parquet") as w:
            if s == "val":
                w.write(document("x = 1\n", "a.py", "t"))
    cfg = tokenizer.Config(input=d, output=tmp_path / "tok")
    (tmp_path / "tok").mkdir()
    with pytest.raises(ArtifactError, match="no text"):
        tokenizer.apply(cfg, ApplyContext(out=tmp_path / "tok", name="tokenizer", fingerprint=""))
