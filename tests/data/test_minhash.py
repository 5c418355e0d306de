"""minhash: tokens, shingles and signatures estimate the Jaccard similarity of code documents."""

from __future__ import annotations

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from albor.data import minhash
from helpers import STDLIB


def stdlib(name: str) -> str:
    return (STDLIB / name).read_text(encoding="utf-8")


def change_lines(text: str, every: int) -> str:
    """`text` with every `every`-th non-blank line replaced by an unrelated statement."""
    lines = text.splitlines(keepends=True)
    return "".join(
        "x_changed = 1\n" if i % every == every // 2 and line.strip() else line
        for i, line in enumerate(lines)
    )


def window(text: str, start: float, stop: float) -> str:
    """The lines of `text` between the fractions `start` and `stop` of its length."""
    lines = text.splitlines(keepends=True)
    return "".join(lines[int(start * len(lines)) : int(stop * len(lines))])


def true_jaccard(a: str, b: str, size: int = 5) -> float:
    x = minhash.shingles(minhash.tokenize(a), size)
    y = minhash.shingles(minhash.tokenize(b), size)
    return len(x & y) / len(x | y)


def test_tokenizer_keeps_identifiers_and_numbers_whole() -> None:
    code = "def my_func2(x_1):\n    return café.attr_b + 0x1F*42  # done"
    assert minhash.tokenize(code) == [
        "def",
        "my_func2",
        "(",
        "x_1",
        ")",
        ":",
        "return",
        "café",
        ".",
        "attr_b",
        "+",
        "0x1F",
        "*",
        "42",
        "#",
        "done",
    ]
    # Whitespace separates tokens but never enters one, so layout does not change the tokens.
    assert minhash.tokenize("a  =\tb\n\n") == minhash.tokenize("a = b") == ["a", "=", "b"]


def test_normalized_key_ignores_only_whitespace_runs() -> None:
    text = stdlib("bisect.py")
    spaced = "\n\n" + text.replace("    ", "\t").replace("\n", " \n\n") + "   "
    assert minhash.normalized_key(text) == minhash.normalized_key(spaced)
    assert minhash.normalized_key(text) != minhash.normalized_key(text.replace("lo", "low"))
    assert minhash.normalized_key("a b") != minhash.normalized_key("ab")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (stdlib("fnmatch.py"), change_lines(stdlib("fnmatch.py"), 40)),  # about 0.95
        (stdlib("textwrap.py"), change_lines(stdlib("textwrap.py"), 10)),  # about 0.8
        (window(stdlib("shlex.py"), 0.0, 0.7), window(stdlib("shlex.py"), 0.3, 1.0)),  # ~0.6
        (window(stdlib("heapq.py"), 0.0, 0.5), window(stdlib("heapq.py"), 0.3, 0.8)),  # ~0.3
        (stdlib("heapq.py"), stdlib("colorsys.py")),  # unrelated
    ],
    ids=["few-lines-edited", "many-lines-edited", "overlap-0.6", "overlap-0.3", "unrelated"],
)
def test_estimated_jaccard_is_close_to_the_true_one(a: str, b: str) -> None:
    signer = minhash.Signer(num_perm=256, seed=1, shingle_size=5)
    estimate = signer.minhash(a).jaccard(signer.minhash(b))
    assert estimate == pytest.approx(true_jaccard(a, b), abs=0.1)


def test_shingle_hashes_are_the_distinct_shingles() -> None:
    signer = minhash.Signer(shingle_size=5)
    text = stdlib("textwrap.py")
    expected = minhash.shingles(minhash.tokenize(text), 5)
    hashes = signer.shingle_hashes(text)
    assert len(hashes) == len(expected)  # one hash per distinct shingle: no collisions
    assert hashes.dtype == np.uint64
    # A document shorter than a shingle is one shingle of all its tokens; empty still signs.
    assert len(signer.shingle_hashes("x = 1")) == 1
    assert len(signer.shingle_hashes("")) == 1
    assert signer.minhash("x = 1").jaccard(signer.minhash("x  =  1")) == 1.0
    assert signer.minhash("x = 1").jaccard(signer.minhash("y = 2")) < 0.1


def test_signature_is_datasketchs_minhash() -> None:
    """The vectorised signature equals datasketch's own `affine64` MinHash of the same shingle
    hashes, so LSH and `jaccard` from datasketch apply to it unchanged."""
    signer = minhash.Signer(num_perm=128, seed=7, shingle_size=3)
    hashes = signer.shingle_hashes(stdlib("textwrap.py"))
    assert len(hashes) > 2 * 1024  # more than one chunk of the computation
    reference = MinHash(num_perm=128, seed=7, scheme=minhash.SCHEME, hashfunc=lambda v: v)
    reference.update_batch(hashes.tolist())
    lean = signer.minhash(stdlib("textwrap.py"))
    assert np.array_equal(lean.hashvalues, reference.hashvalues)
    assert lean.seed == 7 and lean.scheme == minhash.SCHEME
    assert lean.jaccard(reference) == 1.0


def test_lsh_bands_match_datasketch_and_allow_thresholds_near_one() -> None:
    for threshold, num_perm in [(0.7, 256), (0.5, 64), (0.85, 128)]:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        assert minhash.lsh_bands(threshold, num_perm) == (lsh.b, lsh.r)
    # datasketch would choose a single band here and refuse it; two bands still index pairs.
    bands, rows = minhash.lsh_bands(0.99, 256)
    assert bands >= 2 and bands * rows <= 256
    assert minhash.candidate_probability(1.0, bands, rows) == 1.0
    with pytest.raises(ValueError, match="threshold"):
        minhash.lsh_bands(0.0, 256)
