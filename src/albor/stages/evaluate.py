"""evaluate: perplexity and bits per byte of a checkpoint on one split of a tokenize artifact.

Beside the model's figures it reports a unigram baseline (token frequencies of the train split,
add-one smoothed) scored on exactly the same targets: a model that has learned anything beyond
token frequencies is clearly below it in bits per byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from albor.artifact import atomic_write_json
from albor.config import Int
from albor.plan import Plan
from albor.stage import ApplyContext, Outcome, OutputConfig, PlanContext, check_input

NAME = "evaluate"
INPUTS = ("model", "data")


class Config(OutputConfig):
    model: Path | None = Field(None, description="Checkpoint directory (pretrain output).")
    data: Path | None = Field(None, description="Token shard artifact directory (tokenize output).")
    split: Literal["train", "val", "test"] = Field("val", description="Split to score.")
    max_tokens: Int = Field(262144, gt=0, description="Most target tokens scored.")
    seq_len: Int | None = Field(None, gt=0, description="Window length; default: the context.")
    batch_size: Int = Field(8, gt=0, description="Windows per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available.")


def plan(cfg: Config, ctx: PlanContext | None = None) -> Plan:
    from albor.model.hf import load_config

    ctx = ctx or PlanContext()
    p = Plan(NAME)
    from albor.data.shards import TokenIndex

    vocab = None
    seq = cfg.seq_len
    mc = check_input(p, ctx, "model", cfg.model, load_config, "a checkpoint directory")
    if mc is not None:
        vocab = mc.vocab_size
        seq = seq or mc.max_seq_len
        p.require(
            "model",
            seq <= mc.max_seq_len,
            f"{cfg.model} (context {mc.max_seq_len})",
            f"seq_len {seq} exceeds the model's context {mc.max_seq_len}: lower it",
        )
    index = check_input(p, ctx, "data", cfg.data, TokenIndex.load, "a tokenize output directory")
    if index is not None:
        split = index.splits.get(cfg.split)
        tokens = split.tokens if split else 0
        p.require(
            "data",
            tokens > (seq or 1),
            f"{cfg.data}: {tokens:,} {cfg.split} tokens",
            f"{cfg.data}: the {cfg.split} split has {tokens} tokens, too few to score "
            "(pick another split or add data)",
        )
        p.estimates["tokens_scored"] = min(tokens, cfg.max_tokens)
        if vocab is not None:
            p.require(
                "vocab",
                vocab == index.vocab_size,
                f"{vocab} ids",
                f"model vocab {vocab} != tokenizer vocab {index.vocab_size}: evaluate "
                "on data tokenized with the model's tokenizer",
            )
    p.actions.append(f"score the {cfg.split} split; write metrics.json to {cfg.output}")
    return p


def apply(cfg: Config, ctx: ApplyContext) -> Outcome:
    import torch

    from albor.data.bpe import load_tokenizer, token_byte_lengths
    from albor.data.shards import TokenIndex, open_split
    from albor.data.windows import eval_windows
    from albor.evals.perplexity import score_model, score_unigram, token_counts
    from albor.model.hf import load_pretrained

    assert cfg.model is not None and cfg.data is not None
    device = (
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    model, mc = load_pretrained(cfg.model, device=device)
    index = TokenIndex.load(cfg.data)
    token_bytes = token_byte_lengths(load_tokenizer(cfg.data))
    seq = cfg.seq_len or mc.max_seq_len
    shards = open_split(cfg.data, cfg.split)

    def windows() -> Any:
        return eval_windows(shards, seq, cfg.max_tokens, cfg.batch_size)

    scores = score_model(model, windows(), token_bytes, device)
    unigram = score_unigram(
        token_counts(open_split(cfg.data, "train"), index.vocab_size), windows(), token_bytes
    )
    metrics = {
        "split": cfg.split,
        **scores.to_json(),
        "unigram": unigram.to_json(),
        "bits_per_byte_vs_unigram": round(scores.bits_per_byte / unigram.bits_per_byte, 4),
    }
    atomic_write_json(ctx.out / "metrics.json", metrics)
    summary = (
        f"{cfg.split} bits/byte {scores.bits_per_byte:.3f} (unigram baseline "
        f"{unigram.bits_per_byte:.3f}), perplexity {scores.perplexity:.2f} over "
        f"{scores.tokens:,} tokens"
    )
    return Outcome(summary=summary, metrics=metrics)
