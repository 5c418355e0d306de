from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from albor.artifact import read_manifest, sha256_file
from albor.config import validate
from albor.data.bpe import EOS_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID, load_tokenizer
from albor.data.fim import FORMATS
from albor.data.shards import TokenIndex, open_split
from albor.errors import ConfigError
from albor.stage import PlanContext, load_stage, run_stage
from albor.stages import split, tokenize, tokenizer

SPLITS = ("train", "val", "test")
SENTINELS = (FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID)


@pytest.fixture
def inputs(
    corpus_artifact: Callable[..., Path], stdlib_texts: list[tuple[str, str]], tmp_path: Path
) -> tuple[Path, Path]:
    """A split artifact and a 512-token tokenizer trained on it; one document holds the spelling
    of a special token, which must come out of the shards as plain text."""
    texts = [*stdlib_texts, ("special.py", "EOS = '<|endoftext|>'\r\n\tx = '🐍'\n"), ("e.py", "")]
    splits = run_stage(
        load_stage("split"),
        split.Config(input=corpus_artifact(texts), output=tmp_path / "splits", val=0.2, test=0.2),
    ).output
    tok = run_stage(
        load_stage("tokenizer"),
        tokenizer.Config(input=splits, output=tmp_path / "tok", vocab_size=512),
    ).output
    return splits, tok


def test_config_validation() -> None:
    cfg = validate(tokenize.Config, {"shard_tokens": "1M", "splits": ["val"]}, "t.yaml")
    assert cfg.shard_tokens == 1 << 20 and cfg.splits == ["val"]
    with pytest.raises(ConfigError, match="twice"):
        validate(tokenize.Config, {"splits": ["val", "val"]}, "t.yaml")
    with pytest.raises(ConfigError, match="splits"):
        validate(tokenize.Config, {"splits": ["dev"]}, "t.yaml")
    fim = validate(tokenize.Config, {"fim": {"rate": 0.5}}, "t.yaml").fim
    assert (fim.rate, fim.spm_rate, fim.seed, fim.splits) == (0.5, 0.5, 0, ["train"])
    assert tokenize.Config().fim.rate == 0.0  # off by default
    with pytest.raises(ConfigError, match=r"fim\.rate"):
        validate(tokenize.Config, {"fim": {"rate": 1.5}}, "t.yaml")
    with pytest.raises(ConfigError, match=r"fim\.splits.*twice"):
        validate(tokenize.Config, {"fim": {"splits": ["train", "train"]}}, "t.yaml")
    with pytest.raises(ConfigError, match=r"fim\.rat: unknown key \(did you mean 'rate'"):
        validate(tokenize.Config, {"fim": {"rat": 0.5}}, "t.yaml")


