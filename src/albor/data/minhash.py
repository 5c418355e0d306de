"""MinHash signatures of Python source for near-duplicate detection, compatible with datasketch.

A document becomes a set of shingles: 5-grams (by default) of code tokens, where a token is an
identifier, a number or one punctuation character (`TOKEN_RE`), so reformatting does not change the
set while renaming a variable does. Tokens are hashed with 8-byte blake2b; a shingle's hash is a
fixed linear mix of its tokens' hashes (odd 64-bit multipliers, one per position), which is
vectorised over the whole document instead of calling a hash function per shingle.

Signatures are exactly datasketch's `MinHash(num_perm, seed, scheme="affine64")` of those shingle
hashes (its permutations, its MurmurHash3 pre-mix, its affine map mod 2^64; a test holds them equal
to `MinHash.update_batch`), computed in chunks with preallocated buffers, which measured about four
times faster than `update_batch` and bounds the scratch memory of a 1 MB document to a few MB.
They are returned as `LeanMinHash`, so `MinHash.jaccard` and `MinHashLSH` take them as they are.

`lsh_bands` picks the LSH bands × rows the way datasketch does (least false-positive plus
false-negative area around the threshold) but never fewer than two bands, which datasketch refuses
and which it would pick for thresholds near 1. `candidate_pairs` then finds the pairs that agree
on a whole band, the very pairs datasketch's `MinHashLSH` with those bands makes candidates, by
sorting each band of a signature matrix rather than hashing every band into a bucket: the index
costs no memory beyond the signatures themselves, where `MinHashLSH` keeps about 10 KB of Python
objects per document at 256 permutations. `similarities` verifies pairs as `MinHash.jaccard` does.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache

import numpy as np
import pyarrow as pa
from datasketch import LeanMinHash, MinHash

# An identifier (Unicode letters as Python allows), a run of digits and word characters (a
# number: `42`, `0x1F`, `1_000`), or a single character that is neither a word character nor
# whitespace (an operator or bracket). Whitespace is never part of a token, which is why
# documents that differ only in whitespace have the same shingles.
TOKEN_RE = re.compile(r"[^\W\d]\w*|\d\w*|[^\w\s]")
SCHEME = "affine64"

_MASK64 = (1 << 64) - 1
# Scratch rows per chunk of the signature computation: 1024 x 256 x 8 B = 2 MB stays in cache.
_CHUNK = 1024
# Token hashes are cached per Signer (identifiers and punctuation repeat across a corpus); the
# cache is cleared when it grows past this, so a huge vocabulary cannot exhaust memory.
_TOKEN_CACHE_MAX = 1 << 20
_FMIX64 = (
    np.uint64(33),
    np.uint64(0xFF51AFD7ED558CCD),
    np.uint64(33),
    np.uint64(0xC4CEB9FE1A85EC53),
    np.uint64(33),
)


def tokenize(text: str) -> list[str]:
    """The code tokens of `text`: identifiers, numbers and single punctuation characters."""
    return TOKEN_RE.findall(text)


def shingles(tokens: list[str], size: int) -> set[tuple[str, ...]]:
    """The set of `size`-grams of `tokens`; a shorter list is one shingle of all its tokens.

    This is the set a signature estimates; `Signer` hashes the same shingles without building it.
    """
    if len(tokens) < size:
        return {tuple(tokens)}
    return {tuple(tokens[i : i + size]) for i in range(len(tokens) - size + 1)}


def normalized_key(text: str) -> bytes:
    """16-byte hash of `text` with runs of whitespace collapsed to one space and the ends stripped:
    the key of exact deduplication."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=16).digest()


def token_hash(token: str) -> int:
    """The 64-bit hash of one token (blake2b, little-endian), stable across runs and machines."""
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")


