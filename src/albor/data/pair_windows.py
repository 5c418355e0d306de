"""Prompt -> completion pairs as training windows: (B, 2, T) inputs and targets, prompts masked.

Each pair is tokenized as prompt ids + completion ids + eos (prompt and completion encoded apart,
so the cut between them is exact), then shifted: inputs are ids[:-1], targets ids[1:], and every
target that is still part of the prompt is `IGNORE`, so only the completion (and its eos) is
scored. A pair longer than `seq_len + 1` tokens loses the end of its completion (counted as
truncated); one whose prompt alone fills the window has nothing left to score and is dropped
(counted). Each row holds one pair, padded to `seq_len` with targets `IGNORE`.

Training rows are drawn by a generator seeded with (seed, step, micro), as `windows.WindowSampler`
draws token windows: the batch of any step is a pure function of the step, so a resumed run sees
exactly the batches of an uninterrupted one. Validation reads the split's pairs in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from albor.errors import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

IGNORE = -100  # the target no loss counts: NextToken's and the model's ignore_index


@dataclass
class EncodedPairs:
    """A split's pairs as token ids (`ids[i]`: prompt + completion + eos, cut to the window)
    with the prompt's length; what was cut or dropped is counted."""

    seq_len: int
    ids: list[np.ndarray] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0  # the prompt alone filled the window: nothing to score

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def scored(self) -> int:
        """Targets scored over every pair: the completion tokens kept, eos included."""
        return sum(len(ids) - n for ids, n in zip(self.ids, self.prompt_lens, strict=True))

    def rows(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """(len(indices), 2, seq_len): inputs and targets of those pairs, one per row."""
        out = np.full((len(indices), 2, self.seq_len), IGNORE, dtype=np.int64)
        out[:, 0] = 0  # padding inputs: any id; their targets are ignored
        for row, i in enumerate(indices):
            ids = self.ids[i]
            t = len(ids) - 1
            out[row, 0, :t] = ids[:-1]
            out[row, 1, :t] = mask_prompt(ids[1:], self.prompt_lens[i])
        return torch.from_numpy(out)


def mask_prompt(labels: np.ndarray, prompt_len: int) -> np.ndarray:
    """`labels` (ids[1:] of a pair) with the prompt's positions set to `IGNORE`: target j
    predicts ids[j + 1], which is part of the prompt while j + 1 < prompt_len."""
    out = np.array(labels, dtype=np.int64)
    out[: max(prompt_len - 1, 0)] = IGNORE
    return out


def encode_pairs(
    tokenizer: Tokenizer,
    prompts: list[str],
    completions: list[str],
    eos_id: int,
    seq_len: int,
) -> EncodedPairs:
    """Tokenize pairs for windows of `seq_len` (`tokenizer` encodes special-token spellings as
    text: `bpe.plain_text`)."""
    found = EncodedPairs(seq_len)
    prompt_ids = tokenizer.encode_batch(prompts, add_special_tokens=False)
    completion_ids = tokenizer.encode_batch(completions, add_special_tokens=False)
    for p, c in zip(prompt_ids, completion_ids, strict=True):
        n = len(p.ids)
        if n >= seq_len + 1:
            found.dropped += 1
            continue
        ids = np.array([*p.ids, *c.ids, eos_id], dtype=np.int64)
        if len(ids) > seq_len + 1:
            ids = ids[: seq_len + 1]
            found.truncated += 1
        found.ids.append(ids)
        found.prompt_lens.append(n)
    return found


class PairSampler:
    """Random rows of a split's pairs, a deterministic function of (seed, step, micro)."""

    def __init__(self, pairs: EncodedPairs, seed: int) -> None:
        if not len(pairs):
            raise DataError(
                f"no training pair fits a window of {pairs.seq_len} tokens ({pairs.dropped} "
                "prompts fill it alone): raise seq_len, or lower the pairs stage's "
                "max_prompt_chars"
            )
        self.pairs = pairs
        self.seq_len = pairs.seq_len
        self.seed = seed

    @property
    def tokens(self) -> int:
        """Window tokens of one pass over the pairs (a row per pair): what a step's tokens,
        counted in windows, are divided by for the data's repeats."""
        return len(self.pairs) * self.seq_len

    def batch(self, step: int, micro: int, batch_size: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step, micro])
        return self.pairs.rows(rng.integers(0, len(self.pairs), batch_size))


def eval_batches(pairs: EncodedPairs, batch_size: int, max_tokens: int) -> Iterator[torch.Tensor]:
    """The split's pairs in order, `batch_size` rows at a time, until `max_tokens` completion
    targets are covered (every evaluation sees the same pairs)."""
    covered, start = 0, 0
    while start < len(pairs) and covered < max_tokens:
        end = start
        while end < len(pairs) and end - start < batch_size and covered < max_tokens:
            covered += len(pairs.ids[end]) - pairs.prompt_lens[end]
            end += 1
        yield pairs.rows(list(range(start, end)))
        start = end


def read_split(directory: Path, split: str) -> tuple[list[str], list[str]]:
    """The prompts and completions of one split of a pairs artifact."""
    import pyarrow.parquet as pq

    path = directory / f"{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path} not found: not a pairs artifact (run the pairs stage)")
    table = pq.read_table(path, columns=["prompt", "completion"])
    return table.column("prompt").to_pylist(), table.column("completion").to_pylist()
