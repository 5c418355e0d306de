"""tokenizer: train albor's lossless byte-level BPE tokenizer on the train split, or adopt one.

Training reads at most `max_train_bytes` of the train split, documents in file order (the one that
crosses the limit is cut at a character boundary), so its time is bounded whatever the corpus size.
After writing the HF files, apply reloads them and checks `decode(encode(x)) == x` on every
validation document, so a tokenizer that loses a byte never reaches training.

With `adopt: DIR` the stage trains nothing: it takes the tokenizer of a local transformers
directory (a bigger code model's, so that a student can be distilled from it) with its ids as
they are. It must have an end-of-text token and the three FIM tokens (`bpe.ROLE_SPELLINGS`);
tokenizer.json is copied byte for byte and albor's tokenizer_config.json records which token
plays which role, so every consumer finds the ids through `bpe.special_tokens`. The same round
trip check then runs on the val split.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.compute as pc
from pydantic import Field
from tokenizers import Tokenizer

from albor import progress
from albor.artifact import sha256_file
from albor.config import Int
from albor.data.bpe import (
    BYTE_ALPHABET,
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    TOKENIZER_JSON,
    SpecialTokens,
    find_special_tokens,
    hf_special_tokens,
    load_tokenizer,
    plain_text,
    save_adopted_hf_files,
    save_hf_files,
    token_byte_lengths,
    train_bpe,
)
from albor.data.corpus import iter_batches, num_rows, open_corpus, require_splits
from albor.errors import AlborError, ArtifactError, StageFailed
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

NAME = "tokenizer"
INPUTS = ("input",)

# Rough BPE training speed per CPU core (word counting dominates); only for the plan's estimate.
_TRAIN_BYTES_PER_S_PER_CORE = 3e6
# Settings that only shape training, so adopting a tokenizer ignores them.
TRAINING_FIELDS = ("vocab_size", "min_frequency", "max_train_bytes")


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
    adopt: Path | None = Field(
        None,
        description="Adopt the tokenizer of this local transformers directory (tokenizer.json, "
        "as AutoTokenizer.save_pretrained writes it; nothing is downloaded) instead of training "
        "one, e.g. a teacher's so that the model can be distilled from it. It needs an "
        "end-of-text token and the FIM tokens; vocab_size, min_frequency and max_train_bytes "
        "are then ignored, and `input` is used for the round trip check.",
    )


@dataclass
class Adopted:
    """A tokenizer read from an adopted directory, with what albor needs to know of it."""

    directory: Path
    tokenizer: Tokenizer
    specials: SpecialTokens
    pad: str | None
    sha256: str
    normalizer: str | None


def read_adopted(directory: Path) -> Adopted:
    """The tokenizer of `directory` for adoption; ArtifactError naming the path, or the tokens it
    lacks, and the fix."""
    where = f"adopt: {directory}"
    if not directory.is_dir():
        raise ArtifactError(
            f"{where} is not a directory: point `adopt` at a local transformers tokenizer "
            "directory (what AutoTokenizer.save_pretrained writes; albor never downloads one)"
        )
    path = directory / TOKENIZER_JSON
    if not path.is_file():
        raise ArtifactError(
            f"{where} has no {TOKENIZER_JSON}: adopt a directory with a fast tokenizer (load the "
            "model's tokenizer with transformers' AutoTokenizer and save_pretrained it)"
        )
    try:
        text = path.read_text(encoding="utf-8")
        tok = Tokenizer.from_str(text)
        normalizer = json.loads(text).get("normalizer")
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise ArtifactError(f"adopt: {path}: not a readable tokenizer: {e}") from e
    hf = hf_special_tokens(directory)
    specials, missing = find_special_tokens(tok, hf["eos_token"])
    if missing:
        raise ArtifactError(
            f"adopt: {path} has no {'; no '.join(missing)}: albor ends every document with eos "
            "and trains fill-in-the-middle with the three FIM tokens; adopt a tokenizer that has "
            "them (Qwen2.5-Coder's or StarCoder's do), or train one: remove `adopt`"
        )
    try:
        token_byte_lengths(tok)
    except ArtifactError as e:
        raise ArtifactError(
            f"adopt: {path} is not a byte-level BPE ({e}); albor's bits per byte and GGUF export "
            "need one: adopt a byte-level tokenizer (GPT-2, StarCoder and Qwen2 families are), "
            "or train one: remove `adopt`"
        ) from e
    return Adopted(
        directory=directory,
        tokenizer=tok,
        specials=specials,
        pad=hf["pad_token"],
        sha256=sha256_file(path),
        normalizer=str(normalizer.get("type")) if isinstance(normalizer, dict) else None,
    )


def source_digests(cfg: Config) -> dict[str, str]:
    """The adopted tokenizer.json's sha256 (its identity), for `albor verify`."""
    if cfg.adopt is None:
        return {}
    try:
        return {"adopt": sha256_file(cfg.adopt / TOKENIZER_JSON)}
    except OSError as e:
        raise ArtifactError(f"adopt: cannot read {cfg.adopt / TOKENIZER_JSON}: {e}") from e


def source_state(cfg: Config) -> dict[str, str] | None:
    """Digests of the adopted tokenizer files, so that a changed source re-runs the stage."""
    if cfg.adopt is None:
        return None
    state: dict[str, str] = {}
    for name in TOKENIZER_FILES:
        try:
            state[name] = sha256_file(cfg.adopt / name)
        except OSError:
            state[name] = "missing"
    return state


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


