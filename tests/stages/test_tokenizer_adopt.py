"""The tokenizer stage adopting a public-style tokenizer (built here with `tokenizers` and saved
with transformers, as a downloaded model directory would be) instead of training one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import trainers as tok_trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from albor.artifact import sha256_file
from albor.data.bpe import (
    ALBOR_SPECIAL_TOKENS,
    SpecialTokens,
    load_tokenizer,
    plain_text,
    special_tokens,
)
from albor.data.shards import TokenIndex, open_split
from albor.errors import PlanFailed, StageFailed
from albor.stage import load_stage, run_stage, verify_artifact
from albor.stages import split, tokenize, tokenizer

STARCODER = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]
QWEN = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
FILES = ["manifest.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def public_tokenizer(
    directory: Path,
    texts: list[str],
    specials: list[str],
    *,
    appended: bool = False,
    normalizer: normalizers.Normalizer | None = None,
) -> Path:
    """A byte-level BPE of about 400 tokens saved by transformers' save_pretrained.

    StarCoder-style (`appended=False`): the specials are special tokens at ids 0.. in list order.
    Qwen-style (`appended=True`): eos is special and appended after the merges; the FIM tokens
    follow it as added tokens NOT flagged special, as in Qwen2.5-Coder's tokenizer.json.
    """
    tok = Tokenizer(models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = tok_trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[] if appended else specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    extra: dict[str, list[str]] = {}
    if appended:
        tok.add_special_tokens([specials[0]])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in specials[1:]])
    else:
        extra["additional_special_tokens"] = specials[1:]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], **extra)
    fast.save_pretrained(str(directory))
    return directory


@pytest.fixture
def splits_artifact(corpus_artifact: Callable[..., Path], tmp_path: Path) -> Path:
    cfg = split.Config(input=corpus_artifact(), output=tmp_path / "splits", val=0.2, test=0.1)
    return run_stage(load_stage("split"), cfg).output


@pytest.fixture
def texts(stdlib_texts: list[tuple[str, str]]) -> list[str]:
    return [t for _, t in stdlib_texts]


def _adopt(splits: Path, source: Path, out: Path) -> tokenizer.Config:
    return tokenizer.Config(input=splits, adopt=source, output=out)


def test_adopt_starcoder_style(splits_artifact: Path, texts: list[str], tmp_path: Path) -> None:
    source = public_tokenizer(tmp_path / "public", texts, STARCODER)
    cfg = _adopt(splits_artifact, source, tmp_path / "tok")
    p = tokenizer.plan(cfg)
    assert p.ok, p.summary()
    assert [c.name for c in p.checks if c.status != "ok"] == []
    assert "fim_prefix <fim_prefix> (id 1)" in next(c.detail for c in p.checks if c.name == "adopt")
    result = run_stage(load_stage("tokenizer"), cfg)
    out = result.output
    assert sorted(f.name for f in out.iterdir()) == FILES
    # The same bytes: the identity distill compares with the teacher's tokenizer.json.
    assert (out / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    m = result.manifest["metrics"]
    src_tok = Tokenizer.from_file(str(source / "tokenizer.json"))
    assert m["tokenizer_sha256"] == sha256_file(source / "tokenizer.json")
    assert m["vocab_size"] == src_tok.get_vocab_size() == 400
    assert m["special_tokens"] == {
        role: {"token": t, "id": i}
        for i, (role, t) in enumerate(zip(ALBOR_SPECIAL_TOKENS.tokens, STARCODER, strict=True))
    }
    val_docs = pq.read_table(splits_artifact / "val.parquet").num_rows
    assert val_docs > 0 and m["val_round_trip_documents"] == val_docs
    assert [e["name"] for e in result.manifest["inputs"]] == ["input", "adopt"]

    specials = special_tokens(out)
    assert specials.tokens == dict(zip(ALBOR_SPECIAL_TOKENS.tokens, STARCODER, strict=True))
    assert specials.fim_ids == {"prefix": 1, "middle": 2, "suffix": 3}
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == 400
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto.eos_token == "<|endoftext|>" and auto.pad_token == "<|endoftext|>"
    assert auto.convert_tokens_to_ids(STARCODER) == [0, 1, 2, 3, 4]
    sample = texts[0][:2000]
    ids = auto(sample, add_special_tokens=False)["input_ids"]
    assert ids == tok.encode(sample, add_special_tokens=False).ids
    assert auto.decode(ids) == sample

    assert run_stage(load_stage("tokenizer"), cfg).status == "up to date"
    assert verify_artifact(out)["sources"] == []
    # A changed source tokenizer re-runs the stage and shows as drift of the artifact.
    public_tokenizer(source, texts[1:], STARCODER)
    assert verify_artifact(out)["sources"] == [f"adopt: {source} (changed)"]
    assert run_stage(load_stage("tokenizer"), cfg).status == "ran"


def _fim_documents(
    out: Path, specials: SpecialTokens
) -> tuple[list[list[int]], list[str], set[tuple[int, ...]]]:
    """Train documents of a tokenize artifact: sentinel orders, texts put back, layouts seen."""
    tok = load_tokenizer(out)
    fim = specials.fim_ids
    sentinels = set(fim.values())
    stream = np.concatenate(open_split(out, "train"))
    docs = np.split(stream, np.flatnonzero(stream == specials.eos_id) + 1)[:-1]
    orders: list[list[int]] = []
    texts: list[str] = []
    for doc in docs:
        order: list[int] = []
        pieces: dict[int, list[int]] = {}
        for i in doc[:-1].tolist():
            if i in sentinels:
                order.append(i)
                pieces[i] = []
            else:
                pieces[order[-1]].append(i)
        orders.append(order)
        texts.append("".join(tok.decode(pieces[fim[s]]) for s in ("prefix", "middle", "suffix")))
    return orders, texts, {tuple(o) for o in orders}


def _tokenize_with_fim(splits: Path, tok_dir: Path, out: Path) -> SpecialTokens:
    cfg = tokenize.Config(corpus=splits, tokenizer=tok_dir, output=out, fim={"rate": 1.0})
    run_stage(load_stage("tokenize"), cfg)
    specials = special_tokens(out)
    index = TokenIndex.load(out)
    assert index.eos_id == specials.eos_id
    assert index.vocab_size == load_tokenizer(tok_dir).get_vocab_size()
    orders, decoded, layouts = _fim_documents(out, specials)
    train = pq.read_table(splits / "train.parquet").column("text").to_pylist()
    assert decoded == train
    fim = specials.fim_ids
    psm = [fim["prefix"], fim["suffix"], fim["middle"]]
    spm = [fim["suffix"], fim["prefix"], fim["middle"]]
    assert all(o in (psm, spm) for o in orders) and len(layouts) == 2
    return specials


def test_tokenize_runs_on_adopted_starcoder_layout(
    splits_artifact: Path, texts: list[str], tmp_path: Path
) -> None:
    source = public_tokenizer(tmp_path / "public", texts, STARCODER)
    tok_dir = run_stage(load_stage("tokenizer"), _adopt(splits_artifact, source, tmp_path / "s"))
    specials = _tokenize_with_fim(splits_artifact, tok_dir.output, tmp_path / "shards")
    assert specials.tokens["fim_middle"] == "<fim_middle>"


def test_adopt_qwen_style_ids_after_the_merges(
    splits_artifact: Path, texts: list[str], tmp_path: Path
) -> None:
    source = public_tokenizer(tmp_path / "public", texts, QWEN, appended=True)
    cfg = _adopt(splits_artifact, source, tmp_path / "q")
    result = run_stage(load_stage("tokenizer"), cfg)
    specials = special_tokens(result.output)
    # Trained to 400 tokens, then eos and the FIM tokens appended: ids 400..404.
    assert dict(specials.ids) == dict(
        zip(ALBOR_SPECIAL_TOKENS.tokens, range(400, 405), strict=True)
    )
    assert result.manifest["metrics"]["vocab_size"] == 405
    auto = AutoTokenizer.from_pretrained(str(result.output))
    assert auto.convert_tokens_to_ids(QWEN) == list(range(400, 405))
    # The FIM tokens are not flagged special in the source, yet data encoding keeps their
    # spellings as text: a sentinel id in the shards only ever comes from the FIM transform.
    plain = plain_text(load_tokenizer(result.output))
    ids = plain.encode("x = '<|fim_prefix|><|endoftext|>'", add_special_tokens=False).ids
    assert not set(ids) & set(specials.ids.values())


def test_tokenize_runs_on_adopted_qwen_layout(
    splits_artifact: Path, texts: list[str], tmp_path: Path
) -> None:
    source = public_tokenizer(tmp_path / "public", texts, QWEN, appended=True)
    tok_dir = run_stage(load_stage("tokenizer"), _adopt(splits_artifact, source, tmp_path / "q"))
    _tokenize_with_fim(splits_artifact, tok_dir.output, tmp_path / "shards")


def test_adopt_refuses_a_tokenizer_without_fim_tokens(
    splits_artifact: Path, texts: list[str], tmp_path: Path
) -> None:
    source = public_tokenizer(tmp_path / "public", texts, ["<|endoftext|>"])
    cfg = _adopt(splits_artifact, source, tmp_path / "tok")
    p = tokenizer.plan(cfg)
    [fail] = p.failures
    assert fail.name == "adopt"
    assert "no fim_prefix (<|fim_prefix|> or <fim_prefix>)" in fail.detail
    assert "no fim_suffix" in fail.detail and "no eos" not in fail.detail
    assert "train one: remove `adopt`" in fail.detail
    with pytest.raises(PlanFailed, match="no fim_prefix"):
        run_stage(load_stage("tokenizer"), cfg)
    assert not (tmp_path / "tok").exists()


def test_adopt_plan_names_missing_paths_and_ignored_settings(
    splits_artifact: Path, texts: list[str], tmp_path: Path
) -> None:
    missing = tokenizer.plan(_adopt(splits_artifact, tmp_path / "nowhere", tmp_path / "o"))
    [fail] = missing.failures
    assert f"adopt: {tmp_path / 'nowhere'} is not a directory" in fail.detail
    (tmp_path / "empty").mkdir()
    empty = tokenizer.plan(_adopt(splits_artifact, tmp_path / "empty", tmp_path / "o"))
    assert f"{tmp_path / 'empty'} has no tokenizer.json" in empty.failures[0].detail

    source = public_tokenizer(tmp_path / "public", texts, STARCODER)
    cfg = tokenizer.Config(
        input=splits_artifact, adopt=source, output=tmp_path / "o", vocab_size=1024
    )
    p = tokenizer.plan(cfg)
    assert p.ok
    [warn] = [c for c in p.checks if c.status == "warn"]
    assert warn.name == "training settings" and warn.detail.startswith("vocab_size ignored")


def test_adopt_fails_the_round_trip_of_a_lowercasing_tokenizer(
    splits_artifact: Path, texts: list[str], tmp_path: Path
) -> None:
    source = public_tokenizer(
        tmp_path / "public", texts, STARCODER, normalizer=normalizers.Lowercase()
    )
    cfg = _adopt(splits_artifact, source, tmp_path / "tok")
    p = tokenizer.plan(cfg)
    assert p.ok and [c.name for c in p.checks if c.status == "warn"] == ["normalizer"]
    val = pq.read_table(splits_artifact / "val.parquet")
    first = next(
        (path, text)
        for path, text in zip(
            val.column("path").to_pylist(), val.column("text").to_pylist(), strict=True
        )
        if text != text.lower()
    )
    at = next(i for i, c in enumerate(first[1]) if c != c.lower())
    with pytest.raises(StageFailed) as e:
        run_stage(load_stage("tokenizer"), cfg)
    message = str(e.value)
    assert f"val document '{first[0]}'" in message and f"at character {at} " in message
    assert "remove `adopt`" in message
    assert not (tmp_path / "tok").exists()
