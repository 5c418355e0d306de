"""Pair windows: prompt + completion + eos, shifted, with the prompt's targets masked; long pairs
lose the end of their completion, prompts that fill the window are dropped; batches are a pure
function of (seed, step, micro); masked labels change neither the loss nor the gradient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from albor.data.bpe import plain_text
from albor.data.pair_windows import (
    IGNORE,
    PairSampler,
    encode_pairs,
    eval_batches,
    mask_prompt,
)
from albor.errors import DataError
from albor.evals.perplexity import score_masked
from albor.model.gpt import GPT
from albor.model.presets import preset
from albor.train.objectives import NextToken

PROMPT = 'def double(x):\n    """Twice x."""\n'
COMPLETION = "    return 2 * x\n"
EOS = 0


@pytest.fixture(scope="module")
def tokenizer(token_data: Path) -> Tokenizer:
    return plain_text(Tokenizer.from_file(str(token_data / "tokenizer.json")))


def test_only_the_completion_and_eos_are_targets(tokenizer: Tokenizer) -> None:
    pairs = encode_pairs(tokenizer, [PROMPT], [COMPLETION], EOS, 64)
    p = tokenizer.encode(PROMPT, add_special_tokens=False).ids
    c = tokenizer.encode(COMPLETION, add_special_tokens=False).ids
    row = pairs.rows([0])[0]
    ids = [*p, *c, EOS]
    t = len(ids) - 1
    assert row[0, :t].tolist() == ids[:-1]
    scored = row[1][row[1] != IGNORE].tolist()
    assert scored == [*c, EOS]  # every completion token and the eos, nothing of the prompt
    assert row[1, : len(p) - 1].eq(IGNORE).all() and row[1, t:].eq(IGNORE).all()
    assert pairs.scored == len(c) + 1 and (pairs.truncated, pairs.dropped) == (0, 0)


def test_long_completions_are_cut_and_long_prompts_dropped(tokenizer: Tokenizer) -> None:
    n = len(tokenizer.encode(PROMPT, add_special_tokens=False).ids)
    long = COMPLETION * 40
    pairs = encode_pairs(tokenizer, [PROMPT, PROMPT * 30], [long, COMPLETION], EOS, n + 5)
    assert (len(pairs), pairs.truncated, pairs.dropped) == (1, 1, 1)
    assert len(pairs.ids[0]) == n + 6 and pairs.ids[0][-1] != EOS  # the cut took the eos
    assert int((pairs.rows([0])[0, 1] != IGNORE).sum()) == 6
    with pytest.raises(DataError, match="raise seq_len"):
        PairSampler(encode_pairs(tokenizer, [PROMPT * 30], [COMPLETION], EOS, 8), seed=1)


def test_batches_are_a_pure_function_of_the_step(tokenizer: Tokenizer) -> None:
    prompts = [PROMPT.replace("double", f"f{i}") for i in range(9)]
    pairs = encode_pairs(tokenizer, prompts, [COMPLETION] * 9, EOS, 32)
    a, b = PairSampler(pairs, seed=3), PairSampler(pairs, seed=3)
    assert torch.equal(a.batch(5, 1, 4), b.batch(5, 1, 4))
    assert a.batch(5, 1, 4).shape == (4, 2, 32)
    assert not torch.equal(a.batch(5, 1, 4), a.batch(6, 1, 4))
    covered = sum(int((x[:, 1] != IGNORE).sum()) for x in eval_batches(pairs, 4, 10**9))
    assert covered == pairs.scored  # validation reads every pair once


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2**31 - 1))
def test_masked_prompt_labels_change_neither_loss_nor_gradient(prompt_len: int, seed: int) -> None:
    cfg = preset("tiny", vocab_size=64, num_layers=1)
    torch.manual_seed(0)
    model = GPT(cfg)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 64, 17)
    other = ids.copy()
    other[1:prompt_len] = rng.integers(1, 64, prompt_len - 1)  # the prompt's labels, changed
    inputs = torch.from_numpy(ids[:-1])

    def loss_and_grad(labels: np.ndarray) -> tuple[torch.Tensor, list[torch.Tensor]]:
        targets = torch.from_numpy(mask_prompt(labels[1:], prompt_len))
        batch = torch.stack([inputs, targets])[None]
        model.zero_grad()
        loss = NextToken(ignore_index=IGNORE).loss_sum(model, batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    (la, ga), (lb, gb) = loss_and_grad(ids), loss_and_grad(other)
    assert torch.equal(la, lb)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))


def test_completion_scores_count_completion_bytes(tokenizer: Tokenizer) -> None:
    pairs = encode_pairs(tokenizer, [PROMPT], [COMPLETION], EOS, 64)
    lengths = np.ones(512, dtype=np.int64)
    lengths[EOS] = 0  # the eos stands for no bytes
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=512))
    s = score_masked(model, eval_batches(pairs, 2, 10**9), lengths)
    assert s.tokens == pairs.scored and s.bytes == pairs.scored - 1
    assert 0 < s.loss < 2 * np.log(512) and s.bits_per_byte > 0