@cache
def _position_multipliers(size: int) -> np.ndarray:
    """Odd 64-bit multipliers, one per shingle position, derived from blake2b so that they never
    change: odd, so each is invertible mod 2^64 and no position's token is ever cancelled."""
    values = [token_hash(f"albor-shingle-position-{j}") | 1 for j in range(size)]
    return np.array(values, dtype=np.uint64)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, in place: the pre-mix datasketch applies in `affine64`."""
    s1, m1, s2, m2, s3 = _FMIX64
    h ^= h >> s1
    h *= m1
    h ^= h >> s2
    h *= m2
    h ^= h >> s3
    return h


def _identity(value: int) -> int:
    return value


def lsh_bands(threshold: float, num_perm: int, grid: int = 1001) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm and bands >= 2 that minimise the area of false
    positives (pairs below `threshold` that become candidates) plus false negatives (pairs above
    it that do not), the objective of datasketch's `MinHashLSH` with equal weights. The areas are
    integrated with the trapezoid rule on `grid` points rather than scipy's quad, which keeps a
    plan under a second at 1024 permutations."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if num_perm < 2:
        raise ValueError(f"num_perm must be at least 2 for two LSH bands, got {num_perm}")
    below = np.linspace(0.0, threshold, grid)
    above = np.linspace(threshold, 1.0, grid)
    best = (float("inf"), 2, 1)
    for b in range(2, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=np.float64)[:, None]
        fp = _trapezoid(1.0 - (1.0 - below**r) ** b, threshold / (grid - 1))
        fn = _trapezoid((1.0 - above**r) ** b, (1.0 - threshold) / (grid - 1))
        error = 0.5 * fp + 0.5 * fn
        i = int(np.argmin(error))
        if error[i] < best[0]:
            best = (float(error[i]), b, i + 1)
    return best[1], best[2]


def _trapezoid(y: np.ndarray, dx: float) -> np.ndarray:
    """Trapezoid-rule integral of each row of `y` sampled every `dx` (numpy 1.x has no
    `np.trapezoid` and 2.x deprecates `np.trapz`)."""
    return np.asarray((y[:, 1:] + y[:, :-1]).sum(axis=1) * (dx / 2))


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Chance that LSH with `bands` x `rows` makes a pair of this Jaccard similarity a candidate."""
    return float(1.0 - (1.0 - similarity**rows) ** bands)


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """The distinct pairs (i, j), i < j, of rows of `signatures` (one signature per row) equal in
    all `rows` values of at least one of the first `bands` bands, as an (m, 2) int64 array in
    ascending order: what `MinHashLSH(params=(bands, rows))` would return as candidates, since
    its buckets are the bytes of a band. Each band is sorted (lexicographically, so equal bands
    are adjacent and nothing is hashed), which needs a band-sized copy, not a bucket table."""
    n = len(signatures)
    found: list[np.ndarray] = []
    for b in range(bands):
        band = signatures[:, b * rows : (b + 1) * rows]
        order = np.lexsort(band.T)
        ordered = band[order]
        same = (ordered[1:] == ordered[:-1]).all(axis=1)
        if not same.any():
            continue
        # Runs of equal bands, from where `same` turns on (start) to where it turns off (last).
        edges = np.flatnonzero(np.diff(np.concatenate(([False], same, [False])).astype(np.int8)))
        for start, last in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
            members = np.sort(order[start : last + 1])
            i, j = np.triu_indices(len(members), 1)
            # One int64 per pair, so that pairs found in several bands collapse in np.unique.
            found.append(members[i] * n + members[j])
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // n, codes % n], axis=1)


def similarities(signatures: np.ndarray, pairs: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """The estimated Jaccard similarity of each pair of rows of `signatures`: the share of equal
    values, computed exactly as `MinHash.jaccard` computes it, a chunk of pairs at a time so the
    scratch memory stays at a few MB."""
    out = np.empty(len(pairs), dtype=np.float64)
    width = float(signatures.shape[1])
    for start in range(0, len(pairs), chunk):
        p = pairs[start : start + chunk]
        equal = np.count_nonzero(signatures[p[:, 0]] == signatures[p[:, 1]], axis=1)
        out[start : start + chunk] = equal / width
    return out


class Signer:
    """Turns documents into MinHash signatures; one per stage run (it caches token hashes)."""

    def __init__(self, num_perm: int = 256, seed: int = 1, shingle_size: int = 5) -> None:
        if shingle_size < 1:
            raise ValueError(f"shingle_size must be at least 1, got {shingle_size}")
        self.num_perm = num_perm
        self.seed = seed
        self.shingle_size = shingle_size
        template = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME, hashfunc=_identity)
        a, b = template.permutations
        self._a = np.ascontiguousarray(a, dtype=np.uint64)
        self._b = np.ascontiguousarray(b, dtype=np.uint64)
        self._multipliers = _position_multipliers(shingle_size)
        self._buffer = np.empty((_CHUNK, num_perm), dtype=np.uint64)
        self._tokens: dict[str, int] = {}

    def token_hashes(self, tokens: list[str]) -> np.ndarray:
        """The hash of each token, in order, as uint64."""
        if not tokens:
            return np.empty(0, dtype=np.uint64)
        # Dictionary-encoding in Arrow finds the distinct tokens in C; only those reach Python.
        encoded = pa.array(tokens, pa.string()).dictionary_encode()
        words = encoded.dictionary.to_pylist()
        if len(self._tokens) > _TOKEN_CACHE_MAX:
            self._tokens.clear()
        known = self._tokens
        distinct = np.fromiter(
            (known[w] if w in known else known.setdefault(w, token_hash(w)) for w in words),
            dtype=np.uint64,
            count=len(words),
        )
        indices = encoded.indices.to_numpy(zero_copy_only=False)
        return distinct[indices]

    def shingle_hashes(self, text: str) -> np.ndarray:
        """The sorted distinct hashes of the shingles of `text` (at least one)."""
        h = self.token_hashes(tokenize(text))
        k = self.shingle_size
        n = len(h) - k + 1
        if n <= 0:
            # Fewer tokens than a shingle: one shingle of them all (an empty document hashes to 0).
            mixed = h * self._multipliers[: len(h)]
            return np.array([int(mixed.sum(dtype=np.uint64)) & _MASK64], dtype=np.uint64)
        out = h[:n] * self._multipliers[0]
        for j in range(1, k):
            out += h[j : j + n] * self._multipliers[j]
        return np.unique(out)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """The `num_perm` minimum permuted hashes of a set of shingle hashes (uint64)."""
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(hashes), _CHUNK):
            h = _fmix64(hashes[start : start + _CHUNK].copy())[:, None]
            buf = self._buffer[: len(h)]
            np.multiply(h, self._a, out=buf)
            np.add(buf, self._b, out=buf)
            np.minimum(sig, buf.min(axis=0), out=sig)
        return sig

    def minhash(self, text: str) -> LeanMinHash:
        """The signature of `text` as a datasketch `LeanMinHash`."""
        sig = self.signature(self.shingle_hashes(text))
        return LeanMinHash(seed=self.seed, hashvalues=sig, scheme=SCHEME)
