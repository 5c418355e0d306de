"""The evaluate task `perplexity`: perplexity and bits per byte of one split of a tokenize
artifact (`data`) beside a unigram baseline (token frequencies of the train split, add-one
smoothed, scored on exactly the same targets: a model that has learned anything beyond token
frequencies is clearly below it), or of `text:` files tokenized with the model's tokenizer.
The scoring itself is `albor.evals.perplexity`'s.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from albor import progress
from albor.config import Int, StageConfig
from albor.errors import DataError
from albor.evals.tasks import Models, Planning, Split
from albor.stage import check_input

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class PerplexityTask(StageConfig):
    """Perplexity and bits per byte on token shards (`data`'s split) or on text files."""

    task: Literal["perplexity"]
    name: str | None = Field(None, description="Key in metrics.json; default: the task type.")
    split: Split = Field("val", description="Split of `data` to score (without `text`).")
    text: Path | None = Field(
        None,
        description="Score these instead of token shards: a text file, a directory of .py "
        "files, or a corpus artifact (corpus.parquet); tokenized with the model's tokenizer.",
    )
    max_tokens: Int = Field(262144, gt=0, description="Most target tokens scored.")
    seq_len: Int | None = Field(None, gt=0, description="Window length; default: the context.")
    batch_size: Int = Field(8, gt=0, description="Windows per forward pass.")


def plan(t: PerplexityTask, pl: Planning, name: str) -> dict[str, Any]:
    from albor.data.shards import TokenIndex

    p, mc, inputs = pl.p, pl.model, pl.inputs
    seq = t.seq_len
    if mc is not None:
        seq = seq or mc.max_seq_len
        p.require(
            "model" if inputs.flat else name,
            seq <= mc.max_seq_len,
            f"{inputs.model} (context {mc.max_seq_len})",
            f"seq_len {seq} exceeds the model's context {mc.max_seq_len}: lower it",
        )
    if t.text is not None:
        ok = t.text.exists()
        p.require(
            name,
            ok,
            f"{t.text}: text to score",
            f"{t.text}: not found; `text:` is a file, a directory of .py files or a corpus "
            "artifact",
        )
        if ok:
            p.estimates[f"{name}.text_bytes"] = _text_bytes(t.text)
        return {}
    index = check_input(
        p, pl.ctx, "data", inputs.data, TokenIndex.load, "a tokenize output directory"
    )
    if index is None:
        return {}
    split = index.splits.get(t.split)
    tokens = split.tokens if split else 0
    p.require(
        "data",
        tokens > (seq or 1),
        f"{inputs.data}: {tokens:,} {t.split} tokens",
        f"{inputs.data}: the {t.split} split has {tokens} tokens, too few to score "
        "(pick another split or add data)",
    )
    p.estimates["tokens_scored" if inputs.flat else f"{name}.tokens_scored"] = min(
        tokens, t.max_tokens
    )
    if mc is not None:
        p.require(
            "vocab",
            mc.vocab_size == index.vocab_size,
            f"{mc.vocab_size} ids",
            f"model vocab {mc.vocab_size} != tokenizer vocab {index.vocab_size}: evaluate "
            "on data tokenized with the model's tokenizer",
        )
    return {}


def _text_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    corpus = path / "corpus.parquet"
    if corpus.exists():
        return corpus.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*.py"))


def run(t: PerplexityTask, models: Models, name: str, out: Path) -> tuple[dict[str, Any], str]:
    """The scores, in metrics.json only (`out` gets no file)."""
    import numpy as np

    from albor.data.bpe import load_tokenizer, token_byte_lengths
    from albor.data.shards import open_split
    from albor.data.windows import eval_token_count, eval_windows
    from albor.evals.perplexity import score_model, score_unigram, token_counts

    model, mc = models.model()
    data = models.inputs.data
    seq = t.seq_len or mc.max_seq_len
    if t.text is not None:
        directory = models.inputs.require_model()
        tokenizer = load_tokenizer(directory)
        shards = [np.asarray(_encode_texts(tokenizer, directory, t.text), dtype=np.int64)]
        where = str(t.text)
    else:
        assert data is not None  # plan requires it
        tokenizer = load_tokenizer(data)
        shards = open_split(data, t.split)
        where = f"{t.split} split"
    token_bytes = token_byte_lengths(tokenizer)

    def windows() -> Any:
        return eval_windows(shards, seq, t.max_tokens, t.batch_size)

    batches = -(-eval_token_count(shards, seq, t.max_tokens) // (seq * t.batch_size))
    scored = progress.track(windows(), f"{where}: scoring", total=batches)
    scores = score_model(model, scored, token_bytes, models.device)
    metrics: dict[str, Any] = {"split": t.split} if t.text is None else {"text": str(t.text)}
    metrics.update(scores.to_json())
    summary = (
        f"{where} bits/byte {scores.bits_per_byte:.3f}, perplexity {scores.perplexity:.2f} "
        f"over {scores.tokens:,} tokens"
    )
    if data is not None:
        from albor.data.shards import TokenIndex

        index = TokenIndex.load(data)
        counts = token_counts(open_split(data, "train"), index.vocab_size)
        unigram = score_unigram(counts, windows(), token_bytes)
        metrics["unigram"] = unigram.to_json()
        metrics["bits_per_byte_vs_unigram"] = round(scores.bits_per_byte / unigram.bits_per_byte, 4)
        summary = (
            f"{where} bits/byte {scores.bits_per_byte:.3f} (unigram baseline "
            f"{unigram.bits_per_byte:.3f}), perplexity {scores.perplexity:.2f} over "
            f"{scores.tokens:,} tokens"
        )
    return metrics, summary


def _texts(path: Path) -> Iterator[str]:
    from albor.data.corpus import CORPUS_FILE, iter_texts

    if path.is_file():
        yield path.read_text(encoding="utf-8")
    elif (path / CORPUS_FILE).exists():
        yield from iter_texts(path / CORPUS_FILE)
    else:
        for f in sorted(path.rglob("*.py")):
            yield f.read_text(encoding="utf-8", errors="replace")


def _encode_texts(tokenizer: Tokenizer, directory: Path, path: Path) -> list[int]:
    """Every text, encoded as plain text, each followed by the eos of the tokenizer in
    `directory` (the training layout; an adopted tokenizer spells its eos its own way)."""
    from albor.data.bpe import plain_text, special_tokens

    plain = plain_text(tokenizer)
    eos = special_tokens(directory, tokenizer).eos_id
    ids: list[int] = []
    for text in _texts(path):
        ids += plain.encode(text, add_special_tokens=False).ids
        ids.append(eos)
    if len(ids) < 2:
        raise DataError(f"{path}: no text to score")
    return ids
