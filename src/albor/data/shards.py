"""Token shards: the packed, memory-mappable token streams that pretraining and evaluation read.

Layout of a token artifact (written by the tokenize stage):

    index.json                 format, vocab_size, dtype, eos_id, tokenizer_sha256, per-split
                               totals, and `fim`: the FIM settings and FIM documents per split
    tokenizer.json ...         the tokenizer files the ids belong to
    train/shard-00000.npy      1-D .npy of token ids (uint16 when the vocab fits, else uint32)
    val/shard-00000.npy ...

Documents are packed back to back in corpus order, each followed by EOS (id 0). Shards hold exactly
`shard_tokens` tokens except the last of a split, so a document may continue into the next shard; a
shard's `documents` and `bytes` count the documents that *end* in it, so they sum to the split's
totals. A split with no documents has no shard files. With FIM on (`albor.data.fim`), a transformed
document packs as its FIM example (three sentinels and its pieces) followed by the same EOS; its
`bytes` are still those of the source document.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from albor.artifact import atomic_write_json
from albor.data.bpe import EOS_ID
from albor.errors import ArtifactError

INDEX = "index.json"
INDEX_FORMAT = 1
DTYPES = ("uint16", "uint32")

# Texts handed to one encode_batch call: enough for the Rust thread pool to stay busy, small enough
# that the per-token Python ints it returns (~36 bytes each) stay well under a gigabyte.
ENCODE_BATCH_BYTES = 8 << 20


def token_dtype(vocab_size: int) -> np.dtype[Any]:
    """The narrowest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")


def shard_path(split: str, number: int) -> str:
    """The path of a shard relative to the artifact directory, as recorded in index.json."""
    return f"{split}/shard-{number:05d}.npy"


def text_batches(
    texts: Sequence[str], sizes: Sequence[int], max_bytes: int = ENCODE_BATCH_BYTES
) -> Iterator[tuple[list[str], list[int]]]:
    """Group texts (with their UTF-8 sizes) into runs of at most `max_bytes` (at least one text)."""
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > max_bytes:
            yield list(texts[start:i]), list(sizes[start:i])
            start, total = i, 0
        total += size
    if start < len(texts):
        yield list(texts[start:]), list(sizes[start:])


def encode_packed(
    tokenizer: Tokenizer, texts: list[str], dtype: np.dtype[Any], eos_id: int = EOS_ID
) -> tuple[np.ndarray, np.ndarray]:
    """Encode `texts` in parallel and pack them: (ids with EOS after each text, tokens per text).

    The per-text lengths include the EOS. `encode_batch_fast` skips the offsets that packing never
    needs; the only Python-level step per token is the list -> array copy, done by numpy in C.
    """
    if not texts:
        return np.empty(0, dtype), np.empty(0, np.int64)
    eos = np.array([eos_id], dtype)
    parts: list[np.ndarray] = []
    for enc in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
        parts.append(np.array(enc.ids, dtype))
        parts.append(eos)
    lengths = np.fromiter((len(p) for p in parts[::2]), np.int64, len(texts)) + 1
    return np.concatenate(parts), lengths


@dataclass(frozen=True)
class ShardInfo:
    path: str
    tokens: int
    documents: int
    bytes: int


@dataclass(frozen=True)
class SplitInfo:
    tokens: int
    documents: int
    bytes: int
    shards: list[ShardInfo] = field(default_factory=list)


class ShardWriter:
    """Append packed documents to `root/split/shard-NNNNN.npy`, one shard in memory at a time."""

    def __init__(self, root: Path, split: str, shard_tokens: int, dtype: np.dtype[Any]) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.root = root
        self.split = split
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        # np.empty only reserves address space: a small split never touches most of it.
        self._buf = np.empty(shard_tokens, self.dtype)
        self._fill = 0
        self._docs = 0
        self._bytes = 0
        self._closed = False

    def write(self, tokens: np.ndarray, lengths: np.ndarray, sizes: Sequence[int]) -> None:
        """Append documents: packed `tokens`, `lengths[i]` tokens (EOS included) and `sizes[i]`
        UTF-8 bytes for document i."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if len(lengths) != len(sizes) or int(lengths.sum()) != len(tokens):
            raise ValueError("lengths must sum to len(tokens), one length and size per document")
        ends = np.cumsum(lengths)
        cum_bytes = np.concatenate(([0], np.cumsum(np.asarray(sizes, np.int64))))
        pos = 0
        while pos < len(tokens):
            take = min(self.shard_tokens - self._fill, len(tokens) - pos)
            self._buf[self._fill : self._fill + take] = tokens[pos : pos + take]
            # Documents whose last token (the EOS) lies in tokens[pos : pos + take].
            first = int(np.searchsorted(ends, pos, side="right"))
            last = int(np.searchsorted(ends, pos + take, side="right"))
            self._docs += last - first
            self._bytes += int(cum_bytes[last] - cum_bytes[first])
            self._fill += take
            pos += take
            if self._fill == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self._fill == 0:
            return
        rel = shard_path(self.split, len(self.shards))
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, self._buf[: self._fill])
        self.shards.append(ShardInfo(rel, self._fill, self._docs, self._bytes))
        self._fill = self._docs = self._bytes = 0

    def close(self) -> SplitInfo:
        """Write the last, partial shard and return the split's totals."""
        if not self._closed:
            self._flush()
            self._closed = True
            self._buf = np.empty(0, self.dtype)
        return SplitInfo(
            tokens=sum(s.tokens for s in self.shards),
            documents=sum(s.documents for s in self.shards),
            bytes=sum(s.bytes for s in self.shards),
            shards=list(self.shards),
        )


