"""Token shards: dtype choice, packing, shard boundaries, and the index reader."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from albor.data.bpe import EOS_ID, plain_text, train_bpe
from albor.data.fim import FORMATS
from albor.data.shards import (
    INDEX,
    FimRecord,
    ShardWriter,
    TokenIndex,
    encode_packed,
    open_split,
    text_batches,
    token_dtype,
)
from albor.errors import ArtifactError

TEXTS = ["def f(x):\n    return x\n", "", "import os\r\n", "print('🐍')\n", "class A:\n\tpass\n"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return plain_text(train_bpe(TEXTS * 20, 300, 2))


def test_dtype_selection() -> None:
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200_000) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(2**32 + 1)
    with pytest.raises(ValueError):
        token_dtype(0)


def test_encode_packed_puts_eos_after_each_document(tok: Tokenizer) -> None:
    ids, lengths = encode_packed(tok, TEXTS, np.dtype(np.uint16))
    assert ids.dtype == np.uint16 and lengths.tolist() == [
        len(tok.encode(t).ids) + 1 for t in TEXTS
    ]
    ends = np.cumsum(lengths)
    assert (ids[ends - 1] == EOS_ID).all() and int((ids == EOS_ID).sum()) == len(TEXTS)
    starts = ends - lengths
    for text, s, e in zip(TEXTS, starts, ends, strict=True):
        assert tok.decode(ids[s : e - 1].tolist(), skip_special_tokens=False) == text
    empty, none = encode_packed(tok, [], np.dtype(np.uint32))
    assert empty.dtype == np.uint32 and len(empty) == 0 and len(none) == 0


def test_text_batches_bound_bytes_and_keep_order() -> None:
    texts = [str(i) * n for i, n in enumerate([5, 5, 20, 1, 1, 1])]
    sizes = [len(t) for t in texts]
    groups = list(text_batches(texts, sizes, max_bytes=10))
    assert [g[0] for g in groups] == [texts[0:2], texts[2:3], texts[3:6]]
    assert [t for g in groups for t in g[0]] == texts


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    shard_tokens=st.integers(1, 50),
    calls=st.integers(1, 4),
)
def test_writer_shards_sum_to_totals(
    tmp_path_factory: pytest.TempPathFactory, lengths: list[int], shard_tokens: int, calls: int
) -> None:
    root = tmp_path_factory.mktemp("shards")
    docs = [
        np.concatenate([np.full(n - 1, i + 5, np.uint16), [EOS_ID]]) for i, n in enumerate(lengths)
    ]
    sizes = [3 * n for n in lengths]
    writer = ShardWriter(root, "train", shard_tokens, np.dtype(np.uint16))
    # Feed the documents in `calls` uneven write() calls.
    cuts = sorted({0, len(docs), *(len(docs) * k // calls for k in range(1, calls))})
    for a, b in itertools.pairwise(cuts):
        writer.write(np.concatenate(docs[a:b]), np.array(lengths[a:b], np.int64), sizes[a:b])
    info = writer.close()
    assert info.tokens == sum(lengths) and info.documents == len(lengths)
    assert info.bytes == sum(sizes)
    assert all(s.tokens == shard_tokens for s in info.shards[:-1])
    assert 0 < info.shards[-1].tokens <= shard_tokens
    arrays = [np.load(root / s.path) for s in info.shards]
    assert [len(a) for a in arrays] == [s.tokens for s in info.shards]
    assert [int((a == EOS_ID).sum()) for a in arrays] == [s.documents for s in info.shards]
    np.testing.assert_array_equal(np.concatenate(arrays), np.concatenate(docs))


def _write_index(root: Path, tok: Tokenizer, shard_tokens: int) -> TokenIndex:
    dtype = token_dtype(tok.get_vocab_size())
    splits = {}
    for split, texts in (("train", TEXTS * 3), ("val", TEXTS), ("test", [])):
        writer = ShardWriter(root, split, shard_tokens, dtype)
        ids, lengths = encode_packed(tok, texts, dtype)
        writer.write(ids, lengths, [len(t.encode()) for t in texts])
        splits[split] = writer.close()
    index = TokenIndex(tok.get_vocab_size(), dtype.name, EOS_ID, "0" * 64, splits)
    index.write(root)
    return index


def test_index_load_and_open_split(tok: Tokenizer, tmp_path: Path) -> None:
    index = _write_index(tmp_path, tok, shard_tokens=16)
    data = json.loads((tmp_path / INDEX).read_text())
    assert data["format"] == 1 and data["dtype"] == "uint16" and data["eos_id"] == 0
    assert set(data["splits"]["train"]) == {"tokens", "documents", "bytes", "shards"}
    assert data["splits"]["train"]["shards"][0]["path"] == "train/shard-00000.npy"
    loaded = TokenIndex.load(tmp_path)
    assert loaded == index
    train = open_split(tmp_path, "train")
    assert len(train) == len(index.splits["train"].shards) > 1
    assert all(isinstance(a, np.memmap) and a.dtype == np.uint16 for a in train)
    assert sum(len(a) for a in train) == index.splits["train"].tokens
    assert open_split(tmp_path, "test") == [] and index.splits["test"].documents == 0


def test_index_records_fim_settings(tok: Tokenizer, tmp_path: Path) -> None:
    index = _write_index(tmp_path, tok, shard_tokens=16)
    fim = FimRecord(
        rate=0.5,
        spm_rate=0.25,
        seed=3,
        splits=["train"],
        formats=dict(FORMATS),
        documents={"train": 7, "val": 0, "test": 0},
    )
    TokenIndex(**{**index.__dict__, "fim": fim}).write(tmp_path)
    data = json.loads((tmp_path / INDEX).read_text())
    assert data["fim"] == {
        "rate": 0.5,
        "spm_rate": 0.25,
        "seed": 3,
        "splits": ["train"],
        "formats": FORMATS,
        "documents": {"train": 7, "val": 0, "test": 0},
    }
    assert TokenIndex.load(tmp_path).fim == fim
    # An index written before FIM existed has no `fim` key and still loads.
    del data["fim"]
    (tmp_path / INDEX).write_text(json.dumps(data))
    assert TokenIndex.load(tmp_path) == index and index.fim is None
    data["fim"] = {"rate": 0.5}
    (tmp_path / INDEX).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="malformed"):
        TokenIndex.load(tmp_path)


def test_reader_rejects_broken_artifacts(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no index\.json"):
        TokenIndex.load(tmp_path)
    _write_index(tmp_path, tok, shard_tokens=16)
    with pytest.raises(ArtifactError, match="no split 'dev'"):
        open_split(tmp_path, "dev")
    np.save(tmp_path / "val" / "shard-00000.npy", np.zeros(3, np.uint32))
    with pytest.raises(ArtifactError, match="index says"):
        open_split(tmp_path, "val")
    (tmp_path / "train" / "shard-00001.npy").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        open_split(tmp_path, "train")
    data = json.loads((tmp_path / INDEX).read_text())
    del data["splits"]["train"]["tokens"]
    (tmp_path / INDEX).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="malformed"):
        TokenIndex.load(tmp_path)
    (tmp_path / INDEX).write_text("{")
    with pytest.raises(ArtifactError, match="unreadable"):
        TokenIndex.load(tmp_path)
