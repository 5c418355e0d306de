"""FIM transform: the layouts, the round trip (text and token level), seeding and rates."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from albor.data.bpe import (
    EOS_ID,
    FIM_MIDDLE_ID,
    FIM_PAD_ID,
    FIM_PREFIX_ID,
    FIM_SUFFIX_ID,
    plain_text,
    train_bpe,
)
from albor.data.fim import (
    FORMATS,
    ORDER,
    SENTINEL_IDS,
    SENTINELS,
    Draw,
    FimSettings,
    Mode,
    Pieces,
    arrange,
    encode_packed_fim,
    join,
    pieces_ids,
    prompt_ids,
    render,
    split_points,
    to_pieces,
)
from albor.data.shards import encode_packed

TEXTS = ["def f(x):\n    return x\n", "", "import os\r\n", "print('🐍')\n", "class A:\n\tpass\n"]
SENTINEL_SET = set(SENTINEL_IDS.values())
modes = st.sampled_from(["psm", "spm"])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return plain_text(train_bpe(TEXTS * 20, 300, 2))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def forced(mode: Mode, seed: int) -> FimSettings:
    """Settings that transform every document, always in `mode`."""
    return FimSettings(rate=1.0, spm_rate=1.0 if mode == "spm" else 0.0, seed=seed)


def test_formats_are_the_documented_layouts() -> None:
    assert FORMATS == {
        "psm": "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>{middle}",
        "spm": "<|fim_suffix|>{suffix}<|fim_prefix|>{prefix}<|fim_middle|>{middle}",
    }
    assert SENTINEL_IDS == {"prefix": FIM_PREFIX_ID, "suffix": FIM_SUFFIX_ID, "middle": 2}
    assert (FIM_PREFIX_ID, FIM_MIDDLE_ID, FIM_SUFFIX_ID) == (1, 2, 3)
    pieces = Pieces("a", "b", "c")
    assert render(pieces, "psm") == "<|fim_prefix|>a<|fim_suffix|>c<|fim_middle|>b"
    assert render(pieces, "spm") == "<|fim_suffix|>c<|fim_prefix|>a<|fim_middle|>b"


@settings(max_examples=300, deadline=None)
@given(length=st.integers(0, 10**9), a=st.integers(0, 2**64 - 1), b=st.integers(0, 2**64 - 1))
def test_split_points_are_sorted_and_in_range(length: int, a: int, b: int) -> None:
    lo, hi = split_points(length, a, b)
    assert 0 <= lo <= hi <= length
    assert split_points(length, 0, 2**64 - 1) == (0, length)


@settings(max_examples=300, deadline=None)
@given(text=st.text(), seed=st.integers(0, 2**63), position=st.integers(0, 10**9), mode=modes)
@example(text="", seed=0, position=0, mode="psm")
@example(text="x", seed=1, position=0, mode="spm")
@example(text="<|fim_prefix|>a<|endoftext|>\r\n🐍é", seed=2, position=3, mode="psm")
def test_text_round_trip(text: str, seed: int, position: int, mode: Mode) -> None:
    d = forced(mode, seed).draw(len(text), sha(text), position)
    assert d is not None and d.mode == mode
    pieces = to_pieces(text, d.lo, d.hi)
    assert join(pieces) == text
    arranged = arrange(pieces, mode)
    assert [slot for slot, _ in arranged] == list(ORDER[mode]) and arranged[-1][0] == "middle"
    # Remove the sentinels, put the pieces back in document order: the document again.
    by_slot = dict(arranged)
    assert by_slot["prefix"] + by_slot["middle"] + by_slot["suffix"] == text
    shown = render(pieces, mode)
    if not any(s in text for s in SENTINELS.values()):
        # Without sentinel spellings in the document, the text form parses back unambiguously.
        rest = shown
        parsed: dict[str, str] = {}
        for i, slot in enumerate(ORDER[mode]):
            assert rest.startswith(SENTINELS[slot])
            rest = rest[len(SENTINELS[slot]) :]
            if i + 1 < len(ORDER[mode]):
                piece, _, tail = rest.partition(SENTINELS[ORDER[mode][i + 1]])
                parsed[slot], rest = piece, SENTINELS[ORDER[mode][i + 1]] + tail
            else:
                parsed[slot] = rest
        assert join(Pieces(parsed["prefix"], parsed["middle"], parsed["suffix"])) == text


def _decode_fim(tok: Tokenizer, ids: list[int]) -> tuple[list[int], dict[int, str]]:
    """The sentinels of one FIM example in order, and the decoded piece after each."""
    sentinels: list[int] = []
    pieces: dict[int, list[int]] = {}
    for i in ids:
        if i in SENTINEL_SET:
            sentinels.append(i)
            pieces[i] = []
        else:
            pieces[sentinels[-1]].append(i)
    return sentinels, {s: tok.decode(p, skip_special_tokens=False) for s, p in pieces.items()}


@settings(max_examples=200, deadline=None)
@given(text=st.text(), seed=st.integers(0, 2**63), mode=modes)
@example(text="", seed=0, mode="psm")
@example(text="é", seed=0, mode="spm")
@example(text="x = '<|fim_prefix|><|fim_middle|><|endoftext|>'\n", seed=5, mode="spm")
def test_token_round_trip(tok: Tokenizer, text: str, seed: int, mode: Mode) -> None:
    d = forced(mode, seed).draw(len(text), sha(text), 0)
    assert d is not None
    ids = pieces_ids(tok, to_pieces(text, d.lo, d.hi), mode)
    # Exactly one of each sentinel, in the layout's order; no other special id.
    sentinels, decoded = _decode_fim(tok, ids)
    assert sentinels == [SENTINEL_IDS[slot] for slot in ORDER[mode]]
    assert EOS_ID not in ids and FIM_PAD_ID not in ids
    assert decoded[FIM_PREFIX_ID] + decoded[FIM_MIDDLE_ID] + decoded[FIM_SUFFIX_ID] == text
    # The packer produces exactly these ids, then the EOS.
    packed, lengths = encode_packed_fim(tok, [text], [d], np.dtype(np.uint16))
    assert packed.tolist() == [*ids, EOS_ID] and lengths.tolist() == [len(ids) + 1]


def test_rate_zero_is_identical_to_no_fim(tok: Tokenizer) -> None:
    off = FimSettings(rate=0.0, seed=3)
    draws = [off.draw(len(t), sha(t), i) for i, t in enumerate(TEXTS * 50)]
    assert draws == [None] * len(draws)
    dtype = np.dtype(np.uint16)
    got = encode_packed_fim(tok, TEXTS * 50, draws, dtype)
    want = encode_packed(tok, TEXTS * 50, dtype)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_rate_one_transforms_every_document(tok: Tokenizer) -> None:
    every = FimSettings(rate=1.0, spm_rate=0.5, seed=0)
    texts = TEXTS * 40
    draws = [every.draw(len(t), sha(t), i) for i, t in enumerate(texts)]
    assert all(d is not None for d in draws)
    assert {d.mode for d in draws if d is not None} == {"psm", "spm"}
    ids, lengths = encode_packed_fim(tok, texts, draws, np.dtype(np.uint16))
    ends = np.cumsum(lengths)
    assert (ids[ends - 1] == EOS_ID).all() and int((ids == EOS_ID).sum()) == len(texts)
    for text, d, end, n in zip(texts, draws, ends, lengths, strict=True):
        assert d is not None
        sentinels, decoded = _decode_fim(tok, ids[end - n : end - 1].tolist())
        assert sentinels == [SENTINEL_IDS[slot] for slot in ORDER[d.mode]]
        assert decoded[FIM_PREFIX_ID] + decoded[FIM_MIDDLE_ID] + decoded[FIM_SUFFIX_ID] == text


def test_mixed_batch_packs_plain_and_fim_in_order(tok: Tokenizer) -> None:
    draws: list[Draw | None] = [None, Draw(0, 0, "psm"), None, Draw(2, 5, "spm"), None]
    ids, lengths = encode_packed_fim(tok, TEXTS, draws, np.dtype(np.uint32))
    assert ids.dtype == np.uint32
    start = 0
    for text, d, n in zip(TEXTS, draws, lengths.tolist(), strict=True):
        doc = ids[start : start + n].tolist()
        start += n
        assert doc[-1] == EOS_ID
        if d is None:
            assert doc[:-1] == tok.encode(text).ids
        else:
            assert doc[:-1] == pieces_ids(tok, to_pieces(text, d.lo, d.hi), d.mode)
    with pytest.raises(ValueError, match="one draw per text"):
        encode_packed_fim(tok, TEXTS, draws[:2], np.dtype(np.uint16))


def test_empirical_rates_and_uniform_cuts() -> None:
    fim = FimSettings(rate=0.3, spm_rate=0.25, seed=11)
    n, length = 6000, 1000
    draws = [fim.draw(length, sha(str(i)), 0) for i in range(n)]
    chosen = [d for d in draws if d is not None]
    assert abs(len(chosen) / n - 0.3) < 0.03  # 5 standard deviations
    spm = sum(d.mode == "spm" for d in chosen) / len(chosen)
    assert abs(spm - 0.25) < 0.05
    # Two sorted uniform cuts: E[lo] = 1/3, E[hi] = 2/3 of the length.
    assert abs(np.mean([d.lo for d in chosen]) / length - 1 / 3) < 0.03
    assert abs(np.mean([d.hi for d in chosen]) / length - 2 / 3) < 0.03


def test_draws_are_seeded_by_seed_content_and_position() -> None:
    a, b = FimSettings(0.5, seed=1), FimSettings(0.5, seed=2)
    keys = [(sha(str(i)), i) for i in range(200)]
    first = [a.draw(100, h, p) for h, p in keys]
    assert first == [FimSettings(0.5, seed=1).draw(100, h, p) for h, p in keys]
    assert first != [b.draw(100, h, p) for h, p in keys]
    # The same document at another position (an upsampled copy) gets its own draw.
    same_doc = [a.draw(100, sha("x"), p) for p in range(200)]
    assert len(set(same_doc)) > 50
    with pytest.raises(ValueError, match="rate"):
        FimSettings(rate=1.5)


def test_prompt_ids_follow_the_training_layout(tok: Tokenizer) -> None:
    pre, suf = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    enc = [tok.encode(pre).ids, tok.encode(suf).ids]
    psm = [FIM_PREFIX_ID, *enc[0], FIM_SUFFIX_ID, *enc[1], FIM_MIDDLE_ID]
    spm = [FIM_SUFFIX_ID, *enc[1], FIM_PREFIX_ID, *enc[0], FIM_MIDDLE_ID]
    assert prompt_ids(tok, pre, suf) == psm
    assert prompt_ids(tok, pre, suf, "spm") == spm
    # A training example of the same cut starts with exactly the prompt.
    text = pre + "a + b" + suf
    example_ids = pieces_ids(tok, to_pieces(text, len(pre), len(pre) + 5), "psm")
    assert example_ids[: len(psm)] == psm
