"""tokenizer: train albor's lossless byte-level BPE tokenizer on the train split.

Training reads at most `max_train_bytes` of the train split, documents in file order (the one that
crosses the limit is cut at a character boundary), so its time is bounded whatever the corpus size.
After writing the HF files, apply reloads them and checks `decode(encode(x)) == x` on every
validation document, so a tokenizer that loses a byte never reaches training.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
from pydantic import Field

from albor import progress
from albor.config import Int
from albor.data.bpe import (
    BYTE_ALPHABET,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    load_tokenizer,
    plain_text,
    save_hf_files,
    train_bpe,
)
from albor.data.corpus import iter_batches, num_rows, open_corpus, require_splits
from albor.errors import ArtifactError, StageFailed
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

NAME = "tokenizer"
INPUTS = ("input",)

# Rough BPE training speed per CPU core (word counting dominates); only for the plan's estimate.
_TRAIN_BYTES_PER_S_PER_CORE = 3e6


class Config(OutputConfig):
    input: Path | None = Field(
        None, description="Split artifact directory (train / val / test Parquet, from split)."
    )
    vocab_size: Int = Field(
        4096,
        gt=0,
        description=f"Tokens in the vocabulary, including {BYTE_ALPHABET} byte tokens and "
        f"{len(SPECIAL_TOKENS)} special tokens; shorthand like 32K works.",
    )
    min_frequency: int = Field(2, ge=1, description="Times a pair must occur to be merged.")
    max_train_bytes: Int = Field(
        64 * 1024**2,
        gt=0,
        description="Train on at most this many UTF-8 bytes of the train split (first documents "
        "in file order), which bounds training time; shorthand like 64M works.",
    )
    batch_rows: int = Field(1024, gt=0, description="Rows per record batch while streaming.")


def _split_bytes(directory: Path, split: str, manifest: dict[str, object]) -> int:
    """UTF-8 bytes of a split: from the split manifest, else summed from the Parquet column."""
    metrics = manifest.get("metrics")
    if isinstance(metrics, dict):
        by_split = metrics.get("bytes")
        if isinstance(by_split, dict) and isinstance(by_split.get(split), int):
            return int(by_split[split])
    table = open_corpus(directory / f"{split}.parquet").read(columns=["bytes"])
    return int(pc.sum(table.column("bytes")).as_py() or 0)


def estimate_train_seconds(nbytes: int) -> float:
    cores = os.cpu_count() or 1
    return round(0.5 + nbytes / (_TRAIN_BYTES_PER_S_PER_CORE * min(cores, 16)), 1)


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    p.require(
        "vocab_size",
        cfg.vocab_size >= MIN_VOCAB_SIZE,
        f"{cfg.vocab_size} tokens ({cfg.vocab_size - MIN_VOCAB_SIZE} merges)",
        f"vocab_size {cfg.vocab_size} cannot hold the {BYTE_ALPHABET} byte tokens and "
        f"{len(SPECIAL_TOKENS)} special tokens: set vocab_size to at least {MIN_VOCAB_SIZE} "
        "(4K for a toy model, 32K for the 350M preset)",
    )
    p.warn_if(
        "token dtype",
        cfg.vocab_size > 1 << 16,
        f"vocab_size {cfg.vocab_size} > 65536: token shards will be uint32 (twice the disk)",
        "token ids fit in uint16",
    )

    def sizes(path: Path) -> tuple[int, int]:
        return _split_bytes(path, "train", require_splits(path)), num_rows(path / "val.parquet")

    found = check_input(p, ctx, "input", cfg.input, sizes, "a split artifact directory")
    if ctx.is_pending("input"):
        p.estimates["train_bytes_used"] = f"at most {cfg.max_train_bytes / 1e6:.1f} MB"
    if found is not None:
        train_bytes, val_docs = found
        used = min(train_bytes, cfg.max_train_bytes)
        share = used / train_bytes if train_bytes else 0.0
        p.add(
            "input",
            "ok",
            f"{cfg.input}: will train on {used / 1e6:.1f} MB of the "
            f"{train_bytes / 1e6:.1f} MB train split ({share:.0%})",
        )
        p.warn_if(
            "val round trip",
            val_docs == 0,
            "the val split is empty, so the round trip cannot be verified on held-out text "
            "(give split a non-zero `val`)",
            f"decode(encode(x)) == x will be checked on {val_docs} val documents",
        )
        p.estimates["train_bytes"] = train_bytes
        p.estimates["train_bytes_used"] = used
        p.estimates["wall_time_s"] = estimate_train_seconds(used)
    p.estimates["vocab_size"] = cfg.vocab_size
    p.estimates["disk_bytes"] = cfg.vocab_size * 80  # vocab + merges JSON
    p.actions.append(
        f"train a {cfg.vocab_size}-token byte-level BPE on the train split "
        f"(at most {cfg.max_train_bytes / 1e6:.1f} MB), write tokenizer.json, "
        f"tokenizer_config.json, special_tokens_map.json to {cfg.output}"
    )
    p.actions.append("verify decode(encode(x)) == x on every val document")
    return p


@dataclass
class _Used:
    documents: int = 0
    bytes: int = 0
    truncated: bool = False


def _training_texts(path: Path, limit: int, batch_rows: int, used: _Used) -> Iterator[str]:
    """Texts of `path` in file order until `limit` bytes; the crossing one is cut to fit."""
    for batch in iter_batches(path, ["text", "bytes"], batch_rows):
        texts = batch.column("text").to_pylist()
        sizes = batch.column("bytes").to_pylist()
        for text, size in zip(texts, sizes, strict=True):
            if used.bytes + size > limit:
                room = limit - used.bytes
                # errors="ignore" drops only a character cut in half at the end.
                head = text.encode("utf-8")[:room].decode("utf-8", errors="ignore")
                if head:
                    used.documents += 1
                    used.bytes += len(head.encode("utf-8"))
                    used.truncated = True
                    yield head
                return
            used.documents += 1
            used.bytes += size
            yield text


@dataclass
class RoundTrip:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0


def verify_round_trip(directory: Path, split_path: Path, batch_rows: int) -> RoundTrip:
    """Reload the saved tokenizer and check decode(encode(x)) == x on every document of a split.

    Encoding treats special-token spellings as text, as the tokenize stage does.
    """
    tok = plain_text(load_tokenizer(directory))
    seen = RoundTrip()
    with progress.bar("round trip", num_rows(split_path)) as bar:
        for batch in iter_batches(split_path, ["text", "path", "bytes"], batch_rows):
            texts = batch.column("text").to_pylist()
            encoded = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
            decoded = tok.decode_batch(encoded, skip_special_tokens=False)
            for i, (text, back) in enumerate(zip(texts, decoded, strict=True)):
                if text != back:
                    path = batch.column("path")[i].as_py()
                    at = next(
                        (j for j, (a, b) in enumerate(zip(text, back, strict=False)) if a != b),
                        min(len(text), len(back)),
                    )
                    raise StageFailed(
                        f"{NAME}: round trip failed on val document {path!r}: decode(encode(x)) "
                        f"differs from x at character {at} ({text[at : at + 20]!r} became "
                        f"{back[at : at + 20]!r}); the tokenizer is not lossless (this is a bug in "
                        "albor; please report it with that file)"
                    )
            seen.documents += len(texts)
            seen.tokens += sum(len(ids) for ids in encoded)
            seen.bytes += int(pc.sum(batch.column("bytes")).as_py() or 0)
            bar.advance(len(texts))
    return seen


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    assert cfg.input is not None
    used = _Used()
    t0 = time.perf_counter()
    tok = train_bpe(
        _training_texts(cfg.input / "train.parquet", cfg.max_train_bytes, cfg.batch_rows, used),
        cfg.vocab_size,
        cfg.min_frequency,
        show_progress=progress.enabled(),
    )
    train_seconds = time.perf_counter() - t0
    if used.bytes == 0:
        raise ArtifactError(f"{cfg.input}: the train split holds no text to train a tokenizer on")
    save_hf_files(tok, ctx.out)
    check = verify_round_trip(ctx.out, cfg.input / "val.parquet", cfg.batch_rows)
    reached = tok.get_vocab_size()
    bytes_per_token = round(check.bytes / check.tokens, 4) if check.tokens else None
    notes = [f"vocab {reached}"]
    if reached < cfg.vocab_size:
        notes.append(
            f"WARNING: below the requested {cfg.vocab_size}: the {used.bytes / 1e6:.1f} MB of "
            f"training text has too few pairs seen {cfg.min_frequency}+ times (add data or "
            "lower vocab_size / min_frequency)"
        )
    notes.append(f"trained on {used.bytes / 1e6:.1f} MB in {train_seconds:.1f} s")
    if check.documents:
        notes.append(f"round trip ok on {check.documents} val docs, {bytes_per_token} bytes/token")
    else:
        notes.append("val split empty: round trip not checked on held-out text")
    return Outcome(
        summary="; ".join(notes),
        metrics={
            "vocab_size": reached,
            "vocab_size_requested": cfg.vocab_size,
            "train_documents": used.documents,
            "train_bytes": used.bytes,
            "train_truncated": used.truncated,
            "train_seconds": round(train_seconds, 3),
            "val_round_trip_documents": check.documents,
            "val_bytes": check.bytes,
            "val_tokens": check.tokens,
            "bytes_per_token": bytes_per_token,
        },
    )
