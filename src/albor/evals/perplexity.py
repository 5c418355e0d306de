"""Perplexity and bits per byte of a model, and of a unigram baseline, on the same token windows.

Bits per byte is the tokenizer-independent measure: the summed negative log-likelihood (in bits)
of the targets divided by the UTF-8 bytes they stand for. Special tokens stand for no bytes; as in
nanochat, they are left out of both sums so that a model cannot gain by predicting separators.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


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
        nll = nll.double().cpu().reshape(-1)
        targets = targets.cpu().reshape(-1)
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
def score_model(
    model: nn.Module, windows: Iterable[torch.Tensor], token_bytes: np.ndarray, device: str = "cpu"
) -> Scores:
    """Score `(B, T + 1)` windows: predict tokens 1..T from 0..T-1."""
    acc = _Accumulator(token_bytes)
    was_training = model.training
    model.eval()
    try:
        for w in windows:
            w = w.to(device)
            logits = model(w[:, :-1])
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="none"
            )
            acc.add(nll, w[:, 1:])
    finally:
        model.train(was_training)
    return acc.scores()


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
