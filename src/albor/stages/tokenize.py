"""tokenize: encode the train / val / test splits into packed token shards (`albor.data.shards`).

Documents are encoded in parallel by the Rust tokenizer (`encode_batch_fast` on batches of texts),
packed in corpus order with EOS after each, and written shard by shard, so memory holds one shard
and one encode batch. Special-token spellings inside a document are encoded as plain text: the only
EOS ids in a shard are the document separators.

With `fim.rate > 0`, documents of the splits in `fim.splits` (default: train only, so val / test
bits per byte stay comparable with plain runs) become fill-in-the-middle examples at that rate
before packing (`albor.data.fim`: layouts, span choice, seeding); the other documents, and every
document of the other splits, take the plain path unchanged. index.json records the settings and
the number of FIM documents per split.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from tokenizers import Tokenizer

from albor import progress
from albor.artifact import read_manifest, sha256_file
from albor.config import Int, StageConfig
from albor.data.bpe import (
    ALBOR_SPECIAL_TOKENS,
    TOKENIZER_FILES,
    TOKENIZER_JSON,
    SpecialTokens,
    load_tokenizer,
    plain_text,
    special_tokens,
)
from albor.data.corpus import SPLITS, iter_batches, num_rows, open_corpus, require_splits
from albor.data.fim import FORMATS, SENTINELS_PER_DOCUMENT, Draw, FimSettings, encode_packed_fim
from albor.data.shards import (
    FimRecord,
    ShardWriter,
    SplitInfo,
    TokenIndex,
    encode_packed,
    text_batches,
    token_dtype,
)
from albor.errors import ArtifactError
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input, counts

NAME = "tokenize"
INPUTS = ("corpus", "tokenizer")

DEFAULT_BYTES_PER_TOKEN = 3.5
# Rough encode speed per CPU core; only for the plan's estimate.
_ENCODE_BYTES_PER_S_PER_CORE = 2.5e6

SplitName = Literal["train", "val", "test"]


def _all_splits() -> list[SplitName]:
    return ["train", "val", "test"]


def _train_only() -> list[SplitName]:
    return ["train"]


def _distinct_splits(value: list[SplitName]) -> list[SplitName]:
    if len(set(value)) != len(value):
        raise ValueError("a split is listed twice: list each once")
    return value


class FimConfig(StageConfig):
    """Fill-in-the-middle settings of the tokenize stage (off unless `rate` > 0)."""

    rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of documents turned into FIM examples (0: FIM off; StarCoder "
        "trained with 0.5).",
    )
    spm_rate: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Fraction of FIM examples in SPM layout "
        "(<|fim_suffix|>suffix<|fim_prefix|>prefix<|fim_middle|>middle); the rest are PSM.",
    )
    seed: int = Field(
        0,
        description="Seed of the FIM draws; with each document's sha256 and position it fixes "
        "which documents are cut, where, and in which layout.",
    )
    splits: list[SplitName] = Field(
        default_factory=_train_only,
        description="Splits whose documents may become FIM examples (default: train only, so "
        "val / test bits per byte stay comparable).",
    )

    _distinct = field_validator("splits")(_distinct_splits)

    def settings(self) -> FimSettings:
        return FimSettings(rate=self.rate, spm_rate=self.spm_rate, seed=self.seed)

    def applies_to(self, split: str) -> bool:
        return self.rate > 0 and split in self.splits


class Config(OutputConfig):
    corpus: Path | None = Field(
        None, description="Split artifact directory (train / val / test Parquet, from split)."
    )
    tokenizer: Path | None = Field(
        None, description="Tokenizer artifact directory (from the tokenizer stage)."
    )
    shard_tokens: Int = Field(
        16 * 1024**2, gt=0, description="Tokens per shard (the last one of a split holds fewer)."
    )
    splits: list[SplitName] = Field(
        default_factory=_all_splits, description="Splits to encode (default: all three)."
    )
    batch_rows: int = Field(1024, gt=0, description="Rows per record batch while streaming.")
    fim: FimConfig = Field(
        default_factory=FimConfig,
        description="Fill-in-the-middle transform applied per document before packing: "
        "{rate, spm_rate, seed, splits}; off by default (rate 0).",
    )

    @field_validator("splits")
    @classmethod
    def _distinct(cls, value: list[SplitName]) -> list[SplitName]:
        if not value:
            raise ValueError("name at least one split (train, val, test)")
        return _distinct_splits(value)


def _tokenizer_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of an artifact that holds the tokenizer files (tokenizer stage, checkpoint)."""
    manifest = read_manifest(directory)
    have = {o["path"] for o in manifest["outputs"]}
    missing = [f for f in TOKENIZER_FILES if f not in have]
    if missing:
        raise ArtifactError(
            f"{directory}: artifact of stage '{manifest['stage']}' lacks {', '.join(missing)} "
            "(point `tokenizer:` at the output of the tokenizer stage)"
        )
    return manifest


