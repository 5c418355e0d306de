"""Fill-in-the-middle (Bavarian et al. 2022): the one FIM layout of albor, and the transform that
turns a training document into a FIM example before packing.

The layout (sentinel ids 0..4 from `albor.data.bpe`, each sentinel followed by its piece, the middle
always last, so the model learns to generate the middle and then EOS):

    PSM  <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>{middle}<|endoftext|>
    SPM  <|fim_suffix|>{suffix}<|fim_prefix|>{prefix}<|fim_middle|>{middle}<|endoftext|>

SPM is the order llama.cpp's server builds with `--spm-infill` (and llama-cpp-python with
`spm_infill=True`): suffix tokens, prefix tokens, then `<|fim_middle|>`, so a GGUF export serves
both modes with llama.cpp unchanged. (StarCoder's training used the paper's SPM "variant 2",
`<|fim_prefix|><|fim_suffix|>{suffix}<|fim_middle|>{prefix}{middle}`, which no llama.cpp prompt
produces; albor does not use it.) The EOS is the packer's document separator, not part of
`pieces_ids`.

Span choice is character-level: two cut points drawn uniformly over the character positions
0..len(text), sorted, give prefix / middle / suffix (any of them may be empty). Every random choice
of a document comes from sha256(seed, document sha256, position of the document in its split),
so reruns give identical shards, and the copies of an upsampled document (same sha256, different
positions) get independent spans, as separate epochs of a document would.

Pieces are encoded separately with the plain-text tokenizer (`bpe.plain_text`) and the sentinel ids
inserted between them, so a document that contains the spelling `<|fim_prefix|>` stays plain text:
sentinel ids in a shard only ever come from this transform.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from albor.data.bpe import (
    EOS_ID,
    FIM_MIDDLE,
    FIM_MIDDLE_ID,
    FIM_PREFIX,
    FIM_PREFIX_ID,
    FIM_SUFFIX,
    FIM_SUFFIX_ID,
)

Mode = Literal["psm", "spm"]
Slot = Literal["prefix", "middle", "suffix"]
MODES: tuple[Mode, ...] = ("psm", "spm")

# The single definition of the layout: which piece comes in which order, each after its sentinel.
ORDER: dict[Mode, tuple[Slot, Slot, Slot]] = {
    "psm": ("prefix", "suffix", "middle"),
    "spm": ("suffix", "prefix", "middle"),
}
SENTINEL_IDS: dict[Slot, int] = {
    "prefix": FIM_PREFIX_ID,
    "suffix": FIM_SUFFIX_ID,
    "middle": FIM_MIDDLE_ID,
}
SENTINELS: dict[Slot, str] = {"prefix": FIM_PREFIX, "suffix": FIM_SUFFIX, "middle": FIM_MIDDLE}
SENTINELS_PER_DOCUMENT = len(SENTINEL_IDS)

FORMATS: dict[Mode, str] = {
    mode: "".join(f"{SENTINELS[slot]}{{{slot}}}" for slot in ORDER[mode]) for mode in MODES
}
"""The layouts as format strings (without the packer's EOS), for index.json, plans and docs."""

_TWO_64 = 1 << 64


class Pieces(NamedTuple):
    """A document cut in three; `join` puts it back together."""

    prefix: str
    middle: str
    suffix: str


@dataclass(frozen=True)
class Draw:
    """The FIM choice for one document: cut points (character offsets) and layout."""

    lo: int
    hi: int
    mode: Mode


def split_points(length: int, a: int, b: int) -> tuple[int, int]:
    """Two cut points in 0..length from two uniform 64-bit words, sorted (lo <= hi).

    `(w * (length + 1)) >> 64` maps a uniform 64-bit word onto 0..length without floats, so the
    cut is exact for any text length.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    x = (a * (length + 1)) >> 64
    y = (b * (length + 1)) >> 64
    return (x, y) if x <= y else (y, x)


def to_pieces(text: str, lo: int, hi: int) -> Pieces:
    """Cut `text` at character offsets lo <= hi."""
    if not 0 <= lo <= hi <= len(text):
        raise ValueError(f"cut points must satisfy 0 <= lo <= hi <= {len(text)}, got {lo}, {hi}")
    return Pieces(text[:lo], text[lo:hi], text[hi:])


def join(pieces: Pieces) -> str:
    """The document again: prefix + middle + suffix."""
    return pieces.prefix + pieces.middle + pieces.suffix


def arrange(pieces: Pieces, mode: Mode) -> list[tuple[Slot, str]]:
    """The pieces in training order for `mode`, each with the slot whose sentinel precedes it."""
    return [(slot, getattr(pieces, slot)) for slot in ORDER[mode]]


def render(pieces: Pieces, mode: Mode) -> str:
    """The FIM example as text with sentinel spellings (for display; training uses ids)."""
    return FORMATS[mode].format(prefix=pieces.prefix, middle=pieces.middle, suffix=pieces.suffix)


@dataclass(frozen=True)
class FimSettings:
    """How often documents become FIM (`rate`), how often in SPM (`spm_rate`), and the seed."""

    rate: float
    spm_rate: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rate", "spm_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    def draw(self, length: int, sha256: str, position: int) -> Draw | None:
        """The FIM choice for a document of `length` characters, or None to keep it plain.

        Four 64-bit words of sha256(seed, sha256, position) decide: FIM or not, SPM or PSM, and
        the two cut points. Comparing an int with `rate * 2**64` is exact in Python, so rate 0
        never and rate 1 always transforms.
        """
        key = f"albor-fim\0{self.seed}\0{sha256}\0{position}".encode()
        w_fim, w_mode, a, b = struct.unpack(">4Q", hashlib.sha256(key).digest())
        if not w_fim < self.rate * _TWO_64:
            return None
        mode: Mode = "spm" if w_mode < self.spm_rate * _TWO_64 else "psm"
        lo, hi = split_points(length, a, b)
        return Draw(lo, hi, mode)

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "spm_rate": self.spm_rate, "seed": self.seed}


def pieces_ids(tokenizer: Tokenizer, pieces: Pieces, mode: Mode) -> list[int]:
    """Token ids of one FIM example (no EOS): sentinel ids between separately encoded pieces.

    `tokenizer` must be the plain-text tokenizer (`bpe.plain_text`), so that sentinel spellings
    inside the pieces are encoded as text.
    """
    ids: list[int] = []
    for slot, piece in arrange(pieces, mode):
        ids.append(SENTINEL_IDS[slot])
        ids.extend(tokenizer.encode(piece, add_special_tokens=False).ids)
    return ids


def prompt_ids(tokenizer: Tokenizer, prefix: str, suffix: str, mode: Mode = "psm") -> list[int]:
    """An infilling prompt in the training layout: everything up to and including
    `<|fim_middle|>`, so the model continues with the middle (then EOS)."""
    ids = pieces_ids(tokenizer, Pieces(prefix, "", suffix), mode)
    return ids[: ids.index(FIM_MIDDLE_ID) + 1]


def encode_packed_fim(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    draws: Sequence[Draw | None],
    dtype: np.dtype[Any],
    eos_id: int = EOS_ID,
    sentinel_ids: Mapping[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Like `shards.encode_packed`, with document i transformed by `draws[i]` (None: plain).
    `sentinel_ids`: the FIM tokens' ids by slot (None: albor's own tokenizer's; an adopted
    tokenizer's come from `bpe.special_tokens`).

    Plain documents and the pieces of FIM documents go through one `encode_batch_fast` call, so
    the Rust thread pool encodes them together; only the selected documents are cut.
    Returns (ids with EOS after each document, tokens per document including the EOS).
    """
    if len(texts) != len(draws):
        raise ValueError(f"{len(texts)} texts but {len(draws)} draws: give one draw per text")
    if not texts:
        return np.empty(0, dtype), np.empty(0, np.int64)
    segments: list[str] = []
    for text, d in zip(texts, draws, strict=True):
        if d is None:
            segments.append(text)
        else:
            segments.extend(piece for _, piece in arrange(to_pieces(text, d.lo, d.hi), d.mode))
    encoded = iter(tokenizer.encode_batch_fast(segments, add_special_tokens=False))
    ids = dict(SENTINEL_IDS) if sentinel_ids is None else dict(sentinel_ids)
    sentinel = {slot: np.array([ids[slot]], dtype) for slot in SENTINEL_IDS}
    eos = np.array([eos_id], dtype)
    parts: list[np.ndarray] = []
    lengths = np.empty(len(texts), np.int64)
    for i, d in enumerate(draws):
        n = 1  # the EOS
        if d is None:
            parts.append(np.array(next(encoded).ids, dtype))
            n += len(parts[-1])
        else:
            for slot in ORDER[d.mode]:
                parts.append(sentinel[slot])
                parts.append(np.array(next(encoded).ids, dtype))
                n += 1 + len(parts[-1])
        parts.append(eos)
        lengths[i] = n
    return np.concatenate(parts), lengths
