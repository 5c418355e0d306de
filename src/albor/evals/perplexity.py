"""Perplexity and bits per byte of a model, and of a unigram baseline, on the same token windows.

Bits per byte is the tokenizer-independent measure: the summed negative log-likelihood (in bits)
of the targets divided by the UTF-8 bytes they stand for. Special tokens stand for no bytes; as in
nanochat, they are left out of both sums so that a model cannot gain by predicting separators.

`score_model` scores token windows (every target counts); `score_masked` scores inputs and
targets where some targets are `IGNORE` (a pair's prompt, padding): those count in no sum, so the
loss is the mean over the scored targets and bits per byte is over the bytes they stand for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from albor.data.pair_windows import IGNORE


@dataclass
class Scores:
    loss: float  # mean nats per target token (all targets)
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def to_json(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class _Accumulator:
    def __init__(self, token_bytes: np.ndarray) -> None:
        self.token_bytes = torch.from_numpy(np.asarray(token_bytes, dtype=np.int64))
        self.nll = 0.0
        self.nll_bytes = 0.0
        self.tokens = 0
        self.bytes = 0

    def add(self, nll: torch.Tensor, targets: torch.Tensor) -> None:
        targets = targets.cpu().reshape(-1)
        scored = targets != IGNORE
        nll = nll.double().cpu().reshape(-1)[scored]
        targets = targets[scored]
        b = self.token_bytes[targets]
        self.nll += float(nll.sum())
        self.nll_bytes += float(nll[b > 0].sum())
        self.tokens += int(targets.numel())
        self.bytes += int(b.sum())

    def scores(self) -> Scores:
        loss = self.nll / max(self.tokens, 1)
        bpb = self.nll_bytes / math.log(2) / self.bytes if self.bytes else float("nan")
        return Scores(loss, math.exp(min(loss, 700.0)), bpb, self.tokens, self.bytes)


@torch.inference_mode()
def _score(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    token_bytes: np.ndarray,
    device: torch.device | str,
) -> Scores:
    acc = _Accumulator(token_bytes)
    was_training = model.training
    model.eval()
    try:
        for inputs, targets in batches:
            targets = targets.to(device)
            logits = model(inputs.to(device))
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=IGNORE,
                reduction="none",
            )
            acc.add(nll, targets)
    finally:
        model.train(was_training)
    return acc.scores()


def score_model(
    model: nn.Module,
    windows: Iterable[torch.Tensor],
    token_bytes: np.ndarray,
    device: torch.device | str = "cpu",
) -> Scores:
    """Score `(B, T + 1)` windows: predict tokens 1..T from 0..T-1."""
    return _score(model, ((w[:, :-1], w[:, 1:]) for w in windows), token_bytes, device)


def score_masked(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    token_bytes: np.ndarray,
    device: torch.device | str = "cpu",
) -> Scores:
    """Score `(B, 2, T)` batches of inputs and targets (`pair_windows.EncodedPairs.rows`):
    targets `IGNORE` count in neither the loss nor bits per byte."""
    return _score(model, ((b[:, 0], b[:, 1]) for b in batches), token_bytes, device)


def unigram_logprobs(counts: np.ndarray) -> torch.Tensor:
    """Log-probabilities of a unigram model with add-one smoothing over the whole vocabulary."""
    c = torch.from_numpy(np.asarray(counts, dtype=np.float64)) + 1.0
    return torch.log(c / c.sum())


def score_unigram(
    counts: np.ndarray, windows: Iterable[torch.Tensor], token_bytes: np.ndarray
) -> Scores:
    """The same scores for a unigram model fitted on `counts` (train-split token frequencies)."""
    logp = unigram_logprobs(counts)
    acc = _Accumulator(token_bytes)
    for w in windows:
        targets = w[:, 1:]
        acc.add(-logp[targets], targets)
    return acc.scores()


def token_counts(shards: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for s in shards:
        counts += np.bincount(np.asarray(s), minlength=vocab_size)[:vocab_size]
    return counts