def _split_sizes(directory: Path, manifest: dict[str, Any], split: str) -> tuple[int, int]:
    """(documents, UTF-8 bytes) of a split, from the manifest when it records them."""
    metrics = manifest.get("metrics") or {}
    docs = (metrics.get("documents") or {}).get(split)
    size = (metrics.get("bytes") or {}).get(split)
    if not isinstance(docs, int):
        docs = num_rows(directory / f"{split}.parquet")
    if not isinstance(size, int):
        table = open_corpus(directory / f"{split}.parquet").read(columns=["bytes"])
        size = sum(table.column("bytes").to_pylist())
    return int(docs), int(size)


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    ctx = ctx or PlanContext()
    p = Plan(NAME)

    def split_sizes(path: Path) -> dict[str, tuple[int, int]]:
        manifest = require_splits(path)
        return {s: _split_sizes(path, manifest, s) for s in cfg.splits}

    sizes = check_input(p, ctx, "corpus", cfg.corpus, split_sizes, "a split artifact directory")
    if sizes is not None:
        total = sum(b for _, b in sizes.values())
        p.add("corpus", "ok", f"{cfg.corpus}: {total / 1e6:.1f} MB in {', '.join(cfg.splits)}")

    vocab: int | None = None
    bytes_per_token = DEFAULT_BYTES_PER_TOKEN

    def tokenizer_info(path: Path) -> tuple[dict[str, Any], int]:
        return _tokenizer_manifest(path), load_tokenizer(path).get_vocab_size()

    found = check_input(
        p, ctx, "tokenizer", cfg.tokenizer, tokenizer_info, "a tokenizer artifact directory"
    )
    if found is not None:
        tok_manifest, vocab = found
        p.add("tokenizer", "ok", f"{cfg.tokenizer}: vocab {vocab}")
        reported = (tok_manifest.get("metrics") or {}).get("bytes_per_token")
        if isinstance(reported, (int, float)) and reported > 0:
            bytes_per_token = float(reported)

    itemsize = 2
    if vocab is not None:
        try:
            dtype = token_dtype(vocab)
        except ValueError as e:
            p.add("dtype", "fail", f"{e}: train a tokenizer with a smaller vocab_size")
        else:
            itemsize = dtype.itemsize
            p.add("dtype", "ok", f"{dtype.name}: ids 0..{vocab - 1} fit")
            p.estimates["dtype"] = dtype.name
    else:
        p.estimates["dtype"] = "uint16 if the vocab is at most 65536, else uint32"

    p.estimates["bytes_per_token"] = bytes_per_token
    fim_splits = [s for s in cfg.splits if cfg.fim.applies_to(s)]
    p.estimates["fim"] = {
        **cfg.fim.settings().to_json(),
        "splits": fim_splits,
        "formats": dict(FORMATS) if fim_splits else {},
    }
    if cfg.fim.rate > 0:
        p.warn_if(
            "fim",
            not fim_splits,
            f"fim.rate is {cfg.fim.rate:g} but none of fim.splits ({', '.join(cfg.fim.splits)}) "
            "is encoded: no document will become FIM (add the split to `splits` or `fim.splits`)",
            f"FIM on {', '.join(fim_splits)}",
        )
        p.warn_if(
            "fim splits",
            any(s != "train" for s in fim_splits),
            "FIM on val/test: their bits per byte are no longer comparable with plain runs "
            "(keep fim.splits: [train] unless that is the point)",
            "val / test stay plain",
        )
    if sizes is not None:
        fim_docs = {s: round(sizes[s][0] * cfg.fim.rate) if s in fim_splits else 0 for s in sizes}
        p.estimates["fim"]["documents"] = fim_docs
        tokens = {
            s: round(b / bytes_per_token) + d + SENTINELS_PER_DOCUMENT * fim_docs[s]
            for s, (d, b) in sizes.items()
        }
        p.estimates["documents"] = {s: d for s, (d, _) in sizes.items()}
        p.estimates["tokens"] = tokens
        p.estimates["shards"] = {s: math.ceil(t / cfg.shard_tokens) for s, t in tokens.items()}
        p.estimates["disk_bytes"] = sum(tokens.values()) * itemsize
        total_bytes = sum(b for _, b in sizes.values())
        cores = min(os.cpu_count() or 1, 16)
        p.estimates["wall_time_s"] = round(total_bytes / (_ENCODE_BYTES_PER_S_PER_CORE * cores), 1)
        if "train" in tokens:
            p.warn_if(
                "train tokens",
                sizes["train"][0] == 0,
                "the train split is empty: pretraining will have nothing to read",
                f"about {tokens['train']:,} train tokens",
            )
    if fim_splits:
        p.actions.append(
            f"turn a {cfg.fim.rate:g} fraction of the {', '.join(fim_splits)} documents into FIM "
            f"examples ({cfg.fim.spm_rate:g} of them SPM, the rest PSM; seed {cfg.fim.seed})"
        )
    p.actions.append(
        f"encode {', '.join(cfg.splits)} into shards of {cfg.shard_tokens:,} tokens under "
        f"{cfg.output}, with index.json and the tokenizer files"
    )
    return p


