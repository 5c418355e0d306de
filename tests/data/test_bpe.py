"""The tokenizer contract: lossless round trip, fixed special-token ids, HF-loadable files."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from albor.data.bpe import (
    EOS,
    EOS_ID,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    load_tokenizer,
    new_tokenizer,
    plain_text,
    save_hf_files,
    token_byte_lengths,
    train_bpe,
)
from albor.errors import ArtifactError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = ("textwrap.py", "heapq.py", "shlex.py", "string.py", "copy.py")
PROBE_FILE = "fnmatch.py"  # not in the training set


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [(STDLIB / name).read_text(encoding="utf-8") for name in TRAIN_FILES]
    return train_bpe(texts, 512, 2)


@pytest.fixture(scope="module")
def probe() -> str:
    return (STDLIB / PROBE_FILE).read_text(encoding="utf-8")


# Any text, plus runs of fragments that stress a byte-level tokenizer: CRLF, tabs, NUL, emoji,
# combining marks, indentation and half-written special tokens.
FRAGMENTS = ["\r\n", "\t", "\x00", "🐍", "é", "\u0301", "    ", "def ", "<|", "|>", "<|fim_pad|>"]
TEXT = st.one_of(
    st.text(),
    st.lists(st.one_of(st.characters(), st.sampled_from(FRAGMENTS))).map("".join),
)


@settings(max_examples=150, deadline=None)
@given(TEXT)
@example("\r\n\tx = 1\r\n")
@example("\x00\x01\x7f\xff")
@example("🐍 emoji and ünïcödé\u200b")
@example("   leading and trailing spaces   ")
@example("a<|endoftext|>b<|fim_prefix|>")
def test_round_trip_is_lossless(tok: Tokenizer, text: str) -> None:
    for t in (tok, plain_text(tok)):
        ids = t.encode(text).ids
        assert t.decode(ids, skip_special_tokens=False) == text
    assert None not in tok.encode(text).ids


def test_special_tokens_have_fixed_single_ids(tok: Tokenizer) -> None:
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert EOS_ID == 0 and tok.id_to_token(EOS_ID) == EOS
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t).ids == [i]
    # The saved tokenizer matches spellings in text (prompts are built that way) ...
    prompt = "<|fim_prefix|>def f(<|fim_suffix|>):<|fim_middle|>"
    assert tok.encode(prompt).ids[0] == 1 and 3 in tok.encode(prompt).ids
    # ... while data encoding treats them as text: no special id comes out of plain text.
    plain = plain_text(tok).encode("x = '<|endoftext|>' + '<|fim_pad|>'").ids
    assert min(plain) >= len(SPECIAL_TOKENS)


def test_full_byte_alphabet_and_vocab_floor(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() == 512
    every_byte = bytes(range(256)).decode("latin-1")
    ids = tok.encode(every_byte).ids
    assert tok.decode(ids) == every_byte
    with pytest.raises(ValueError, match=str(MIN_VOCAB_SIZE)):
        train_bpe(["x"], MIN_VOCAB_SIZE - 1)


def test_token_byte_lengths_sum_to_text_bytes(tok: Tokenizer, probe: str) -> None:
    lengths = token_byte_lengths(tok)
    assert lengths.shape == (tok.get_vocab_size(),)
    assert lengths[: len(SPECIAL_TOKENS)].tolist() == [0] * len(SPECIAL_TOKENS)
    for text in (probe, "naïve → 🐍\r\n\t"):
        assert int(lengths[tok.encode(text).ids].sum()) == len(text.encode("utf-8"))


def test_transformers_loads_the_same_tokenizer(tok: Tokenizer, probe: str, tmp_path: Path) -> None:
    written = save_hf_files(tok, tmp_path)
    assert sorted(p.name for p in written) == sorted(TOKENIZER_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(TOKENIZER_FILES)
    text = probe + "\r\n\tx = '🐍'\n<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"
    want = tok.encode(text).ids
    for cls in (transformers.PreTrainedTokenizerFast, transformers.AutoTokenizer):
        hf = cls.from_pretrained(tmp_path)
        assert hf.eos_token == EOS and hf.eos_token_id == EOS_ID
        assert hf.pad_token == EOS and hf.pad_token_id == EOS_ID
        assert hf(text)["input_ids"] == want
        assert hf.decode(want) == text
        assert hf.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4]


def test_load_tokenizer_round_trips_and_rejects_bad_dirs(tok: Tokenizer, tmp_path: Path) -> None:
    save_hf_files(tok, tmp_path / "ok")
    assert load_tokenizer(tmp_path / "ok").to_str() == tok.to_str()
    with pytest.raises(ArtifactError, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not a readable tokenizer"):
        load_tokenizer(tmp_path / "bad")
    (tmp_path / "foreign").mkdir()
    new_tokenizer().save(str(tmp_path / "foreign" / "tokenizer.json"))
    with pytest.raises(ArtifactError, match="special token"):
        load_tokenizer(tmp_path / "foreign")