@dataclass(frozen=True)
class FimRecord:
    """How a token artifact applied fill-in-the-middle: settings, layouts, documents per split.

    `documents[split]` counts the documents packed as FIM examples (0 for splits left plain).
    """

    rate: float
    spm_rate: float
    seed: int
    splits: list[str]
    formats: dict[str, str]
    documents: dict[str, int]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FimRecord:
        return cls(
            rate=float(data["rate"]),
            spm_rate=float(data["spm_rate"]),
            seed=int(data["seed"]),
            splits=[str(s) for s in data["splits"]],
            formats={str(k): str(v) for k, v in data["formats"].items()},
            documents={str(k): int(v) for k, v in data["documents"].items()},
        )


@dataclass(frozen=True)
class TokenIndex:
    """index.json of a token artifact. `fim` is None for artifacts written without FIM settings."""

    vocab_size: int
    dtype: str
    eos_id: int
    tokenizer_sha256: str
    splits: dict[str, SplitInfo]
    fim: FimRecord | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype,
            "eos_id": self.eos_id,
            "tokenizer_sha256": self.tokenizer_sha256,
            "splits": {name: asdict(info) for name, info in self.splits.items()},
        }
        if self.fim is not None:
            data["fim"] = asdict(self.fim)
        return data

    def write(self, directory: Path) -> None:
        atomic_write_json(directory / INDEX, self.to_json())

    @classmethod
    def load(cls, directory: Path) -> TokenIndex:
        """Read `directory/index.json`; ArtifactError if it is missing or malformed."""
        path = directory / INDEX
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ArtifactError(
                f"{directory}: no {INDEX}, so this is not a token artifact "
                "(point it at the output of the tokenize stage)"
            ) from None
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}: unreadable token index: {e}") from e
        try:
            if data["format"] != INDEX_FORMAT:
                raise ValueError(f"format {data['format']!r}, this albor reads {INDEX_FORMAT}")
            if data["dtype"] not in DTYPES:
                raise ValueError(f"dtype {data['dtype']!r} is not one of {', '.join(DTYPES)}")
            splits = {
                str(name): SplitInfo(
                    tokens=int(s["tokens"]),
                    documents=int(s["documents"]),
                    bytes=int(s["bytes"]),
                    shards=[
                        ShardInfo(
                            str(h["path"]), int(h["tokens"]), int(h["documents"]), int(h["bytes"])
                        )
                        for h in s["shards"]
                    ],
                )
                for name, s in data["splits"].items()
            }
            index = cls(
                vocab_size=int(data["vocab_size"]),
                dtype=str(data["dtype"]),
                eos_id=int(data["eos_id"]),
                tokenizer_sha256=str(data["tokenizer_sha256"]),
                splits=splits,
                # Optional: an index without it predates FIM and holds plain documents only.
                fim=FimRecord.from_json(data["fim"]) if data.get("fim") is not None else None,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{path}: malformed token index ({type(e).__name__}: {e})") from e
        if np.dtype(index.dtype) != token_dtype(index.vocab_size):
            raise ArtifactError(
                f"{path}: dtype {index.dtype} does not match vocab size {index.vocab_size}"
            )
        return index


def open_split(directory: Path, split: str) -> list[np.ndarray]:
    """The shards of `split`, memory-mapped read-only, in order; checked against index.json."""
    index = TokenIndex.load(directory)
    if split not in index.splits:
        raise ArtifactError(
            f"{directory}: no split '{split}' (has: {', '.join(index.splits) or 'none'}); "
            "add it to the tokenize stage's `splits`"
        )
    arrays = []
    for shard in index.splits[split].shards:
        path = directory / shard.path
        try:
            arr = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise ArtifactError(
                f"{path}: shard listed in {INDEX} is missing (re-run tokenize)"
            ) from None
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}: unreadable shard: {e}") from e
        if arr.ndim != 1 or arr.dtype != np.dtype(index.dtype) or len(arr) != shard.tokens:
            raise ArtifactError(
                f"{path}: shard is {arr.dtype}{list(arr.shape)}, index says "
                f"{index.dtype}[{shard.tokens}] (re-run tokenize)"
            )
        arrays.append(arr)
    return arrays
