"""The evaluate task `pairs`: how well a model writes a function's body given its signature and
docstring, as bits per byte of the body on held-out pairs of a pairs artifact (`pairs:`, the
pairs stage's output). It is what the instruct step is judged by: after finetuning on the train
pairs, the val pairs' figure should be lower than the base's.

Each pair is tokenized exactly as finetune tokenizes it (`albor.data.pair_windows`): prompt ids +
completion ids + eos in the model's tokenizer (the one beside its weights; a pairs artifact is
text and holds none), the prompt's targets masked, a pair longer than `seq_len + 1` tokens cut
at the end of its completion, one whose prompt fills the window dropped (both counted). The
split's pairs are read in order, `batch_size` at a time, until `max_tokens` completion targets
are covered, and scored by `albor.evals.perplexity.score_masked`: `loss` is the mean over the
completion targets (eos included), bits per byte the completion targets' summed loss in bits
over the UTF-8 bytes they stand for (eos stands for none, so it counts in neither sum). Metrics:
those two, `tokens` and `bytes` scored, `pairs` scored, and of the split's first `limit` pairs
how many were `truncated` or `dropped`. With
finetune's `seq_len` and `eval_tokens` as `seq_len` and `max_tokens`, the val split gives the
`val_loss` and `val_bpb` that finetune reports for its final weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from albor import progress
from albor.config import Int, StageConfig
from albor.errors import ArtifactError, ConfigError, DataError
from albor.evals.tasks import Models, Planning, Split
from albor.stage import check_input


class PairsTask(StageConfig):
    """Bits per byte of each body given its prompt, on one split of the `pairs` artifact."""

    task: Literal["pairs"]
    name: str | None = Field(None, description="Key in metrics.json; default: the task type.")
    split: Split = Field(
        "val",
        description="Split of `pairs` to score: val and test hold pairs of files that the "
        "train split (what finetune trains on) never saw.",
    )
    limit: Int | None = Field(None, gt=0, description="Score only the split's first N pairs.")
    max_tokens: Int = Field(
        262144,
        gt=0,
        description="Most completion tokens scored: pairs are taken in order until they cover "
        "this many (finetune's `eval_tokens` for its val_bpb).",
    )
    seq_len: Int | None = Field(
        None,
        gt=0,
        description="Window in tokens (default: the model's context): a longer pair loses the "
        "end of its body; finetune's `seq_len` for its val_bpb.",
    )
    batch_size: Int = Field(8, gt=0, description="Pairs per forward pass.")


def read_pairs(directory: Path) -> dict[str, int]:
    """Pairs per split of a pairs artifact; ArtifactError when it is not one."""
    from albor.data.pairs import split_sizes

    return split_sizes(directory, "pairs")


def plan(t: PairsTask, pl: Planning, name: str) -> dict[str, Any]:
    p, mc, inputs = pl.p, pl.model, pl.inputs
    est: dict[str, Any] = {}
    found = check_input(p, pl.ctx, "pairs", inputs.pairs, read_pairs, "a pairs artifact directory")
    if found is not None:
        n = found.get(t.split, 0)
        scored = min(n, t.limit or n)
        p.require(
            name,
            n > 0,
            f"{inputs.pairs}: {t.split} pairs {n}"
            + (f", the first {scored}" if scored < n else ""),
            f"{inputs.pairs}: the {t.split} split holds no pairs: set the task's `split` to one "
            f"that does ({', '.join(s for s, k in found.items() if k) or 'none'}) or mine more "
            "source with the pairs stage",
        )
        est["pairs"] = scored
    if mc is None or inputs.model is None:
        return est
    seq = t.seq_len or mc.max_seq_len
    p.require(
        f"{name}.seq_len",
        seq <= mc.max_seq_len,
        f"windows of {seq} tokens (context {mc.max_seq_len})",
        f"seq_len {seq} exceeds the model's context {mc.max_seq_len}: lower it",
    )
    _plan_tokenizer(pl, inputs.model, name)
    return est


def _plan_tokenizer(pl: Planning, model: Path, name: str) -> None:
    """The tokenizer beside the model tokenizes the pairs: it must fit the model's embedding,
    name its eos and be byte-level (bits per byte needs each token's bytes)."""
    from albor.data.bpe import TOKENIZER_JSON, load_tokenizer, special_tokens, token_byte_lengths

    assert pl.model is not None
    vocab = pl.model.vocab_size
    try:
        tokenizer = load_tokenizer(model)
        eos = special_tokens(model, tokenizer)
        token_byte_lengths(tokenizer)
    except ArtifactError as e:
        pl.p.add(f"{name}.tokenizer", "fail", str(e))
        return
    ids = tokenizer.get_vocab_size()
    pl.p.require(
        f"{name}.tokenizer",
        ids <= vocab,
        f"{model / TOKENIZER_JSON}: {ids} ids for the model's {vocab}, eos "
        f"{eos.tokens['eos']} ({eos.eos_id})",
        f"{model / TOKENIZER_JSON} has {ids} ids but the model's embedding only {vocab}: it is "
        "not the tokenizer the model was trained with; copy that one beside the weights",
    )


def run(t: PairsTask, models: Models, name: str, out: Path) -> tuple[dict[str, Any], str]:
    """Loss and bits per byte of the split's completions, in metrics.json only."""
    import numpy as np

    from albor.data.bpe import load_tokenizer, plain_text, special_tokens, token_byte_lengths
    from albor.data.pair_windows import encode_pairs, eval_batches, read_split
    from albor.evals.perplexity import score_masked

    directory = models.inputs.require_model()
    source = models.inputs.pairs
    if source is None:
        raise ConfigError("pairs: the pairs task needs `pairs:`, a pairs artifact directory")
    split_sizes = read_pairs(source)
    if not split_sizes.get(t.split):
        raise DataError(f"{source}: the {t.split} split holds no pairs: score another split")
    prompts, completions = read_split(source, t.split)
    prompts, completions = prompts[: t.limit], completions[: t.limit]
    model, mc = models.model()
    seq = t.seq_len or mc.max_seq_len
    tokenizer = load_tokenizer(directory)
    eos = special_tokens(directory, tokenizer).eos_id
    encoded = encode_pairs(plain_text(tokenizer), prompts, completions, eos, seq)
    if not len(encoded):
        raise DataError(
            f"{source}: no {t.split} pair fits a window of {seq} tokens (each prompt fills it "
            "alone): raise the task's seq_len (up to the model's context)"
        )
    # Pairs the batches cover: they stop after the pair that reaches max_tokens.
    covered = np.cumsum(
        [len(ids) - n for ids, n in zip(encoded.ids, encoded.prompt_lens, strict=True)]
    )
    used = min(int(np.searchsorted(covered, t.max_tokens)) + 1, len(encoded))
    rows = 0

    def batches() -> Any:
        nonlocal rows
        for b in eval_batches(encoded, t.batch_size, t.max_tokens):
            rows += len(b)
            yield b

    total = -(-used // t.batch_size)
    tracked = progress.track(batches(), f"{t.split} pairs: scoring", total=total)
    scores = score_masked(model, tracked, token_byte_lengths(tokenizer), models.device)
    metrics: dict[str, Any] = {"split": t.split, **scores.to_json()}
    metrics.update(pairs=rows, truncated=encoded.truncated, dropped=encoded.dropped, seq_len=seq)
    summary = (
        f"{t.split} pairs: bits/byte {scores.bits_per_byte:.3f}, loss {scores.loss:.3f} over "
        f"{scores.tokens:,} completion tokens of {rows} pairs"
    )
    return metrics, summary