def _check_val(p: Plan, val_docs: int) -> None:
    p.warn_if(
        "val round trip",
        val_docs == 0,
        "the val split is empty, so the round trip cannot be verified on held-out text "
        "(give split a non-zero `val`)",
        f"decode(encode(x)) == x will be checked on {val_docs} val documents",
    )


def _plan_adopt(cfg: Config, ctx: PlanContext, p: Plan) -> Plan:
    assert cfg.adopt is not None
    ignored = [f for f in TRAINING_FIELDS if f in cfg.model_fields_set]
    if ignored:
        p.add(
            "training settings",
            "warn",
            f"{', '.join(ignored)} ignored: `adopt` takes the tokenizer of {cfg.adopt} as it is "
            "(remove them, or remove `adopt` to train a tokenizer)",
        )
    try:
        src = read_adopted(cfg.adopt)
    except AlborError as e:
        p.add("adopt", "fail", str(e))
    else:
        vocab = src.tokenizer.get_vocab_size()
        roles = ", ".join(
            f"{r} {t} (id {src.specials.ids[r]})" for r, t in src.specials.tokens.items()
        )
        p.add("adopt", "ok", f"{cfg.adopt}: vocab {vocab}; {roles}")
        p.warn_if(
            "normalizer",
            src.normalizer is not None,
            f"the tokenizer has a {src.normalizer} normalizer, which may change text (case, "
            "Unicode forms): apply fails unless decode(encode(x)) == x on every val document",
            "no normalizer",
        )
        p.warn_if(
            "token dtype",
            vocab > 1 << 16,
            f"vocab {vocab} > 65536: token shards will be uint32 (twice the disk)",
            "token ids fit in uint16",
        )
        p.estimates["vocab_size"] = vocab
        p.estimates["tokenizer_sha256"] = src.sha256
        p.estimates["special_tokens"] = src.specials.to_json()
        p.estimates["disk_bytes"] = (cfg.adopt / TOKENIZER_JSON).stat().st_size
    found = check_input(
        p,
        ctx,
        "input",
        cfg.input,
        lambda path: (require_splits(path), num_rows(path / "val.parquet"))[1],
        "a split artifact directory",
    )
    if found is not None:
        p.add("input", "ok", f"{cfg.input}: its val split checks the adopted tokenizer")
        _check_val(p, found)
    p.actions.append(
        f"adopt the tokenizer of {cfg.adopt}: copy tokenizer.json unchanged, write "
        f"tokenizer_config.json and special_tokens_map.json naming its eos and FIM tokens to "
        f"{cfg.output}"
    )
    p.actions.append("verify decode(encode(x)) == x on every val document")
    return p


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)
    if cfg.adopt is not None:
        return _plan_adopt(cfg, ctx, p)
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
        _check_val(p, val_docs)
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


_BUG = "this is a bug in albor; please report it with that file"


def verify_round_trip(
    directory: Path, split_path: Path, batch_rows: int, fix: str = _BUG
) -> RoundTrip:
    """Reload the saved tokenizer and check decode(encode(x)) == x on every document of a split;
    StageFailed naming the first document and character that differ, and `fix`.

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
                        f"{back[at : at + 20]!r}); the tokenizer is not lossless ({fix})"
                    )
            seen.documents += len(texts)
            seen.tokens += sum(len(ids) for ids in encoded)
            seen.bytes += int(pc.sum(batch.column("bytes")).as_py() or 0)
            bar.advance(len(texts))
    return seen


def _apply_adopt(cfg: Config, ctx: ApplyContext) -> Outcome:
    assert cfg.input is not None and cfg.adopt is not None
    src = read_adopted(cfg.adopt)
    save_adopted_hf_files(cfg.adopt, src.tokenizer, src.specials, src.pad, ctx.out)
    check = verify_round_trip(
        ctx.out,
        cfg.input / "val.parquet",
        cfg.batch_rows,
        fix=f"{cfg.adopt} cannot be adopted: adopt a lossless tokenizer (byte-level BPE without "
        "a normalizer), or train one: remove `adopt`",
    )
    vocab = src.tokenizer.get_vocab_size()
    bytes_per_token = round(check.bytes / check.tokens, 4) if check.tokens else None
    roles = ", ".join(src.specials.tokens[r] for r in ("eos", "fim_prefix", "fim_middle"))
    notes = [f"adopted {cfg.adopt}: vocab {vocab}, {roles}, {src.specials.tokens['fim_suffix']}"]
    notes.append(_round_trip_note(check.documents, bytes_per_token))
    return Outcome(
        summary="; ".join(notes),
        metrics={
            "adopted_from": str(cfg.adopt),
            "tokenizer_sha256": src.sha256,
            "vocab_size": vocab,
            "special_tokens": src.specials.to_json(),
            "normalizer": src.normalizer,
            "val_round_trip_documents": check.documents,
            "val_bytes": check.bytes,
            "val_tokens": check.tokens,
            "bytes_per_token": bytes_per_token,
        },
        sources=[
            {"name": "adopt", "type": "tokenizer", "path": str(cfg.adopt), "digest": src.sha256}
        ],
    )


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    assert cfg.input is not None
    if cfg.adopt is not None:
        return _apply_adopt(cfg, ctx)
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
    notes.append(_round_trip_note(check.documents, bytes_per_token))
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


def _round_trip_note(documents: int, bytes_per_token: float | None) -> str:
    if documents:
        return f"round trip ok on {documents} val docs, {bytes_per_token} bytes/token"
    return "val split empty: round trip not checked on held-out text"