def encode_split(
    tok: Tokenizer,
    corpus: Path,
    split: str,
    writer: ShardWriter,
    batch_rows: int,
    fim: FimSettings | None = None,
    specials: SpecialTokens = ALBOR_SPECIAL_TOKENS,
) -> tuple[int, SplitInfo, int]:
    """Encode one split into `writer`, FIM-transforming documents when `fim` is given; EOS and
    the FIM sentinels are `specials`' ids (an adopted tokenizer's may differ from albor's).

    Returns (documents read, what was written, documents packed as FIM examples).
    """
    path = corpus / f"{split}.parquet"
    columns = ["text", "bytes"] if fim is None else ["text", "bytes", "sha256"]
    read = fim_docs = 0
    with progress.bar(f"tokenize {split}", num_rows(path)) as bar:
        for batch in iter_batches(path, columns, batch_rows):
            texts = batch.column("text").to_pylist()
            sizes = batch.column("bytes").to_pylist()
            if fim is None:
                for chunk, chunk_sizes in text_batches(texts, sizes):
                    ids, lengths = encode_packed(tok, chunk, writer.dtype, specials.eos_id)
                    writer.write(ids, lengths, chunk_sizes)
            else:
                hashes = batch.column("sha256").to_pylist()
                # The position in the split keys the draw, so copies of a document differ.
                draws = [
                    fim.draw(len(text), sha, read + i)
                    for i, (text, sha) in enumerate(zip(texts, hashes, strict=True))
                ]
                fim_docs += sum(d is not None for d in draws)
                start = 0
                for chunk, chunk_sizes in text_batches(texts, sizes):
                    chunk_draws: list[Draw | None] = draws[start : start + len(chunk)]
                    start += len(chunk)
                    ids, lengths = encode_packed_fim(
                        tok, chunk, chunk_draws, writer.dtype, specials.eos_id, specials.fim_ids
                    )
                    writer.write(ids, lengths, chunk_sizes)
            read += len(texts)
            bar.advance(len(texts))
    return read, writer.close(), fim_docs


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    assert cfg.corpus is not None and cfg.tokenizer is not None
    loaded = load_tokenizer(cfg.tokenizer)
    specials = special_tokens(cfg.tokenizer, loaded)
    vocab = loaded.get_vocab_size()
    dtype = token_dtype(vocab)
    tok = plain_text(loaded)
    for name in TOKENIZER_FILES:
        shutil.copyfile(cfg.tokenizer / name, ctx.out / name)

    splits: dict[str, SplitInfo] = {}
    fim_docs: dict[str, int] = {}
    documents_in = 0
    t0 = time.perf_counter()
    for split in (s for s in SPLITS if s in cfg.splits):
        writer = ShardWriter(ctx.out, split, cfg.shard_tokens, dtype)
        fim = cfg.fim.settings() if cfg.fim.applies_to(split) else None
        read, splits[split], fim_docs[split] = encode_split(
            tok, cfg.corpus, split, writer, cfg.batch_rows, fim, specials
        )
        documents_in += read
    seconds = time.perf_counter() - t0
    fim_record = FimRecord(
        rate=cfg.fim.rate,
        spm_rate=cfg.fim.spm_rate,
        seed=cfg.fim.seed,
        splits=[s for s in splits if cfg.fim.applies_to(s)],
        formats={str(mode): layout for mode, layout in FORMATS.items()},
        documents=fim_docs,
    )

    TokenIndex(
        vocab_size=vocab,
        dtype=dtype.name,
        eos_id=specials.eos_id,
        tokenizer_sha256=sha256_file(ctx.out / TOKENIZER_JSON),
        splits=splits,
        fim=fim_record,
    ).write(ctx.out)

    written = sum(s.documents for s in splits.values())
    total_bytes = sum(s.bytes for s in splits.values())
    # Bytes per token of the text alone: EOS separators and FIM sentinels are not text.
    text = {
        name: s.tokens - s.documents - SENTINELS_PER_DOCUMENT * fim_docs[name]
        for name, s in splits.items()
    }
    text_tokens = sum(text.values())
    mb_per_s = round(total_bytes / 1e6 / seconds, 2) if seconds > 0 else None
    bpt = {
        name: round(s.bytes / text[name], 4) if text[name] > 0 else None
        for name, s in splits.items()
    }
    summary = ", ".join(
        f"{name} {s.tokens:,} tokens in {len(s.shards)} shard(s)" for name, s in splits.items()
    )
    if any(fim_docs.values()):
        summary += "; FIM " + ", ".join(f"{n} {name}" for name, n in fim_docs.items() if n)
    overall = round(total_bytes / text_tokens, 3) if text_tokens else None
    return Outcome(
        summary=f"{summary}; {overall} bytes/token, {mb_per_s} MB/s ({dtype.name})",
        counts=counts(documents_in, written, {}),
        metrics={
            "vocab_size": vocab,
            "dtype": dtype.name,
            "tokens": {name: s.tokens for name, s in splits.items()},
            "documents": {name: s.documents for name, s in splits.items()},
            "bytes": {name: s.bytes for name, s in splits.items()},
            "shards": {name: len(s.shards) for name, s in splits.items()},
            "fim_documents": fim_docs,
            "bytes_per_token": bpt,
            "encode_seconds": round(seconds, 3),
            "mb_per_s": mb_per_s,
        },
    )