def test_plan_estimates_and_checks(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    splits, tok = inputs
    p = tokenize.plan(tokenize.Config(corpus=splits, tokenizer=tok, output=tmp_path / "out"))
    assert p.ok, p.summary()
    assert p.estimates["dtype"] == "uint16"
    bpt = read_manifest(tok)["metrics"]["bytes_per_token"]
    assert p.estimates["bytes_per_token"] == bpt
    assert set(p.estimates["tokens"]) == set(SPLITS) and p.estimates["disk_bytes"] > 0
    assert p.estimates["fim"]["rate"] == 0.0 and p.estimates["fim"]["splits"] == []
    assert not (tmp_path / "out").exists()
    on = tokenize.plan(
        tokenize.Config(
            corpus=splits, tokenizer=tok, output=tmp_path / "out", fim={"rate": 0.5, "seed": 7}
        )
    )
    assert on.ok, on.summary()
    fim = on.estimates["fim"]
    assert (fim["rate"], fim["spm_rate"], fim["seed"], fim["splits"]) == (0.5, 0.5, 7, ["train"])
    assert fim["formats"] == FORMATS
    docs = on.estimates["documents"]
    assert fim["documents"] == {"train": round(docs["train"] / 2), "val": 0, "test": 0}
    assert on.estimates["tokens"]["train"] == p.estimates["tokens"]["train"] + 3 * round(
        docs["train"] / 2
    )
    assert any("FIM" in a for a in on.actions)
    nowhere = tokenize.plan(
        tokenize.Config(
            corpus=splits, tokenizer=tok, output=tmp_path / "o", splits=["val"], fim={"rate": 1}
        )
    )
    assert [c.name for c in nowhere.checks if c.status == "warn"] == ["fim"]
    pending = tokenize.plan(
        tokenize.Config(corpus=tmp_path / "a", tokenizer=tmp_path / "b", output=tmp_path / "o"),
        PlanContext(pending={"corpus": "split", "tokenizer": "tokenizer"}),
    )
    assert pending.ok
    wrong = tokenize.plan(tokenize.Config(corpus=splits, tokenizer=splits, output=tmp_path / "o"))
    assert [c.name for c in wrong.failures] == ["tokenizer"]
    assert "lacks tokenizer.json" in wrong.failures[0].detail


def _documents(splits: Path, name: str) -> list[str]:
    texts: list[str] = pq.read_table(splits / f"{name}.parquet").column("text").to_pylist()
    return texts


def test_apply_shards_reproduce_every_document(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    splits, tok_dir = inputs
    out = tmp_path / "tokens"
    cfg = tokenize.Config(corpus=splits, tokenizer=tok_dir, output=out, shard_tokens=500)
    result = run_stage(load_stage("tokenize"), cfg)
    assert result.status == "ran"

    index = TokenIndex.load(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    shard_files = [s.path for name in SPLITS for s in index.splits[name].shards]
    assert files == sorted(
        [
            "index.json",
            "manifest.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json",
            *shard_files,
        ]
    )
    assert index.dtype == "uint16" and index.eos_id == EOS_ID == 0
    assert index.fim is not None and index.fim.rate == 0.0
    assert index.fim.documents == {"train": 0, "val": 0, "test": 0}
    assert index.vocab_size == 512
    assert index.tokenizer_sha256 == sha256_file(tok_dir / "tokenizer.json")
    assert json.loads((out / "index.json").read_text())["format"] == 1

    tok = load_tokenizer(out)
    for name in SPLITS:
        info = index.splits[name]
        arrays = open_split(out, name)
        assert all(a.dtype == np.uint16 for a in arrays)
        assert len(arrays) == len(info.shards) > 0 and all(len(a) <= 500 for a in arrays)
        assert info.tokens == sum(s.tokens for s in info.shards) == sum(len(a) for a in arrays)
        assert info.documents == sum(s.documents for s in info.shards)
        assert info.bytes == sum(s.bytes for s in info.shards)
        docs = _documents(splits, name)
        assert info.bytes == sum(len(d.encode("utf-8")) for d in docs)
        stream = np.concatenate(arrays)
        assert stream[-1] == EOS_ID
        pieces = np.split(stream, np.flatnonzero(stream == EOS_ID) + 1)[:-1]
        decoded = [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]
        assert decoded == docs  # every document, exactly, in corpus order
        assert not np.isin(stream, SENTINELS).any()
    assert index.splits["train"].documents > 0 and len(index.splits["train"].shards) > 1

    m = result.manifest
    assert (
        m["counts"]["in"] == m["counts"]["kept"] == sum(index.splits[s].documents for s in SPLITS)
    )
    assert m["metrics"]["tokens"] == {s: index.splits[s].tokens for s in SPLITS}
    assert m["metrics"]["mb_per_s"] > 0
    assert run_stage(load_stage("tokenize"), cfg).status == "up to date"


def test_apply_one_split_with_one_shard(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    splits, tok_dir = inputs
    out = tmp_path / "val_only"
    cfg = tokenize.Config(corpus=splits, tokenizer=tok_dir, output=out, splits=["val"])
    run_stage(load_stage("tokenize"), cfg)
    index = TokenIndex.load(out)
    assert list(index.splits) == ["val"]
    assert [s.path for s in index.splits["val"].shards] == ["val/shard-00000.npy"]
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json",
        "manifest.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "val",
    ]


def _reassemble(tok: Tokenizer, doc: np.ndarray) -> tuple[list[int], str]:
    """The sentinel ids of one packed document (EOS dropped) in order, and its pieces decoded and
    put back in document order (prefix, middle, suffix)."""
    order: list[int] = []
    pieces: dict[int, list[int]] = {}
    for i in doc.tolist():
        if i in SENTINELS:
            order.append(i)
            pieces[i] = []
        else:
            pieces[order[-1]].append(i)
    text = "".join(
        tok.decode(pieces[s], skip_special_tokens=False)
        for s in (FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID)
    )
    return order, text


def test_apply_fim_rate_one_on_train(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    splits, tok_dir = inputs
    out = tmp_path / "fim"
    cfg = tokenize.Config(
        corpus=splits, tokenizer=tok_dir, output=out, shard_tokens=700, fim={"rate": 1.0}
    )
    result = run_stage(load_stage("tokenize"), cfg)
    index = TokenIndex.load(out)
    train_docs = _documents(splits, "train")
    assert index.fim is not None
    assert (index.fim.rate, index.fim.spm_rate, index.fim.seed) == (1.0, 0.5, 0)
    assert index.fim.splits == ["train"] and index.fim.formats == FORMATS
    assert index.fim.documents == {"train": len(train_docs), "val": 0, "test": 0}
    saved = json.loads((out / "index.json").read_text())["fim"]
    assert saved["documents"]["train"] == len(train_docs)

    tok = load_tokenizer(out)
    stream = np.concatenate(open_split(out, "train"))
    docs = np.split(stream, np.flatnonzero(stream == EOS_ID) + 1)[:-1]
    assert len(docs) == len(train_docs) == index.splits["train"].documents
    layouts = set()
    for doc, source in zip(docs, train_docs, strict=True):
        order, text = _reassemble(tok, doc[:-1])
        # Exactly one of each sentinel, PSM or SPM order, and the source document back.
        psm, spm = [FIM_PREFIX_ID, FIM_SUFFIX_ID, FIM_MIDDLE_ID], [FIM_SUFFIX_ID, FIM_PREFIX_ID]
        assert order in (psm, [*spm, FIM_MIDDLE_ID])
        layouts.add(tuple(order))
        assert text == source
    assert len(layouts) == 2  # both layouts at spm_rate 0.5
    for name in ("val", "test"):  # untouched: plain documents, no sentinel
        plain = np.concatenate(open_split(out, name))
        assert not np.isin(plain, SENTINELS).any()
        pieces = np.split(plain, np.flatnonzero(plain == EOS_ID) + 1)[:-1]
        decoded = [tok.decode(p[:-1].tolist(), skip_special_tokens=False) for p in pieces]
        assert decoded == _documents(splits, name)

    m = result.manifest["metrics"]
    assert m["fim_documents"] == {"train": len(train_docs), "val": 0, "test": 0}
    text_tokens = index.splits["train"].tokens - 4 * len(train_docs)  # EOS + 3 sentinels each
    assert m["bytes_per_token"]["train"] == round(index.splits["train"].bytes / text_tokens, 4)
    # Deterministic: the same settings give the same shards; another seed cuts elsewhere.
    again = run_stage(
        load_stage("tokenize"),
        tokenize.Config(**{**cfg.model_dump(), "output": tmp_path / "fim2"}),
    ).output
    assert all(
        np.array_equal(a, b)
        for a, b in zip(open_split(out, "train"), open_split(again, "train"), strict=True)
    )
    other = run_stage(
        load_stage("tokenize"),
        tokenize.Config(
            **{**cfg.model_dump(), "output": tmp_path / "fim3", "fim": {"rate": 1.0, "seed": 1}}
        ),
    ).output
    assert not np.array_equal(np.concatenate(open_split(other, "train")), stream)
