"""Encode throughput of the tokenize stage against raw HF `tokenizers` on the stdlib's .py files.

    PYTHONPATH=src python benchmarks/tokenizer.py [--tokenizer DIR] [--repeats 3] [--limit-mb 0]

Both sides encode the same texts in the same process with the same tokenizer (4096-token BPE trained
here on those files unless `--tokenizer` names a tokenizer artifact):
  albor     `albor.data.shards.encode_packed` in the batches the tokenize stage uses: ids packed
            into one numpy array with EOS after each document, i.e. ready to write as a shard;
  baseline  `Tokenizer.encode_batch(texts)`, the raw HF call (ids stay inside Encoding objects).
Each side runs `--repeats` times, interleaved so that machine load hits both alike; the best time
counts. Prints one JSON object; `ratio` = albor MB/s / baseline MB/s (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from albor.data.bpe import load_tokenizer, plain_text, train_bpe
from albor.data.shards import encode_packed, text_batches, token_dtype


def stdlib_texts(limit_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text.encode("utf-8"))
        if limit_bytes and total >= limit_bytes:
            break
    return texts


def best_of(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, tuple[float, int]]:
    """Best wall time and the token count of each function, runs interleaved."""
    best: dict[str, tuple[float, int]] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            tokens = fn()
            dt = time.perf_counter() - t0
            if name not in best or dt < best[name][0]:
                best[name] = (dt, tokens)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, help="tokenizer artifact dir (default: train one)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit-mb", type=float, default=0.0, help="use only this much text (0: all)")
    args = ap.parse_args()

    texts = stdlib_texts(int(args.limit_mb * 1e6))
    sizes = [len(t.encode("utf-8")) for t in texts]
    nbytes = sum(sizes)
    t0 = time.perf_counter()
    saved = load_tokenizer(args.tokenizer) if args.tokenizer else train_bpe(texts, args.vocab_size)
    train_s = time.perf_counter() - t0
    tok = plain_text(saved)  # the stage encodes data with special-token spellings as plain text
    dtype = token_dtype(tok.get_vocab_size())
    batches = list(text_batches(texts, sizes))

    def albor() -> int:
        tokens = 0
        for chunk, _ in batches:
            ids, _lengths = encode_packed(tok, chunk, dtype)
            tokens += len(ids) - len(chunk)  # without the EOS separators
        return tokens

    def baseline() -> int:
        return sum(len(e) for e in tok.encode_batch(texts))

    def baseline_fast() -> int:
        return sum(len(e) for e in tok.encode_batch_fast(texts))

    best = best_of(
        {"albor": albor, "baseline": baseline, "baseline_fast": baseline_fast}, args.repeats
    )
    assert best["albor"][1] == best["baseline"][1], "both sides must produce the same tokens"
    # Same ids, not just the same count, on a sample.
    sample = texts[:50]
    packed, _ = encode_packed(tok, sample, dtype)
    expected = np.concatenate([np.array([*e.ids, 0], dtype) for e in tok.encode_batch(sample)])
    assert np.array_equal(packed, expected), "albor ids differ from HF tokenizers ids"

    def side(name: str) -> dict[str, float]:
        seconds, tokens = best[name]
        return {
            "seconds": round(seconds, 4),
            "mb_per_s": round(nbytes / 1e6 / seconds, 3),
            "tokens_per_s": round(tokens / seconds),
        }

    result = {
        "benchmark": "tokenize encode throughput",
        "corpus": {"files": len(texts), "mb": round(nbytes / 1e6, 3), "source": "stdlib .py"},
        "tokenizer": {
            "vocab_size": tok.get_vocab_size(),
            "trained_here": args.tokenizer is None,
            "train_seconds": round(train_s, 3),
        },
        "tokens": best["albor"][1],
        "bytes_per_token": round(nbytes / best["albor"][1], 3),
        "albor": {**side("albor"), "function": "albor.data.shards.encode_packed"},
        "baseline": {**side("baseline"), "function": "tokenizers.Tokenizer.encode_batch"},
        "baseline_fast": {
            **side("baseline_fast"),
            "function": "tokenizers.Tokenizer.encode_batch_fast",
        },
        "ratio": round(best["baseline"][0] / best["albor"][0], 3),
        "ratio_vs_fast": round(best["baseline_fast"][0] / best["albor"][0], 3),
        "target_ratio": 0.9,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default (on)"),
        "python": sys.version.split()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
